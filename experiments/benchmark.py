"""Time each method's updates per second, or the online phase's env steps and updates per second, as JSON records.

    python experiments/benchmark.py --methods QAM FQL BAM IFQL --size full --steps 10 --json results/benchmark_cpu.json
    python experiments/benchmark.py --plain-only --methods QAM FQL --size small --steps 5 --device cuda --json F
    python experiments/benchmark.py --online --runners 1 2 4 --iterations 10 --json results/benchmark_online_cpu.json

``full`` is each method's official size, its registry defaults, at batch 256, chunk 5, obs 40, action 5: the QAM
paper's 4×512 MLPs, E=10 critics and K=10 flow steps for the QAM-repository agents, IDQL's own (a 3-block
LN-ResNet actor, 2×256 critics, E=2, T=5) and SAC Flow's (E=2, K=4); ``small`` is a quick configuration shared by
every method.  ``plain`` is the math core's loop without Ray on
a synthetic buffer of those shapes (an update's cost does not depend on the data's values); it imports only torch
and numpy, so ``--plain-only`` runs on a bare GPU machine.  ``rllib_local`` / ``rllib_remote`` run
``Algorithm.train()`` on a generated scene-play dataset with a local or a remote learner.  Each record is
``{name, method, size, device, compile, updates_per_s, seconds_per_update, steps, ...}``; records already in the file
with the same (name, method, size, device, compile) are replaced, others are kept, so one file collects every
benchmark.  ``--compile none default reduce-overhead`` times those ``torch.compile`` modes of the losses
(``qam_ray.core.compile``) in turns in one run; ``compile_s`` is the build + warm-up time (compilation included,
never timed), ``ratio_to_eager`` the updates/s over the same benchmark's eager record.  On CPU "reduce-overhead"
(CUDA graphs) is recorded as skipped.
Compare ratios only between records of one run on one machine.

``--shard-swap`` records ``shard_swap``: updates/s of the plain loop on a 100M-style shard folder (puzzle-4x4, a
100M domain; ``--shard-rows`` rows per shard, tiled from one generated episode) with the next shard swapped in every
``--shard-interval`` gradient steps (loaded on a background thread), against the same loop without swapping, timed
in turns in one run; plus the median stall per swap (the seconds training waited for the loader and the copy).

``--online`` starts every runner count's online phase from one small offline checkpoint (UTD ``--utd`` from the
first iteration, no evaluation) and records ``online_runners{n}_utd{u}``: the medians over ``--iterations`` of the
sampling throughput (env steps per second of sampling), updates per second of updating, env steps per wall-second
of a whole ``train()`` (sampling, updates, weight sync, bookkeeping) and the fractions of an iteration spent
sampling and updating.  Each EnvRunner asks Ray for one logical CPU, so Ray gets ``sum(runners) + 1`` logical
CPUs whatever the machine has: the records say how many physical CPUs there were.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

try:
    import qam_ray  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo; also silences GLFW's DISPLAY warning

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qam_ray.agents import METHOD_NAMES
from qam_ray.core.compile import COMPILE_MODES
from qam_ray.data.replay import ChunkReplayBuffer, synthetic_buffer as make_synthetic_buffer
from qam_ray.orchestration.tracking import git_commit
from qam_ray.training import OfflineTrainer

SIZES = {
    "full": dict(batch=256),  # each method's official networks (its hyperparameter defaults)
    "small": dict(hidden=(64, 64), num_qs=2, batch=64),
}
# scene has obs 40 and action 5, and its chunk length is 5: exactly the spec's full-size shapes.
BENCH_DOMAIN, BENCH_TASK = "scene-play", 1
BENCH_ENV = f"{BENCH_DOMAIN}-singletask-task{BENCH_TASK}-v0"
BENCH_OBS_DIM, BENCH_ACTION_DIM = 40, 5


def size_overrides(size: str) -> dict:
    spec = SIZES[size]
    if "hidden" not in spec:
        return {}
    return dict(actor_hidden_dims=spec["hidden"], value_hidden_dims=spec["hidden"], num_qs=spec["num_qs"], flow_steps=10)


def ensure_dataset(dataset_dir: str) -> str:
    """A small generated scene-play dataset (3 episodes) for the RLlib benchmarks."""
    from qam_ray.data.generate import generate_dataset

    if not os.path.exists(os.path.join(dataset_dir, "scene-play-v0.npz")):
        generate_dataset("scene", "play", episodes=3, seed=0, out_dir=dataset_dir, progress=False)
    return dataset_dir


def synthetic_buffer(device: torch.device, size: int = 3000, episode_length: int = 1000) -> ChunkReplayBuffer:
    """Random transitions in the benchmark's shapes, episodes of ``episode_length`` steps (no ogbench needed)."""
    return make_synthetic_buffer(BENCH_OBS_DIM, BENCH_ACTION_DIM, device, size, episode_length)


def prepare_plain(method: str, size: str, steps: int, device: torch.device, dataset_dir: str, threads: int,
                  compile: str = "none"):
    """The math core's loop: sample a chunk batch on-device, one optimisation step, repeat; the losses under
    ``torch.compile(mode=compile)`` unless "none" (compiled during the warm-up steps)."""
    trainer = OfflineTrainer.for_env(method, BENCH_ENV, synthetic_buffer(device), size_overrides(size),
                                     batch_size=SIZES[size]["batch"], compile=compile)
    trainer.train(WARMUP_STEPS)

    def timed() -> float:
        synchronize(device)
        start = time.perf_counter()
        trainer.train(steps)  # returns means via one host sync, so the time covers all the work
        return time.perf_counter() - start

    return timed, lambda: None


def bench_config(method: str, size: str, dataset_dir: str, steps: int, compile: str = "none"):
    """``method`` on the benchmark dataset at ``size``, ``steps`` gradient steps per offline iteration."""
    from qam_ray.rllib import AgentConfig

    return (AgentConfig().ogbench(BENCH_DOMAIN, task=BENCH_TASK, method=method, dataset_dir=dataset_dir)
            .training(**size_overrides(size), num_steps_per_iteration=steps,
                      train_batch_size_per_learner=SIZES[size]["batch"], compile=compile))


def prepare_rllib(num_learners: int):
    """``Algorithm.train()`` with ``steps`` gradient steps per iteration, on a local or a remote learner."""

    def prepare(method: str, size: str, steps: int, device: torch.device, dataset_dir: str, threads: int,
                compile: str = "none"):
        config = bench_config(method, size, dataset_dir, steps, compile).learners(
            num_learners=num_learners, num_cpus_per_learner=threads, num_gpus_per_learner=1 if device.type == "cuda" else 0)
        algo = config.build_algo()
        algo.learner_group.foreach_learner(lambda learner: learner.run_steps(WARMUP_STEPS, SIZES[size]["batch"]))

        def timed() -> float:
            start = time.perf_counter()
            algo.train()
            return time.perf_counter() - start

        return timed, algo.stop

    return prepare


def write_offline_checkpoint(size: str, dataset_dir: str, path: str) -> str:
    """One offline iteration of one gradient step, saved with ``save_to_path``: where every online run starts."""
    algo = bench_config("QAM", size, dataset_dir, 1).build_algo()
    try:
        algo.train()
        algo.save_to_path(path)
    finally:
        algo.stop()
    return path


def prepare_online(runners: int, size: str, device: torch.device, dataset_dir: str, checkpoint: str,
                   iterations: int, fragment: int, utd: float):
    """The online phase on ``runners`` EnvRunners after one warm-up iteration; ``timed()`` runs one ``train()``."""
    config = bench_config("QAM", size, dataset_dir, 1).learners(num_gpus_per_learner=1 if device.type == "cuda" else 0)
    per_iteration = runners * fragment * config.horizon_length  # env steps (fewer if an episode ends mid-chunk)
    # The phase never ends (its end would evaluate) and never reaches an evaluation.
    config = (config.online((iterations + 2) * per_iteration + 1, utd_ratio=utd, start_training=0,
                            eval_every=10**9, offline_checkpoint=checkpoint)
              .env_runners(num_env_runners=runners, num_envs_per_env_runner=1, num_cpus_per_env_runner=1,
                           rollout_fragment_length=fragment))
    algo = config.build_algo()
    last = [algo.train()["online"]["env_steps"]]  # warm-up: first rollouts, first updates and weight sync

    def timed() -> dict:
        start = time.perf_counter()
        online = algo.train()["online"]
        elapsed = time.perf_counter() - start
        env_steps, last[0] = online["env_steps"] - last[0], online["env_steps"]
        return {"iteration_s": elapsed, "env_steps": env_steps, "updates": online["updates"],
                "sample_s": online["sample_s"], "update_s": online["update_s"]}

    return timed, algo.stop


def rates(steps: int, elapsed: float) -> dict:
    return {"updates_per_s": steps / elapsed, "seconds_per_update": elapsed / steps}


def online_rates(it: dict) -> dict:
    """One online iteration's throughputs: sampling and updating apart, and the whole ``train()``."""
    return {"env_steps_per_s": it["env_steps"] / it["sample_s"], "updates_per_s": it["updates"] / it["update_s"],
            "wall_env_steps_per_s": it["env_steps"] / it["iteration_s"],
            "sample_fraction": it["sample_s"] / it["iteration_s"], "update_fraction": it["update_s"] / it["iteration_s"],
            "env_steps_per_iteration": it["env_steps"], "iteration_s": it["iteration_s"]}


SHARD_ENV = "puzzle-4x4-play-singletask-task1-v0"
SHARD_COUNT = 3


def ensure_shards(dataset_dir: str, rows: int) -> str:
    """``SHARD_COUNT`` shards of ``rows`` rows in the 100M layout under ``dataset_dir``: one generated puzzle-4x4
    episode tiled (each shard's observations shifted a little, so shards differ), compressed like OGBench's."""
    from qam_ray.data.generate import generate_dataset
    from qam_ray.data.shards import shard_folder_name

    folder = os.path.join(dataset_dir, shard_folder_name("puzzle-4x4-play-v0"))
    paths = [os.path.join(folder, f"puzzle-4x4-play-v0-{k:03d}.npz") for k in range(SHARD_COUNT)]
    if all(os.path.exists(p) for p in paths) and np.load(paths[0])["terminals"].shape[0] == rows:
        return dataset_dir
    with tempfile.TemporaryDirectory() as tmp:
        episode = np.load(generate_dataset("puzzle-4x4", "play", 1, seed=0, out_dir=tmp, progress=False)["train_path"])
        episode = {key: episode[key] for key in episode.files}
    length = len(episode["terminals"])
    if rows % length:
        raise SystemExit(f"--shard-rows {rows}: must be a multiple of the episode length {length}")
    os.makedirs(folder, exist_ok=True)
    for k, path in enumerate(paths):
        shard = {key: np.concatenate([value] * (rows // length)) for key, value in episode.items()}
        shard["observations"] = shard["observations"] + np.float32(1e-3 * k)
        np.savez_compressed(path, **shard)
    return dataset_dir


def shard_benchmark(args, device: torch.device, common: dict) -> list[dict]:
    from qam_ray.data.shards import ShardStream, open_shards

    dataset = open_shards(SHARD_ENV, ensure_shards(os.path.abspath(args.dataset_dir), args.shard_rows), sparse=True)
    stream = ShardStream(dataset, device, args.shard_interval)
    first = stream.first(0)
    method, batch, steps = args.methods[0], SIZES[args.size]["batch"], 2 * args.shard_interval  # 2 swaps per turn

    def trainer(shards):
        return OfflineTrainer.for_env(method, SHARD_ENV, ChunkReplayBuffer.from_arrays(first, device),
                                      size_overrides(args.size), batch_size=batch, shards=shards)

    loops, stalls = {"swapping": trainer(stream), "fixed": trainer(None)}, []
    for loop in loops.values():
        loop.train(WARMUP_STEPS)

    def timed(name):
        def run() -> float:
            synchronize(device)
            start = time.perf_counter()
            metrics = loops[name].train(steps)
            elapsed = time.perf_counter() - start
            if name == "swapping":
                stalls.append(metrics["data/shard_swap_stall_s"] / 2)
            return elapsed
        return run, lambda: None

    times = time_in_turns({name: timed(name) for name in loops}, args.repeats)
    stream.close()
    swapping, fixed = (rates(steps, statistics.median(times[name])) for name in ("swapping", "fixed"))
    record = {"name": "shard_swap", "method": method, **swapping, "updates_per_s_without_swapping":
              fixed["updates_per_s"], "ratio_to_no_swapping": swapping["updates_per_s"] / fixed["updates_per_s"],
              "stall_s_per_swap_median": statistics.median(stalls), "stall_s_per_swap_all": [round(s, 5) for s in stalls],
              "shard_rows": args.shard_rows, "shards": SHARD_COUNT, "interval": args.shard_interval, "steps": steps,
              "repeats": args.repeats, **common, "dataset": f"{SHARD_ENV} shards (one generated episode, tiled)"}
    print(f"shard_swap {method} {args.size} {device.type}: {swapping['updates_per_s']:.2f} updates/s swapping a "
          f"{args.shard_rows:,}-row shard every {args.shard_interval} steps vs {fixed['updates_per_s']:.2f} without "
          f"(ratio {record['ratio_to_no_swapping']:.3f}); stall per swap {record['stall_s_per_swap_median'] * 1e3:.1f} ms")
    return [record]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = cpu_model()
        info["cpus"] = os.cpu_count()
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


@contextlib.contextmanager
def local_ray(num_cpus: int):
    """A private local Ray (own short temp dir, never an existing cluster), shut down on exit."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="qb", dir="/tmp"))  # short: Ray's socket paths have a length limit
    try:
        yield
    finally:
        ray.shutdown()


def write_records(path: str, records: list[dict]) -> None:
    existing = []
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
    def key(record):  # records from before methods existed are QAM's, from before compile modes eager
        return record["name"], record.get("method", "QAM"), record["size"], record["device"], record.get("compile", "none")

    keys = {key(r) for r in records}
    merged = [r for r in existing if key(r) not in keys] + records
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(merged, f, indent=1)


WARMUP_STEPS = 3
CPU_SKIP_REASON = "CUDA graphs need a CUDA device; on CPU this mode is Inductor alone, which 'default' times"
BENCHMARKS = {"plain": prepare_plain, "rllib_local": prepare_rllib(0), "rllib_remote": prepare_rllib(1)}
RAY_BENCHMARKS = ("rllib_local", "rllib_remote")


def time_in_turns(prepared: dict, rounds: int) -> dict[str, list]:
    """``rounds`` timings of every prepared ``(timed, close)`` pair, taken in turns, then close them all."""
    times = {name: [] for name in prepared}
    for _ in range(rounds):
        for name, (timed, _) in prepared.items():
            times[name].append(timed())
    for _, close in prepared.values():
        close()
    return times


def update_benchmarks(args, device: torch.device, dataset_dir: str | None, common: dict) -> list[dict]:
    uses_ray = any(name in RAY_BENCHMARKS for name in args.only)
    # Every remote learner reserves its threads as logical CPUs, all built at once; they are timed in turns, so
    # Ray may count more logical CPUs than the machine has (the records say how many physical CPUs there were).
    remote = len(args.methods) * ("rllib_remote" in args.only)
    ray_cpus = torch.get_num_threads() * (1 + remote)
    with local_ray(ray_cpus) if uses_ray else contextlib.nullcontext():
        # All benchmarks are built first, then timed in turns, so slow drifts of a shared machine hit each alike;
        # the median over the repeats is recorded.  Building includes the warm-up steps, and so compilation:
        # recorded as compile_s, never timed.
        prepared, compile_s, records = {}, {}, []
        for method in args.methods:
            for name in args.only:
                for mode in args.compile:
                    if mode == "reduce-overhead" and device.type != "cuda":
                        records.append({"name": name, "method": method, "compile": mode, "skipped": CPU_SKIP_REASON,
                                        **common})
                        print(f"{name:>14} {method:>6} {args.size:>5} {device.type} [{mode}]: skipped ({CPU_SKIP_REASON})")
                        continue
                    start = time.perf_counter()
                    prepared[name, method, mode] = BENCHMARKS[name](method, args.size, args.steps, device, dataset_dir,
                                                                    torch.get_num_threads(), compile=mode)
                    compile_s[name, method, mode] = time.perf_counter() - start
        times = time_in_turns(prepared, args.repeats)
    for (name, method, mode) in prepared:
        elapsed = statistics.median(times[name, method, mode])
        result = rates(args.steps, elapsed)
        records.append({"name": name, "method": method, "compile": mode, **result, "repeats": args.repeats,
                        "compile_s": round(compile_s[name, method, mode], 2),
                        **({"ray_logical_cpus": ray_cpus, "physical_cpus": os.cpu_count()} if uses_ray else {}),
                        "seconds_per_update_all": [round(t / args.steps, 5) for t in times[name, method, mode]],
                        "steps": args.steps, **common})
        print(f"{name:>14} {method:>6} {args.size:>5} {device.type} [{mode}]: {result['updates_per_s']:8.2f} updates/s "
              f"({result['seconds_per_update'] * 1e3:.1f} ms/update, median of {args.repeats}; "
              f"build + warm-up {compile_s[name, method, mode]:.1f} s)")
    # Ratios only within this run: same machine, same moment.  Each compiled mode over its eager record, each RLlib
    # path over the plain loop in the same mode.
    add_ratios(records, "ratio_to_eager", lambda r: (r["name"], r["method"]), lambda r: r["compile"] == "none",
               lambda r: f"[{r['compile']}] / eager")
    add_ratios(records, "ratio_to_plain", lambda r: (r["method"], r["compile"]), lambda r: r["name"] == "plain",
               lambda r: "/ plain")
    return records


def add_ratios(records: list[dict], field: str, key, is_base, label) -> None:
    """``record[field]`` = its updates/s over the base record (``is_base``) of the same ``key``; skipped records
    take no part."""
    bases = {key(r): r for r in records if is_base(r) and "skipped" not in r}
    for record in records:
        base = bases.get(key(record))
        if base is not None and record is not base and "skipped" not in record:
            record[field] = record["updates_per_s"] / base["updates_per_s"]
            print(f"{record['name']:>14} {record['method']:>6} {label(record)} = {record[field]:.3f}")


def online_benchmarks(args, device: torch.device, dataset_dir: str, common: dict) -> list[dict]:
    ray_cpus = sum(args.runners) + 1  # one logical CPU per EnvRunner, all built at once; the driver's learner
    with local_ray(ray_cpus), tempfile.TemporaryDirectory(prefix="qam_bench_") as tmp:
        checkpoint = write_offline_checkpoint(args.size, dataset_dir, os.path.join(tmp, "offline"))
        # Built first, then timed in turns (as above); the median over the iterations is recorded.
        prepared = {n: prepare_online(n, args.size, device, dataset_dir, checkpoint, args.iterations, args.fragment,
                                      args.utd) for n in args.runners}
        times = time_in_turns(prepared, args.iterations)
    print(f"{'runners':>7} {'env steps/s (sampling)':>22} {'updates/s':>9} {'env steps/s (wall)':>18} "
          f"{'sample %':>8} {'update %':>8}")
    records = []
    for n, its in times.items():
        per_iteration = [online_rates(it) for it in its]
        result = {key: statistics.median(r[key] for r in per_iteration) for key in per_iteration[0]}
        records.append({"name": f"online_runners{n}_utd{args.utd:g}", **result, "runners": n, "fragment": args.fragment,
                        "utd": args.utd, "iterations": args.iterations, "envs_per_runner": 1,
                        "ray_logical_cpus": ray_cpus, "logical_cpus_per_runner": 1,
                        "physical_cpus": os.cpu_count(), "oversubscribed": n > (os.cpu_count() or 1),
                        "iterations_all": [{k: round(v, 4) for k, v in it.items()} for it in its], **common})
        print(f"{n:>7} {result['env_steps_per_s']:>22.1f} {result['updates_per_s']:>9.1f} "
              f"{result['wall_env_steps_per_s']:>18.1f} {result['sample_fraction']:>8.0%} {result['update_fraction']:>8.0%}")
    print(f"(size {args.size}, {device.type}, UTD {args.utd}, {args.fragment} chunks per runner and iteration, "
          f"median of {args.iterations}; Ray: {ray_cpus} logical CPUs on {os.cpu_count()} physical)")
    return records


# --------------------------------------------------------------------------------------------------
# --profile, --contend, --pack: where an update's time goes on a CPU, and how it shares one
# --------------------------------------------------------------------------------------------------
MATMUL_OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
              torch.ops.aten.baddbmm.default)


def matmul_flops(shapes: list[tuple[int, ...]]) -> int:
    """2·M·N·K (times the batch) of one mm/addmm/bmm/baddbmm from its operand shapes (the bias, if any, first)."""
    a, b = shapes[-2:]
    return 2 * math.prod(a) * b[-1]


class MatmulRecorder(TorchDispatchMode):
    """Every matmul one update runs, forward and backward, as (op, operand shapes)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[object, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMUL_OPS:
            self.calls.append((func, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def matmul_replay(calls, device: torch.device):
    """``run()`` times the recorded matmuls alone, at the same shapes and thread count: the update's floor."""
    operands = {}
    for _, shapes in calls:
        for shape in shapes:
            operands.setdefault(shape, torch.randn(shape, device=device))
    program = [(func, [operands[s] for s in shapes]) for func, shapes in calls]

    def run() -> float:
        synchronize(device)
        start = time.perf_counter()
        for func, tensors in program:
            func(*tensors)
        synchronize(device)
        return time.perf_counter() - start

    return run


def profile_benchmark(args, device: torch.device, common: dict) -> list[dict]:
    """``profile``: one method's update against its matmul floor (timed in turns), and its time per ``phase:`` label
    (torch.profiler; the labels sit in the agents' losses and the shared optimisation step)."""
    from torch.profiler import ProfilerActivity, profile

    method = args.methods[0]
    trainer = OfflineTrainer.for_env(method, BENCH_ENV, synthetic_buffer(device), size_overrides(args.size),
                                     batch_size=SIZES[args.size]["batch"])
    trainer.train(WARMUP_STEPS)
    with MatmulRecorder() as recorder:
        trainer.train(1)
    flops = sum(matmul_flops(shapes) for _, shapes in recorder.calls)
    floor = matmul_replay(recorder.calls, device)
    floor()

    def update() -> float:
        synchronize(device)
        start = time.perf_counter()
        trainer.train(args.steps)
        return (time.perf_counter() - start) / args.steps

    times = time_in_turns({"update": (update, lambda: None), "floor": (floor, lambda: None)}, args.repeats)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train(args.steps)
    events = prof.key_averages()
    profiled = sum(e.self_cpu_time_total for e in events) / 1e6 / args.steps  # main-thread time under the profiler
    phases = {e.key.removeprefix("phase:"): e.cpu_time_total / 1e6 / args.steps
              for e in events if e.key.startswith("phase:")}
    update_s, floor_s = statistics.median(times["update"]), statistics.median(times["floor"])
    record = {"name": "profile", "method": method, **rates(1, update_s), "floor_s": floor_s,
              "floor_ratio": update_s / floor_s, "matmul_gflop": flops / 1e9,
              "matmul_gflop_per_s": flops / floor_s / 1e9,
              "matmuls": len(recorder.calls), "profiled_s_per_update": profiled,
              "phases_s": {k: round(v, 5) for k, v in phases.items()},
              "phases_other_s": round(profiled - sum(phases.values()), 5),
              "update_s_all": [round(t, 4) for t in times["update"]],
              "floor_s_all": [round(t, 4) for t in times["floor"]],
              "steps": args.steps, "repeats": args.repeats, "load_average": os.getloadavg(), **common}
    print(f"profile {method} {args.size} {device.type}: {update_s:.3f} s/update, matmul floor {floor_s:.3f} s "
          f"({flops / 1e9:.1f} GFLOP in {len(recorder.calls)} matmuls at {record['matmul_gflop_per_s']:.0f} GFLOP/s): "
          f"ratio {record['floor_ratio']:.2f}  (load {os.getloadavg()[0]:.1f})")
    for name, seconds in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {name:>24} {seconds * 1e3:8.1f} ms  {seconds / profiled:6.1%}")
    print(f"  {'(unlabelled)':>24} {record['phases_other_s'] * 1e3:8.1f} ms  (profiled total {profiled * 1e3:.1f} ms)")
    return [record]


def busy_worker(go, stop) -> None:
    """A contending process: a tight pure-Python loop while ``go`` is set, asleep otherwise."""
    count = 0
    while not stop.is_set():
        if go.wait(0.05):
            for _ in range(100_000):
                count += 1


def contend_benchmark(args, device: torch.device, common: dict) -> list[dict]:
    """``contend{N}``: the plain loop with N busy processes beside it against the same loop alone, in turns."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    go, stop = context.Event(), context.Event()
    workers = [context.Process(target=busy_worker, args=(go, stop), daemon=True) for _ in range(args.contend)]
    for worker in workers:
        worker.start()
    records = []
    try:
        for method in args.methods:
            timed, close = prepare_plain(method, args.size, args.steps, device, None, torch.get_num_threads())

            def contended(timed=timed) -> float:
                go.set()
                time.sleep(0.2)  # the busy loops are running
                try:
                    return timed()
                finally:
                    go.clear()

            times = time_in_turns({"alone": (timed, lambda: None), "contended": (contended, close)}, args.repeats)
            alone, busy = (statistics.median(times[k]) / args.steps for k in ("alone", "contended"))
            record = {"name": f"contend{args.contend}", "method": method, **rates(1, busy),
                      "seconds_per_update_alone": alone, "slowdown": busy / alone, "busy_processes": args.contend,
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                      "seconds_per_update_all": [round(t / args.steps, 4) for t in times["contended"]],
                      "seconds_per_update_alone_all": [round(t / args.steps, 4) for t in times["alone"]],
                      "steps": args.steps, "repeats": args.repeats, "load_average": os.getloadavg(), **common}
            records.append(record)
            print(f"contend{args.contend} {method:>6} {args.size:>5} {device.type}: {alone * 1e3:.1f} ms/update alone, "
                  f"{busy * 1e3:.1f} with {args.contend} busy process(es): slowdown {record['slowdown']:.2f}x "
                  f"(OMP_WAIT_POLICY={record['omp_wait_policy']}, {torch.get_num_threads()} threads)")
    finally:
        stop.set()
        go.set()
        for worker in workers:
            worker.join(5)
    return records


def pack_worker(method: str, size: str, steps: int, repeats: int, device: str, threads: int, barrier, results) -> None:
    """One packed trial: its fair share of threads, warm up, wait for the others, time, report updates/s."""
    torch.set_num_threads(threads)
    timed, close = prepare_plain(method, size, steps, torch.device(device), None, threads)
    barrier.wait()
    elapsed = statistics.median(timed() for _ in range(repeats))
    close()
    results.put(steps / elapsed)


def pack_benchmark(args, device: torch.device, common: dict) -> list[dict]:
    """``pack{k}``: k plain-loop processes at once on this machine, each with max(1, cpus // k) threads; the
    aggregate updates/s is the sum of theirs."""
    import multiprocessing

    context, cpus = multiprocessing.get_context("spawn"), len(os.sched_getaffinity(0))
    records = []
    for method in args.methods:
        single = None
        for k in args.pack:
            threads = max(1, cpus // k)
            barrier, results = context.Barrier(k), context.Queue()
            procs = [context.Process(target=pack_worker, args=(method, args.size, args.steps, args.repeats,
                                                              device.type, threads, barrier, results))
                     for _ in range(k)]
            for proc in procs:
                proc.start()
            per_trial = [results.get() for _ in procs]
            for proc in procs:
                proc.join()
            aggregate = sum(per_trial)
            single = single or aggregate / k
            record = {"name": f"pack{k}", "method": method, "updates_per_s": aggregate, "trials": k,
                      "threads_per_trial": threads, "updates_per_s_per_trial": per_trial,
                      "speedup_vs_one_trial": aggregate / single if args.pack[0] == 1 else None,
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "steps": args.steps,
                      "repeats": args.repeats, "load_average": os.getloadavg(), **common}
            records.append(record)
            print(f"pack{k} {method:>6} {args.size:>5} {device.type}: {aggregate:8.2f} updates/s in all "
                  f"({k} x {threads} thread(s); per trial {min(per_trial):.2f}-{max(per_trial):.2f})"
                  + (f", x{record['speedup_vs_one_trial']:.2f} of one trial" if record["speedup_vs_one_trial"] else ""))
    return records


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--steps", type=int, default=20, help="timed updates per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per benchmark, interleaved; median kept")
    p.add_argument("--methods", nargs="+", default=["QAM"], choices=METHOD_NAMES, metavar="METHOD",
                   help=f"paper labels: {', '.join(METHOD_NAMES)}")
    p.add_argument("--only", nargs="*", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    p.add_argument("--plain-only", action="store_true", help="only the plain loop: needs only torch and numpy")
    p.add_argument("--online", action="store_true", help="time the online phase on EnvRunners instead")
    p.add_argument("--runners", type=int, nargs="+", default=[1, 2, 4], help="online: EnvRunner counts")
    p.add_argument("--iterations", type=int, default=10, help="online: timed iterations per runner count after "
                   "one warm-up, interleaved; median kept")
    p.add_argument("--fragment", type=int, default=10, help="online: chunks per EnvRunner and iteration")
    p.add_argument("--utd", type=float, default=1.0, help="online: gradient steps per env step")
    p.add_argument("--shard-swap", action="store_true", help="time 100M shard swapping against no swapping instead")
    p.add_argument("--shard-rows", type=int, default=100_100, help="shard-swap: rows per shard (whole episodes)")
    p.add_argument("--shard-interval", type=int, default=1000, help="shard-swap: gradient steps per shard")
    p.add_argument("--profile", action="store_true", help="per-phase times of the first method's update and its "
                   "matmul floor (the update's own matmuls timed alone), in turns")
    p.add_argument("--contend", type=int, default=0, metavar="N", help="time the plain loop beside N busy processes "
                   "against it alone, in turns (the slowdown factor)")
    p.add_argument("--pack", type=int, nargs="+", default=None, metavar="K", help="run K plain-loop processes at "
                   "once (each max(1, cpus // K) threads) and record their aggregate updates/s, per K")
    p.add_argument("--dataset-dir", default="data/bench", help="where the small generated benchmark dataset lives")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", nargs="+", choices=COMPILE_MODES, default=["none"], metavar="MODE",
                   help=f"torch.compile modes of the losses to time, in turns ({', '.join(COMPILE_MODES)}; 'none': "
                   "eager); each record says its mode.  CUDA-graph modes are skipped on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS or all)")
    p.add_argument("--json", default=None, help="JSON file to add the records to")
    return p, p.parse_args(argv)


def main(argv=None) -> int:
    p, args = parse_args(argv)
    if args.plain_only:
        args.only = ["plain"]
    if args.plain_only and (args.online or args.shard_swap):
        p.error("--plain-only times updates with torch and numpy only; --online needs Ray, --shard-swap ogbench")
    if args.threads or os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(args.threads or int(os.environ["OMP_NUM_THREADS"]))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    common = {"size": args.size, "device": device.type, "batch_size": SIZES[args.size]["batch"],
              "git_commit": git_commit(os.path.dirname(os.path.abspath(__file__))),
              "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **machine_info(device)}
    if args.shard_swap:
        records = shard_benchmark(args, device, common)
    elif args.profile or args.contend or args.pack:
        common["dataset"] = BENCH_ENV + " shapes (synthetic)"
        records = (profile_benchmark if args.profile else contend_benchmark if args.contend else pack_benchmark)(
            args, device, common)
    else:
        uses_data = args.online or any(name in RAY_BENCHMARKS for name in args.only)
        common["dataset"] = BENCH_ENV + (" (generated; plain: synthetic)" if uses_data else " shapes (synthetic)")
        dataset_dir = ensure_dataset(os.path.abspath(args.dataset_dir)) if uses_data else None
        records = (online_benchmarks if args.online else update_benchmarks)(args, device, dataset_dir, common)
    for record in records:  # the benchmarks without --compile modes run eager
        record.setdefault("compile", "none")
    if args.json:
        write_records(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())

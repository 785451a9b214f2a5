"""Time QAM updates per second and record them as JSON.

    python experiments/benchmark.py --size full --steps 20 --json results/benchmark_cpu.json

``full`` is the paper's size (4×512 MLPs, E=10 critics, K=10 flow steps, batch 256, chunk 5, obs 40,
action 5); ``small`` is a quick configuration.  Each record is
``{name, size, device, updates_per_s, seconds_per_update, steps, ...}``; records already in the file with
the same (name, size, device) are replaced, others are kept, so one file collects every benchmark.
Compare ratios only between records of one run on one machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

try:
    import qam_ray  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo; also silences GLFW's DISPLAY warning

import torch

from qam_ray.data.replay import ChunkReplayBuffer
from qam_ray.tracking import git_commit
from qam_ray.training import OfflineTrainer

SIZES = {
    "full": dict(hidden=(512, 512, 512, 512), num_qs=10, batch=256),
    "small": dict(hidden=(64, 64), num_qs=2, batch=64),
}
# scene has obs 40 and action 5, and its chunk length is 5: exactly the spec's full-size shapes.
BENCH_DOMAIN, BENCH_TASK = "scene-play", 1
BENCH_ENV = f"{BENCH_DOMAIN}-singletask-task{BENCH_TASK}-v0"


def size_overrides(size: str) -> dict:
    spec = SIZES[size]
    return dict(actor_hidden_dims=spec["hidden"], value_hidden_dims=spec["hidden"], num_qs=spec["num_qs"], flow_steps=10)


def ensure_dataset(dataset_dir: str) -> str:
    """A small generated scene-play dataset (3 episodes); the update cost does not depend on the data."""
    from qam_ray.data.generate import generate_dataset

    if not os.path.exists(os.path.join(dataset_dir, "scene-play-v0.npz")):
        generate_dataset("scene", "play", episodes=3, seed=0, out_dir=dataset_dir, progress=False)
    return dataset_dir


def prepare_plain(size: str, steps: int, device: torch.device, dataset_dir: str, threads: int):
    """The math core's loop: sample a chunk batch on-device, one optimisation step, repeat."""
    from qam_ray.data.ogbench_data import load_offline_dataset
    from qam_ray.training import hyperparams_for_env

    dataset = load_offline_dataset(BENCH_ENV, dataset_dir, sparse=True)
    hp = hyperparams_for_env(BENCH_ENV, "QAM", dataset.obs_dim, dataset.action_dim, size_overrides(size))
    trainer = OfflineTrainer(hp, ChunkReplayBuffer.from_arrays(dataset.train, device), batch_size=SIZES[size]["batch"])
    trainer.train(WARMUP_STEPS)

    def timed() -> float:
        synchronize(device)
        start = time.perf_counter()
        trainer.train(steps)  # returns means via one host sync, so the time covers all the work
        return time.perf_counter() - start

    return timed, lambda: None


def prepare_rllib(num_learners: int):
    """``Algorithm.train()`` with ``steps`` gradient steps per iteration, on a local or a remote learner."""

    def prepare(size: str, steps: int, device: torch.device, dataset_dir: str, threads: int):
        from qam_ray.rllib.algorithm import QAMConfig

        config = (QAMConfig().ogbench(BENCH_DOMAIN, task=BENCH_TASK, dataset_dir=dataset_dir)
                  .training(**size_overrides(size), num_steps_per_iteration=steps,
                            train_batch_size_per_learner=SIZES[size]["batch"])
                  .learners(num_learners=num_learners, num_cpus_per_learner=threads,
                            num_gpus_per_learner=1 if device.type == "cuda" else 0))
        algo = config.build_algo()
        algo.learner_group.foreach_learner(lambda learner: learner.run_steps(WARMUP_STEPS, SIZES[size]["batch"]))

        def timed() -> float:
            start = time.perf_counter()
            algo.train()
            return time.perf_counter() - start

        return timed, algo.stop

    return prepare


def rates(steps: int, elapsed: float) -> dict:
    return {"updates_per_s": steps / elapsed, "seconds_per_update": elapsed / steps}


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


def write_records(path: str, records: list[dict]) -> None:
    existing = []
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
    keys = {(r["name"], r["size"], r["device"]) for r in records}
    merged = [r for r in existing if (r["name"], r["size"], r["device"]) not in keys] + records
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(merged, f, indent=1)


WARMUP_STEPS = 3
BENCHMARKS = {"plain": prepare_plain, "rllib_local": prepare_rllib(0), "rllib_remote": prepare_rllib(1)}
RAY_BENCHMARKS = ("rllib_local", "rllib_remote")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--steps", type=int, default=20, help="timed updates per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per benchmark, interleaved; median kept")
    p.add_argument("--only", nargs="*", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    p.add_argument("--dataset-dir", default="data/bench", help="where the small generated benchmark dataset lives")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS or all)")
    p.add_argument("--json", default=None, help="JSON file to add the records to")
    args = p.parse_args(argv)
    if args.threads or os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(args.threads or int(os.environ["OMP_NUM_THREADS"]))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    common = {"size": args.size, "device": device.type, "steps": args.steps, "batch_size": SIZES[args.size]["batch"],
              "dataset": BENCH_ENV + " (generated)",
              "git_commit": git_commit(os.path.dirname(os.path.abspath(__file__))), "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              **machine_info(device)}
    dataset_dir = ensure_dataset(os.path.abspath(args.dataset_dir))
    if any(name in RAY_BENCHMARKS for name in args.only):
        import ray

        ray.init(address="local", num_cpus=max(2, torch.get_num_threads()), include_dashboard=False,
                 log_to_driver=False)
    # All benchmarks are built first, then timed in turns, so slow drifts of a shared machine hit each alike;
    # the median over the repeats is recorded.
    prepared = {name: BENCHMARKS[name](args.size, args.steps, device, dataset_dir, torch.get_num_threads())
                for name in args.only}
    times = {name: [] for name in args.only}
    for _ in range(args.repeats):
        for name, (timed, _) in prepared.items():
            times[name].append(timed())
    records = []
    for name, (_, close) in prepared.items():
        close()
        elapsed = statistics.median(times[name])
        result = rates(args.steps, elapsed)
        records.append({"name": name, **result, "repeats": args.repeats,
                        "seconds_per_update_all": [round(t / args.steps, 5) for t in times[name]], **common})
        print(f"{name:>14} {args.size:>5} {device.type}: {result['updates_per_s']:8.2f} updates/s "
              f"({result['seconds_per_update'] * 1e3:.1f} ms/update, median of {args.repeats})")
    # Ratios only within this run: same machine, same moment.
    plain = next((r for r in records if r["name"] == "plain"), None)
    for record in records:
        if plain is not None and record is not plain:
            record["ratio_to_plain"] = record["updates_per_s"] / plain["updates_per_s"]
            print(f"{record['name']:>14} / plain = {record['ratio_to_plain']:.3f}")
    if args.json:
        write_records(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
import subprocess
import sys
import time

try:
    import qam_ray  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from qam_ray.core.qam import QAMHyperparams
from qam_ray.data.replay import ChunkReplayBuffer
from qam_ray.training import OfflineTrainer

SIZES = {
    "full": dict(hidden=(512, 512, 512, 512), num_qs=10, batch=256),
    "small": dict(hidden=(64, 64), num_qs=2, batch=64),
}
OBS_DIM, ACTION_DIM, HORIZON, FLOW_STEPS, DATASET_ROWS = 40, 5, 5, 10, 20_000


def hyperparams(size: str) -> QAMHyperparams:
    spec = SIZES[size]
    return QAMHyperparams(
        obs_dim=OBS_DIM, action_dim=ACTION_DIM, horizon_length=HORIZON, actor_hidden_dims=spec["hidden"],
        value_hidden_dims=spec["hidden"], num_qs=spec["num_qs"], flow_steps=FLOW_STEPS, inv_temp=1.0,
    )


def synthetic_dataset(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random transitions with episodes of 100 steps: the update cost does not depend on the values."""
    rng = np.random.default_rng(seed)
    terminals = np.zeros(rows, np.float32)
    terminals[99::100] = 1.0
    return {
        "observations": rng.standard_normal((rows, OBS_DIM), dtype=np.float32),
        "next_observations": rng.standard_normal((rows, OBS_DIM), dtype=np.float32),
        "actions": rng.uniform(-1, 1, (rows, ACTION_DIM)).astype(np.float32),
        "rewards": -rng.integers(0, 2, rows).astype(np.float32),
        "masks": np.ones(rows, np.float32),
        "terminals": terminals,
    }


def time_plain(size: str, steps: int, device: torch.device, warmup: int = 3) -> dict:
    """The math core's loop: sample a chunk batch on-device, one optimisation step, repeat."""
    trainer = OfflineTrainer(hyperparams(size), ChunkReplayBuffer.from_arrays(synthetic_dataset(DATASET_ROWS), device),
                             batch_size=SIZES[size]["batch"])
    trainer.train(warmup)
    synchronize(device)
    start = time.perf_counter()
    trainer.train(steps)  # returns means via one host sync, so the time covers all the work
    elapsed = time.perf_counter() - start
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


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


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


BENCHMARKS = {"plain": time_plain}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--steps", type=int, default=20, help="timed updates per benchmark")
    p.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), default=sorted(BENCHMARKS))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS or all)")
    p.add_argument("--json", default=None, help="JSON file to add the records to")
    args = p.parse_args(argv)
    if args.threads or os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(args.threads or int(os.environ["OMP_NUM_THREADS"]))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    common = {"size": args.size, "device": device.type, "steps": args.steps, "batch_size": SIZES[args.size]["batch"],
              "git_commit": git_commit(), "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              **machine_info(device)}
    records = []
    for name in args.only:
        result = BENCHMARKS[name](args.size, args.steps, device)
        record = {"name": name, **result, **common}
        records.append(record)
        print(f"{name:>14} {args.size:>5} {device.type}: {result['updates_per_s']:8.2f} updates/s "
              f"({result['seconds_per_update'] * 1e3:.1f} ms/update)")
    if args.json:
        write_records(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())

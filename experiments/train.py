"""Train QAM offline on one OGBench singletask dataset and evaluate it (plain PyTorch, no Ray).

    python experiments/train.py --env cube-single-play-singletask-task2-v0 --dataset-dir data/generated \
        --steps 20000 --eval-every 10000 --eval-episodes 50 --set actor_hidden_dims=[256,256] --out runs/demo

Per-domain hyperparameters come from the registry (qam_ray.domains); ``--set key=value`` overrides any
field of QAMHyperparams (values are Python literals).  Writes config.json, metrics.csv, eval.csv and
checkpoint.pt to --out.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import json
import os
import sys
import time

try:
    import qam_ray  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from tqdm import tqdm

from qam_ray.data.ogbench_data import DatasetError, DatasetUnavailableError, load_offline_dataset
from qam_ray.data.replay import ChunkReplayBuffer
from qam_ray.domains import VARIANTS, domain_of_env
from qam_ray.evaluation import evaluate, make_eval_env
from qam_ray.training import OfflineTrainer, hyperparams_for_env


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE, e.g. --set inv_temp=3.0")
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise SystemExit(f"--set {pair!r}: {text!r} is not a Python literal (e.g. 3.0, [256,256], None)") from None
    return overrides


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", required=True, help="singletask name, e.g. cube-double-play-singletask-task2-v0")
    p.add_argument("--dataset-dir", default=None, help="folder with <dataset>.npz files (default: OGBench's download dir)")
    p.add_argument("--variant", default="QAM", choices=VARIANTS)
    p.add_argument("--steps", type=int, default=1_000_000, help="offline gradient steps")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--log-every", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=50_000, help="0 = only at the end")
    p.add_argument("--eval-episodes", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS or all cores)")
    p.add_argument("--no-sparse", action="store_true", help="keep dense rewards even where the domain is sparse")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="output folder for config, metrics, evaluations and checkpoint")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "log_every", "eval_episodes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.overrides = parse_overrides(args.overrides)
    # Fail on bad names/overrides before the (slow) dataset load.
    try:
        hyperparams_for_env(args.env, args.variant, 1, 1, args.overrides)
    except (ValueError, TypeError) as exc:
        p.error(str(exc))
    return args


def append_csv(path: str, row: dict) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads or os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(args.threads or int(os.environ["OMP_NUM_THREADS"]))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    domain = domain_of_env(args.env)
    try:
        dataset = load_offline_dataset(args.env, args.dataset_dir, sparse=domain.sparse and not args.no_sparse)
    except (DatasetError, DatasetUnavailableError) as exc:
        raise SystemExit(f"error: {exc}") from None
    hp = hyperparams_for_env(args.env, args.variant, dataset.obs_dim, dataset.action_dim, args.overrides)
    buffer = ChunkReplayBuffer.from_arrays(dataset.train, device)
    trainer = OfflineTrainer(hp, buffer, args.batch_size, args.seed)
    env = make_eval_env(args.env)
    config = {
        "env": args.env, "variant": hp.variant, "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
        "device": str(device), "dataset_source": dataset.source, "dataset_sha256": dataset.sha256,
        "transitions": buffer.size, "hyperparams": dataclasses.asdict(hp),
    }
    print(json.dumps(config, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(config, f, indent=1)

    def run_eval():
        result = evaluate(args.env, trainer.act, args.eval_episodes, seed=10_000 + args.seed, env=env)
        row = {"step": trainer.step, **result, "wall_s": round(time.time() - start, 1)}
        tqdm.write(f"eval @ {trainer.step}: " + json.dumps(row))
        if args.out:
            append_csv(os.path.join(args.out, "eval.csv"), row)
        return row

    start = time.time()
    last_eval = None
    with tqdm(total=args.steps, unit="step", dynamic_ncols=True) as bar:
        while trainer.step < args.steps:
            n = min(args.log_every, args.steps - trainer.step)
            t0 = time.time()
            metrics = trainer.train(n)
            row = {"step": trainer.step, **{k: round(v, 6) for k, v in metrics.items()},
                   "updates_per_s": round(n / (time.time() - t0), 2)}
            bar.update(n)
            bar.set_postfix(loss=f"{metrics['total_loss']:.3g}", q=f"{metrics['q_mean']:.3g}", ups=row["updates_per_s"])
            if args.out:
                append_csv(os.path.join(args.out, "metrics.csv"), row)
            if args.eval_every and trainer.step % args.eval_every == 0 and trainer.step < args.steps:
                run_eval()
    last_eval = run_eval()
    if args.out:
        torch.save(trainer.state_dict(), os.path.join(args.out, "checkpoint.pt"))
    print(f"done: {trainer.step} steps in {time.time() - start:.0f} s, "
          f"success rate {last_eval['success_rate']:.3f} over {args.eval_episodes} episodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

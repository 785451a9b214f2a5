"""Train methods offline on one OGBench singletask dataset with the RLlib algorithm, evaluating on the env.

    python experiments/train.py --env cube-single-play-singletask-task2-v0 --dataset-dir data/generated \
        --methods QAM FQL --steps 20000 --eval-every 5000 --eval-episodes 50 --set "actor_hidden_dims=(256,256)" \
        --out runs/demo

Each method trains in turn with its per-domain hyperparameters from the registry (``AgentConfig.ogbench``);
``--set KEY=VALUE`` overrides a hyperparameter of every method that has it, ``--set METHOD.KEY=VALUE`` of one
(values are Python literals).  ``--learners N`` trains on N remote learners (gradients averaged),
``--gpus-per-learner`` puts them (or the local learner) on GPUs.  Writes config.json, metrics.csv, eval.csv and an
RLlib checkpoint to --out (to --out/<method> with several methods).  Without RAY_ADDRESS a local Ray starts.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

try:
    import qam_ray  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo; also silences GLFW's DISPLAY warning

from qam_ray.agents import METHOD_NAMES, make_hyperparams
from qam_ray.domains import parse_singletask_name
from qam_ray.orchestration.presets import method_overrides, override_errors, parse_overrides


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", required=True, help="singletask name, e.g. cube-double-play-singletask-task2-v0")
    p.add_argument("--dataset-dir", default=None, help="folder with <dataset>.npz files (default: OGBench's download "
                   "dir); 100M datasets as folders <domain>-100m-v0/ of shards")
    p.add_argument("--dataset-size", choices=("1M", "100M", "paper"), default="1M",
                   help="1M: the standard file; 100M: the domain's shard folder; paper: what the paper trains on")
    p.add_argument("--dataset-url", default=None, help="mirror of OGBench's host for missing standard files "
                   "(default: $QAM_RAY_DATASET_URL, else the official host)")
    p.add_argument("--methods", nargs="+", default=["QAM"], choices=METHOD_NAMES, metavar="METHOD",
                   help=f"paper labels, trained one after another: {', '.join(METHOD_NAMES)}")
    p.add_argument("--steps", type=int, default=1_000_000, help="offline gradient steps")
    p.add_argument("--batch-size", type=int, default=256, help="per learner")
    p.add_argument("--log-every", type=int, default=1000, help="gradient steps per training iteration")
    p.add_argument("--eval-every", type=int, default=50_000, help="a multiple of --log-every; 0 = only at the end")
    p.add_argument("--eval-episodes", type=int, default=50)
    p.add_argument("--eval-env-runners", type=int, default=0, help="remote evaluation EnvRunners (0 = in-process)")
    p.add_argument("--learners", type=int, default=0, help="remote learners (0 = a local learner in this process)")
    p.add_argument("--gpus-per-learner", type=float, default=0, help="fractional values share a GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads here (default: OMP_NUM_THREADS or all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[METHOD.]KEY=VALUE")
    p.add_argument("--out", default=None, help="output folder for config, metrics, evaluations and checkpoint")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "log_every", "eval_episodes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.eval_every % args.log_every:
        p.error(f"--eval-every {args.eval_every} must be a multiple of --log-every {args.log_every}")
    # Fail on bad names and overrides before Ray or the dataset load.
    try:
        args.overrides = parse_overrides(args.overrides)
        errors = override_errors(args.overrides, args.methods)
        if errors:
            p.error("\n  ".join(errors))
        for method in args.methods:
            make_hyperparams(method, args.env, 1, 1, method_overrides(args.overrides, method))
    except ValueError as exc:
        p.error(str(exc))
    return args


def build_config(args, method: str):
    from qam_ray.rllib import build_agent_config

    name = parse_singletask_name(args.env)
    return build_agent_config(
        method, name.domain_name, name.task, dataset_dir=args.dataset_dir, dataset_size=args.dataset_size,
        dataset_url=args.dataset_url, overrides=method_overrides(args.overrides, method),
        steps_per_iteration=args.log_every, batch_size=args.batch_size,
        # An interval is always set so the evaluation EnvRunners exist; eval_every=0 evaluates at the end.
        eval_interval=max(1, (args.eval_every or args.steps) // args.log_every), eval_episodes=args.eval_episodes,
        eval_env_runners=args.eval_env_runners, seed=args.seed, num_learners=args.learners,
        gpus_per_learner=args.gpus_per_learner,
    )


def append_csv(path: str, row: dict) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def eval_row(step: int, evaluation: dict, wall: float) -> dict:
    runners = evaluation["env_runners"]
    return {"step": step, "success_rate": float(runners["success_rate"]),
            "episode_length": float(runners["episode_env_steps"]), "episodes": int(runners["num_episodes"]),
            "wall_s": round(wall, 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray
    import torch

    if args.threads or os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(args.threads or int(os.environ["OMP_NUM_THREADS"]))
    configs = {method: build_config(args, method) for method in args.methods}
    for config in configs.values():
        config.validate()
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    for method, config in configs.items():
        out = args.out and os.path.abspath(args.out if len(configs) == 1 else os.path.join(args.out, method))
        train_one(args, method, config, out)
    return 0


def train_one(args, method: str, config, out: str | None) -> None:
    """Train ``method`` for ``args.steps`` steps, evaluating on the schedule and at the end; write to ``out``."""
    from tqdm import tqdm

    from qam_ray.data.ogbench_data import DatasetError, DatasetUnavailableError

    if out:
        os.makedirs(out, exist_ok=True)
    try:
        algo = config.build_algo()
    except (DatasetError, DatasetUnavailableError) as exc:
        raise SystemExit(f"error: {exc}") from None
    summary = {"env": args.env, "method": method, "seed": args.seed, "steps": args.steps,
               "learners": args.learners, **algo.dataset_info, "hyperparams": vars(config.hyperparams_for_spaces())}
    print(json.dumps(summary, indent=1, default=str))
    if out:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)

    start, step, last_eval = time.time(), 0, None
    with tqdm(total=args.steps, unit="step", dynamic_ncols=True, desc=method) as bar:
        while step < args.steps:
            result = algo.train()
            step = int(result["num_gradient_steps_lifetime"])
            metrics = result["learners"]["default_policy"]
            row = {"step": step, **{k: round(float(v), 6) for k, v in sorted(metrics.items())}}
            bar.update(args.log_every)
            bar.set_postfix(loss=f"{row['total_loss']:.3g}", ups=f"{row['updates_per_s']:.1f}",
                            **({"q": f"{row['q_mean']:.3g}"} if "q_mean" in row else {}))  # (IDQL logs `q`)
            if out:
                append_csv(os.path.join(out, "metrics.csv"), row)
            if "evaluation" in result:
                last_eval = eval_row(step, result["evaluation"], time.time() - start)
                tqdm.write(f"{method} eval: " + json.dumps(last_eval))
                if out:
                    append_csv(os.path.join(out, "eval.csv"), last_eval)
    if last_eval is None or last_eval["step"] != step:
        last_eval = eval_row(step, algo.evaluate(), time.time() - start)
        print(f"{method} eval: " + json.dumps(last_eval))
        if out:
            append_csv(os.path.join(out, "eval.csv"), last_eval)
    if out:
        algo.save_to_path(os.path.join(out, "checkpoint"))
    algo.stop()
    print(f"{method} done: {step} steps in {time.time() - start:.0f} s, "
          f"success rate {last_eval['success_rate']:.3f} over {last_eval['episodes']} episodes")


if __name__ == "__main__":
    sys.exit(main())

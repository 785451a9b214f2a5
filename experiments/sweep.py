"""Sweep methods × OGBench domains × tasks × seeds with Ray Tune, logging to MLflow.

    python experiments/sweep.py --preset quickstart                   # QAM vs FQL on generated data, ~10 min
    python experiments/sweep.py --preset paper --methods QAM FQL BAM IFQL --dataset-dir /data/ogbench \
        --gpus-per-trial 0.25 --dry-run
    python experiments/sweep.py --preset search --methods FQL --domains cube-double-play --tasks 2
    python experiments/sweep.py --preset paper-online --dataset-dir /data/ogbench --env-runners 2 --dry-run
    ray job submit --working-dir . -- python experiments/sweep.py --preset smoke --methods QAM FQL

Presets: ``paper`` (the methods × 10 domains × tasks 1-5 × 12 seeds, each method with its per-domain values, 1M
steps, evaluation every 50K steps with 50 episodes), ``search`` (Optuna over the method's own space with ASHA
early stopping on success), ``quickstart`` (QAM and FQL on generated cube-single data, small networks) and
``smoke`` (CI, tiny).  ``paper-online`` and ``smoke-online`` add online fine-tuning after the offline steps in the
same trial and MLflow run (500K env steps for the paper, UTD 1, updates from 5K env steps, one EnvRunner like the
reference's single env).  Any flag overrides the preset; ``--set KEY=VALUE`` sets a hyperparameter for every
method that has it, ``--set METHOD.KEY=VALUE`` for one method.  Tracking: MLFLOW_TRACKING_URI, or
sqlite:///<absolute path>/mlflow.db.  ``--resume`` continues an interrupted sweep from its checkpoints.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

try:
    import qam_ray  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo; also silences GLFW's DISPLAY warning

from qam_ray.agents import METHOD_NAMES
from qam_ray.domains import DOMAIN_NAMES
from qam_ray.orchestration.presets import DATASET_SIZE_CHOICES, PRESET_FLAGS, PRESETS, off_protocol_domains, resolve
from qam_ray.orchestration.sweep import SweepOptions, dry_run_summary, preflight_errors, run_sweep


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quickstart")
    p.add_argument("--methods", nargs="+", metavar="METHOD", help=f"paper labels: {', '.join(METHOD_NAMES)}")
    p.add_argument("--domains", nargs="+", help=f"paper domains ({', '.join(DOMAIN_NAMES)}) or generated ones")
    p.add_argument("--tasks", nargs="+", type=int)
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--steps", type=int, help="offline gradient steps per trial")
    p.add_argument("--steps-per-iteration", type=int, help="gradient steps per training iteration (Tune report)")
    p.add_argument("--eval-every", type=int, help="gradient steps between evaluations")
    p.add_argument("--eval-episodes", type=int)
    p.add_argument("--batch-size", type=int, help="chunks per gradient step")
    p.add_argument("--num-samples", type=int, help="search preset: Optuna trials")
    p.add_argument("--max-concurrent", type=int, help="search preset: trials at once")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[METHOD.]KEY=VALUE")
    online = p.add_argument_group("online fine-tuning (after the offline steps)")
    online.add_argument("--online-steps", type=int, help="env steps online (0 = offline only)")
    online.add_argument("--online-eval-every", type=int, help="env steps between online evaluations")
    online.add_argument("--utd-ratio", type=float, help="gradient steps per env step")
    online.add_argument("--start-training", type=int, help="env steps collected before the first online update")
    online.add_argument("--env-runners", type=int, help="EnvRunner actors per trial")
    online.add_argument("--envs-per-env-runner", type=int)
    online.add_argument("--rollout-fragment-length", type=int, help="chunks per env and iteration")
    online.add_argument("--cpus-per-env-runner", type=float)
    online.add_argument("--offline-checkpoint", help="skip the offline phase: start from this algorithm checkpoint "
                        "(one trial only)")
    online.add_argument("--continue-run", help="MLflow run id the trial continues instead of a new child run "
                        "(one trial only)")
    p.add_argument("--dataset-dir", help="OGBench dataset folder (default: the preset's, else OGBench's download "
                   "dir): <domain>-v0.npz and -val.npz per domain; 100M datasets as folders <domain>-100m-v0/ of "
                   "shards (*.npz, trained in sorted order; *-val.npz skipped)")
    p.add_argument("--dataset-size", choices=DATASET_SIZE_CHOICES,
                   help="1M: the standard files; paper: 100M shards for cube-quadruple and puzzle-4x4 as the paper "
                        "trains them (the paper presets' default); 100M: shards for every domain")
    p.add_argument("--dataset-url", help="download missing standard files from this mirror of OGBench's host "
                   "(default: $QAM_RAY_DATASET_URL, else the official host)")
    p.add_argument("--generate", action="store_true", help="generate the preset's dataset into --dataset-dir if it "
                   "is missing (without this flag only the preset's own folder is generated into)")
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--gpus-per-trial", type=float, default=0, help="fractions let several trials share a GPU")
    p.add_argument("--storage-path", default="ray_results", help="Tune results and checkpoints (shared on clusters)")
    p.add_argument("--name", help="sweep name (default: qam-<preset>); also the MLflow tag `sweep`")
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else sqlite:///<abs>/mlflow.db")
    p.add_argument("--experiment", default="qam_ray", help="MLflow experiment")
    p.add_argument("--max-failures", type=int, default=3, help="restarts of a failed trial from its checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the trial summary and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="with --dry-run: every trial row")
    p.add_argument("--resume", action="store_true", help="continue the sweep --name from its checkpoints")
    return p, p.parse_args(argv)


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # SIGTERM ends the sweep cleanly
    parser, args = parse_args(argv)
    flags = {field: getattr(args, field) for field in PRESET_FLAGS} | {"overrides": args.overrides}
    preset, specs, errors = resolve(args.preset, flags, gpus_per_trial=args.gpus_per_trial,
                                    cpus_per_trial=args.cpus_per_trial, offline_checkpoint=args.offline_checkpoint,
                                    continue_run=args.continue_run)
    if errors:
        parser.error("\n  " + "\n  ".join(errors))
    name = args.name or f"qam-{args.preset}"
    off_protocol = off_protocol_domains(preset)
    if off_protocol:
        print(f"note: {', '.join(off_protocol)} train on their standard 1M files; the paper trains them on 100M "
              "shards (--dataset-size paper), so the results table marks these cells.", file=sys.stderr)
    if args.dry_run:
        print(dry_run_summary(preset, specs, name, verbose=args.verbose))
        return 0
    options = SweepOptions(name=name, preset_name=args.preset, storage_path=args.storage_path,
                           tracking_uri=args.tracking_uri, experiment=args.experiment,
                           cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                           max_failures=args.max_failures, resume=args.resume)
    errors = preflight_errors(preset, options, generate=args.generate or args.dataset_dir is None)
    if errors:
        parser.exit(2, "sweep.py: error:\n  " + "\n  ".join(errors) + "\n")
    return run_sweep(preset, specs, options)


if __name__ == "__main__":
    sys.exit(main())

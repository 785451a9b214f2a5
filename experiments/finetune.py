"""Offline-to-online fine-tuning on OGBench: one Tune trial per method with EnvRunner rollouts, logged to MLflow.

    python experiments/finetune.py --preset smoke --methods QAM FQL  # tiny offline + online runs on generated data
    python experiments/finetune.py --preset paper --env cube-double-play-singletask-task2-v0 --methods QAM-E \
        --dataset-dir /data/ogbench                               # 1M offline steps, then 500K online env steps
    python experiments/finetune.py --mlflow-run RUN_ID             # online phase of a finished sweep trial,
                                                                  # continuing its MLflow run on the same timeline
    python experiments/finetune.py --checkpoint runs/demo/checkpoint --env cube-single-play-singletask-task2-v0 \
        --dataset-dir data/generated --online-steps 50000          # from any algorithm checkpoint (train.py --out)

The run is a sweep of one trial per method (``experiments/sweep.py`` presets ``smoke-online`` / ``paper-online``), so it has the
sweep's checkpoints, retries, ``--resume`` and MLflow layout; every other flag is passed on to sweep.py
(``--online-steps``, ``--utd-ratio``, ``--start-training``, ``--online-eval-every``, ``--env-runners``,
``--envs-per-env-runner``, ``--rollout-fragment-length``, ``--tracking-uri``, ``--storage-path``, ``--name``,
``--set key=value``, ...).  Step on the MLflow timeline: gradient steps offline, offline steps + env steps online.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

try:
    import qam_ray  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qam_ray.agents import METHOD_NAMES
from qam_ray.domains import parse_singletask_name

SWEEP_PRESETS = {"smoke": "smoke-online", "paper": "paper-online"}


def load_sweep():
    """experiments/sweep.py as a module (this script's sibling, not part of the package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweep.py")
    spec = importlib.util.spec_from_file_location("qam_sweep_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SWEEP_PRESETS), default="paper",
                   help="budget: smoke (seconds, CI) or paper (QAM_SPEC §9)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--mlflow-run", help="start from this sweep trial's latest checkpoint and continue its run")
    source.add_argument("--checkpoint", help="start from this algorithm checkpoint (a save_to_path folder)")
    p.add_argument("--env", help="singletask name, e.g. cube-double-play-singletask-task2-v0 (smoke default: "
                                 "cube-single-play-singletask-task2-v0)")
    p.add_argument("--methods", nargs="+", choices=METHOD_NAMES, metavar="METHOD",
                   help=f"paper labels (default QAM): {', '.join(METHOD_NAMES)}")
    p.add_argument("--seed", type=int)
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else sqlite:///<abs>/mlflow.db")
    args, passthrough = p.parse_known_args(argv)
    if args.mlflow_run and (args.env or args.methods or args.seed is not None):
        p.error("--mlflow-run takes the method, task, seed and hyperparameters from the run; "
                "drop --env/--methods/--seed")
    if args.checkpoint and (not args.env or len(args.methods or ["QAM"]) != 1):
        p.error("--checkpoint needs --env and one method (--methods, default QAM) to build the matching algorithm")
    return p, args, passthrough


def sweep_argv(args, passthrough: list[str]) -> list[str]:
    """The one-trial sweep.py command line for these arguments."""
    argv = ["--preset", SWEEP_PRESETS[args.preset]]
    if args.tracking_uri:
        argv += ["--tracking-uri", args.tracking_uri]
    if args.mlflow_run:
        from qam_ray.orchestration.tracking import default_tracking_uri, run_checkpoint

        checkpoint, spec = run_checkpoint(args.tracking_uri or default_tracking_uri(os.getcwd()), args.mlflow_run)
        if spec.get("online_steps"):
            raise ValueError(f"run {args.mlflow_run} already has an online phase ({spec['online_steps']} env steps); "
                             "to finish an interrupted one, rerun its sweep with --resume")
        argv += ["--domains", spec["domain"], "--tasks", str(spec["task"]), "--methods", spec["method"],
                 "--seeds", str(spec["seed"]), "--offline-checkpoint", checkpoint, "--continue-run", args.mlflow_run,
                 "--eval-episodes", str(spec["eval_episodes"]), "--batch-size", str(spec["batch_size"])]
        if spec["dataset_dir"]:
            argv += ["--dataset-dir", spec["dataset_dir"]]
        argv += ["--dataset-size", spec.get("dataset_size", "1M")]
        for key, value in spec["overrides"].items():
            argv += ["--set", f"{spec['method']}.{key}={value!r}"]
        name = f"finetune-{args.mlflow_run[:8]}"
    else:
        env = args.env or "cube-single-play-singletask-task2-v0"
        parsed = parse_singletask_name(env)
        methods, seed = args.methods or ["QAM"], 0 if args.seed is None else args.seed
        argv += ["--domains", parsed.domain_name, "--tasks", str(parsed.task), "--methods", *methods,
                 "--seeds", str(seed)]
        if args.checkpoint:
            argv += ["--offline-checkpoint", args.checkpoint]
        name = f"finetune-{args.preset}-{parsed.domain_name}-task{parsed.task}-{'-'.join(methods)}-seed{seed}"
    if "--name" not in passthrough:
        argv += ["--name", name]
    return argv + passthrough


def main(argv=None) -> int:
    parser, args, passthrough = parse_args(argv)
    try:
        command = sweep_argv(args, passthrough)
    except ValueError as exc:
        parser.error(str(exc))
    print("sweep.py " + " ".join(command))
    status = load_sweep().main(command)
    if status == 0:
        report_transfer(command, args.tracking_uri)
    return status


def report_transfer(command: list[str], tracking_uri: str | None) -> None:
    """The SMAC paper's transfer metrics of this fine-tune's runs: logged to each MLflow run as ``transfer/drop``,
    ``transfer/regret`` and ``transfer/normalised_regret`` (regrets relative to the runs of this fine-tune), and
    printed per run."""
    from qam_ray.orchestration.analysis import load_runs, log_transfer_metrics, run_transfer_metrics
    from qam_ray.orchestration.tracking import default_tracking_uri

    def flag(name: str, default: str) -> str:  # its last value on the sweep.py command line, as argparse reads it
        values = [command[i + 1] for i, word in enumerate(command[:-1]) if word == name]
        return values[-1] if values else default

    uri = tracking_uri or default_tracking_uri(os.getcwd())
    per_run, _, _ = run_transfer_metrics(load_runs([flag("--experiment", "qam_ray")], uri, flag("--name", "")), uri)
    if per_run.empty:
        return
    log_transfer_metrics(per_run, uri)
    columns = ["method", "domain", "task", "seed", "offline_final", "online_final", "drop", "regret",
               "normalised_regret"]
    print("\nOffline→online transfer (success in %; drop = offline final − online minimum; regret = mean shortfall "
          "from the best run on the task):\n" + per_run[columns].to_string(index=False, float_format="%.1f"))


if __name__ == "__main__":
    sys.exit(main())

"""Sweep QAM over OGBench domains × tasks × seeds × variants with Ray Tune, logging to MLflow.

    python experiments/sweep.py --preset quickstart                   # generated data, minutes on a laptop CPU
    python experiments/sweep.py --preset paper --dataset-dir /data/ogbench --gpus-per-trial 0.25 --dry-run
    python experiments/sweep.py --preset search --domains cube-double-play --tasks 2 --variants QAM-E
    python experiments/sweep.py --preset paper-online --dataset-dir /data/ogbench --env-runners 2 --dry-run
    ray job submit --working-dir . -- python experiments/sweep.py --preset smoke

Presets: ``paper`` (10 domains × tasks 1-5 × 12 seeds × QAM/QAM-E/QAM-F, 1M steps, evaluation every 50K steps
with 50 episodes), ``search`` (Optuna over τ and the variant's other knobs with ASHA early stopping on
success), ``quickstart`` (generated cube-single data, small networks) and ``smoke`` (CI, tiny).
``paper-online`` and ``smoke-online`` add online fine-tuning after the offline steps in the same trial and MLflow
run (500K env steps for the paper, UTD 1, updates from 5K env steps, one EnvRunner like the reference's single
env; ``--env-runners`` / ``--envs-per-env-runner`` collect in parallel).  Any flag
overrides the preset; ``--set key=value`` overrides any QAM hyperparameter.  Tracking: MLFLOW_TRACKING_URI, or
sqlite:///<absolute path>/mlflow.db.  ``--resume`` continues an interrupted sweep from its checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

try:
    import qam_ray  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo; also silences GLFW's DISPLAY warning

from qam_ray.domains import DOMAIN_NAMES, VARIANTS, domain_of_env
from qam_ray.training import hyperparams_for_env, parse_overrides

PAPER_SEEDS = [10001 * k for k in range(1, 13)]  # the official reproduce.py seeds
TINY = {"actor_hidden_dims": (16, 16), "value_hidden_dims": (16, 16), "num_qs": 2, "flow_steps": 3}
SMALL = {"actor_hidden_dims": (256, 256), "value_hidden_dims": (256, 256), "num_qs": 4}


@dataclasses.dataclass
class Preset:
    domains: list[str]
    tasks: list[int]
    seeds: list[int]
    variants: list[str]
    steps: int
    steps_per_iteration: int
    eval_every: int
    eval_episodes: int
    checkpoint_every: int  # iterations
    overrides: dict = dataclasses.field(default_factory=dict)
    batch_size: int = 256
    dataset_dir: str | None = None
    generate: tuple[str, str, int] | None = None  # (env, type, episodes) to generate into dataset_dir if missing
    search: bool = False
    num_samples: int = 1
    max_concurrent: int = 2
    # Online fine-tuning after the offline steps (QAM_SPEC §9); online_steps = 0 trains offline only.
    online_steps: int = 0
    online_eval_every: int = 50_000  # env steps
    utd_ratio: float = 1.0
    start_training: int = 5000
    env_runners: int = 1  # the reference collects with one env
    envs_per_env_runner: int = 1
    rollout_fragment_length: int = 20  # chunks per env and iteration
    cpus_per_env_runner: float = 1.0


PRESETS = {
    "paper": Preset(list(DOMAIN_NAMES), [1, 2, 3, 4, 5], PAPER_SEEDS, list(VARIANTS), steps=1_000_000,
                    steps_per_iteration=1000, eval_every=50_000, eval_episodes=50, checkpoint_every=50),
    "search": Preset(["cube-double-play"], [2], [0], ["QAM"], steps=200_000, steps_per_iteration=1000,
                     eval_every=20_000, eval_episodes=25, checkpoint_every=20, search=True, num_samples=24,
                     max_concurrent=4),
    "quickstart": Preset(["cube-single-play"], [2], [0, 1], ["QAM"], steps=2000, steps_per_iteration=250,
                         eval_every=1000, eval_episodes=10, checkpoint_every=4, overrides=dict(SMALL),
                         dataset_dir="data/generated", generate=("cube-single", "play", 40)),
    "smoke": Preset(["cube-single-play"], [2], [0, 1], ["QAM"], steps=8, steps_per_iteration=4, eval_every=8,
                    eval_episodes=1, checkpoint_every=1, overrides=dict(TINY), batch_size=16,
                    dataset_dir="data/smoke", generate=("cube-single", "play", 2)),
}
# Offline → online: the paper's 1M offline + 500K online env steps, and a tiny CI version on 2 EnvRunners.
PRESETS["paper-online"] = dataclasses.replace(PRESETS["paper"], online_steps=500_000)
PRESETS["smoke-online"] = dataclasses.replace(
    PRESETS["smoke"], seeds=[0], online_steps=100, online_eval_every=100, start_training=50, env_runners=2,
    rollout_fragment_length=5, cpus_per_env_runner=0.5)
ONLINE_FIELDS = ("online_steps", "online_eval_every", "utd_ratio", "start_training", "env_runners",
                 "envs_per_env_runner", "rollout_fragment_length", "cpus_per_env_runner")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quickstart")
    p.add_argument("--domains", nargs="+", help=f"paper domains ({', '.join(DOMAIN_NAMES)}) or generated ones")
    p.add_argument("--tasks", nargs="+", type=int)
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--variants", nargs="+", choices=VARIANTS)
    p.add_argument("--steps", type=int, help="offline gradient steps per trial")
    p.add_argument("--steps-per-iteration", type=int, help="gradient steps per training iteration (Tune report)")
    p.add_argument("--eval-every", type=int, help="gradient steps between evaluations")
    p.add_argument("--eval-episodes", type=int)
    p.add_argument("--batch-size", type=int, help="chunks per gradient step")
    p.add_argument("--num-samples", type=int, help="search preset: Optuna trials")
    p.add_argument("--max-concurrent", type=int, help="search preset: trials at once")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
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
    p.add_argument("--dataset-dir", help="OGBench dataset folder (default: the preset's, else OGBench's download dir)")
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--gpus-per-trial", type=float, default=0, help="fractions let several trials share a GPU")
    p.add_argument("--storage-path", default="ray_results", help="Tune results and checkpoints (shared on clusters)")
    p.add_argument("--name", help="sweep name (default: qam-<preset>); also the MLflow tag `sweep`")
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else sqlite:///<abs>/mlflow.db")
    p.add_argument("--experiment", default="qam_ray", help="MLflow experiment")
    p.add_argument("--max-failures", type=int, default=3, help="restarts of a failed trial from its checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the trial table and exit")
    p.add_argument("--resume", action="store_true", help="continue the sweep --name from its checkpoints")
    return p, p.parse_args(argv)


def resolve(parser, args) -> tuple[Preset, list[dict]]:
    """The preset with the flags applied, and one spec per grid trial; every problem is reported before Ray."""
    preset = dataclasses.replace(PRESETS[args.preset])
    preset.overrides = dict(preset.overrides)  # replace() is shallow: --set must not leak into PRESETS
    for field in ("domains", "tasks", "seeds", "variants", "steps", "steps_per_iteration", "eval_every",
                  "eval_episodes", "batch_size", "num_samples", "max_concurrent", "dataset_dir", *ONLINE_FIELDS):
        if getattr(args, field) is not None:
            setattr(preset, field, getattr(args, field))
    try:
        preset.overrides.update(parse_overrides(args.overrides))
    except ValueError as exc:
        parser.error(str(exc))
    errors = []
    if preset.eval_every % preset.steps_per_iteration or preset.steps % preset.eval_every:
        errors.append(f"--eval-every {preset.eval_every} must be a multiple of {preset.steps_per_iteration} "
                      f"and divide --steps {preset.steps}")
    if any(t not in range(1, 6) for t in preset.tasks):
        errors.append(f"--tasks {preset.tasks}: tasks are 1..5")
    if preset.search and len(preset.domains) * len(preset.tasks) * len(preset.variants) != 1:
        errors.append("the search preset tunes one domain, task and variant at a time: pass one of each")
    errors += online_errors(preset, args)
    for domain in preset.domains:
        for variant in preset.variants:
            try:
                hyperparams_for_env(f"{domain}-singletask-task1-v0", variant, 1, 1, preset.overrides)
            except (ValueError, TypeError) as exc:
                errors.append(f"{domain} / {variant}: {exc}")
    if errors:
        parser.error("\n  " + "\n  ".join(errors))
    if preset.dataset_dir is not None:
        preset.dataset_dir = os.path.abspath(preset.dataset_dir)
    specs = [
        {"domain": d, "task": t, "variant": v, "seed": s, "dataset_dir": preset.dataset_dir, "steps": preset.steps,
         "steps_per_iteration": preset.steps_per_iteration, "eval_every": preset.eval_every,
         "eval_episodes": preset.eval_episodes, "checkpoint_every": preset.checkpoint_every,
         "batch_size": preset.batch_size, "overrides": dict(preset.overrides), "gpus": args.gpus_per_trial,
         "threads": max(1, int(args.cpus_per_trial)), **{k: getattr(preset, k) for k in ONLINE_FIELDS},
         "offline_checkpoint": args.offline_checkpoint and os.path.abspath(args.offline_checkpoint),
         "mlflow_run_id": args.continue_run}
        for d in preset.domains for t in preset.tasks for v in preset.variants for s in preset.seeds
    ]
    return preset, specs


def online_errors(preset: Preset, args) -> list[str]:
    errors = []
    if preset.online_steps < 0 or preset.utd_ratio <= 0 or preset.start_training < 0:
        errors.append("--online-steps and --start-training must be >= 0 and --utd-ratio > 0")
    if preset.online_steps and (preset.env_runners < 1 or preset.envs_per_env_runner < 1
                                or preset.rollout_fragment_length < 1 or preset.online_eval_every < 1):
        errors.append("--env-runners, --envs-per-env-runner, --rollout-fragment-length and --online-eval-every "
                      "must be >= 1 for an online phase")
    single = len(preset.domains) * len(preset.tasks) * len(preset.variants) * len(preset.seeds) == 1
    for flag, value in (("--offline-checkpoint", args.offline_checkpoint), ("--continue-run", args.continue_run)):
        if value and not single:
            errors.append(f"{flag} belongs to one trial: pass one domain, task, variant and seed")
    if args.offline_checkpoint:
        if not preset.online_steps:
            errors.append("--offline-checkpoint starts the online phase: set --online-steps")
        if not os.path.isdir(os.path.join(args.offline_checkpoint, "learner_group")):
            errors.append(f"--offline-checkpoint {args.offline_checkpoint}: no learner_group/ folder; pass a folder "
                          "written by algo.save_to_path (train.py --out DIR writes DIR/checkpoint)")
    return errors


def check_data(preset: Preset) -> None:
    """Generate the preset's data if it asks for it; otherwise fail before Ray when a local dataset is missing."""
    if preset.dataset_dir is None:
        return  # OGBench's own folder: the trial downloads what is missing
    if preset.generate is not None:
        env, kind, episodes = preset.generate
        if not os.path.exists(os.path.join(preset.dataset_dir, f"{env}-{kind}-v0.npz")):
            from qam_ray.data.generate import generate_dataset

            generate_dataset(env, kind, episodes=episodes, seed=0, out_dir=preset.dataset_dir,
                             episode_length=1001 if episodes > 5 else 100, workers=min(2, os.cpu_count() or 1))
    for domain in preset.domains:
        name = domain_of_env(f"{domain}-singletask-task1-v0").name
        if not os.path.exists(os.path.join(preset.dataset_dir, f"{name}-v0.npz")):
            raise SystemExit(f"error: {preset.dataset_dir}/{name}-v0.npz is missing. Stage the official file there, "
                             f"or generate one: python experiments/generate_data.py --env {name.rsplit('-', 1)[0]} "
                             f"--type {name.rsplit('-', 1)[1]} --episodes 100 --out {preset.dataset_dir}")


def warn_about_100m_domains(preset: Preset) -> None:
    """The paper trains cube-quadruple and puzzle-4x4 on 100M-transition datasets; we have no loader for them yet."""
    from qam_ray.domains import get_domain

    shards = [d for d in preset.domains if d in DOMAIN_NAMES and get_domain(d).dataset_size == "100M"]
    if shards:
        print(f"WARNING: the paper trains {', '.join(shards)} on their 100M-transition datasets; the 100M loader is "
              "not implemented yet, so these trials use the standard dataset files and their results are not "
              "comparable with the paper's for these domains.", file=sys.stderr)


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    preset, specs = resolve(parser, args)
    name = args.name or f"qam-{args.preset}"
    warn_about_100m_domains(preset)
    if args.dry_run:
        import pandas as pd

        table = pd.DataFrame(specs)[["domain", "task", "variant", "seed", "steps", "eval_every", "online_steps",
                                     "env_runners", "dataset_dir"]]
        print(table.to_string() if not preset.search else f"search over {preset.num_samples} Optuna trials of\n{table}")
        print(f"{len(specs) if not preset.search else preset.num_samples} trials, sweep {name!r}")
        return 0
    check_data(preset)

    import ray
    from ray import tune

    from qam_ray.sweep_trial import optuna_space, qam_trial
    from qam_ray.tracking import default_tracking_uri, ensure_experiment, git_commit, parent_run

    storage = os.path.abspath(args.storage_path)
    uri = args.tracking_uri or default_tracking_uri(os.getcwd())
    experiment_id = ensure_experiment(uri, args.experiment)
    parent = parent_run(uri, experiment_id, name, {"preset": args.preset, "algo": "QAM"})
    commit = git_commit(os.path.dirname(os.path.abspath(__file__)))
    tracking = {"uri": uri, "experiment_id": experiment_id, "parent_run_id": parent, "sweep": name}
    path = os.path.join(storage, name)
    for spec in specs:
        spec.update(tracking=tracking, git_commit=commit, results_dir=path)
    ray.init(ignore_reinit_error=True, include_dashboard=False)
    # The trial's own bundle (learner, evaluation) plus one per EnvRunner, which RLlib starts inside the trial.
    runners = preset.env_runners if preset.online_steps else 0
    trial_bundle = {"CPU": args.cpus_per_trial, **({"GPU": args.gpus_per_trial} if args.gpus_per_trial else {})}
    resources = tune.PlacementGroupFactory([trial_bundle] + [{"CPU": preset.cpus_per_env_runner}] * runners)
    trainable = tune.with_resources(tune.with_parameters(qam_trial, base_spec=specs[0]), resources)
    if args.resume:
        if not tune.Tuner.can_restore(path):
            raise SystemExit(f"error: nothing to resume at {path}; run without --resume first")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        run_config = tune.RunConfig(
            name=name, storage_path=storage, failure_config=tune.FailureConfig(max_failures=args.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        )
        if preset.search:
            from ray.tune.schedulers import ASHAScheduler
            from ray.tune.search import ConcurrencyLimiter
            from ray.tune.search.optuna import OptunaSearch

            iterations = preset.steps // preset.steps_per_iteration
            per_eval = preset.eval_every // preset.steps_per_iteration
            searcher = ConcurrencyLimiter(
                OptunaSearch(space=functools.partial(optuna_space, variant=specs[0]["variant"]),
                             metric="success_rate", mode="max",
                             seed=specs[0]["seed"]), max_concurrent=preset.max_concurrent)
            tune_config = tune.TuneConfig(
                search_alg=searcher, num_samples=preset.num_samples,
                scheduler=ASHAScheduler(metric="success_rate", mode="max", max_t=iterations, grace_period=2 * per_eval))
            tuner = tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)
        else:
            tuner = tune.Tuner(trainable, param_space={"spec": tune.grid_search(specs)}, run_config=run_config)
    results = tuner.fit()
    errors = [r.error for r in results if r.error is not None]
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_terminated(parent, "FAILED" if errors else "FINISHED")
    print(f"sweep {name!r}: {len(results)} trials, {len(errors)} failed; MLflow {uri} "
          f"(experiment {args.experiment!r}, parent run {parent}); Tune results in {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

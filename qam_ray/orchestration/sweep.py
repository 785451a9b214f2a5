"""Run a resolved sweep with Ray Tune: one function trial per spec (grid) or Optuna define-by-run trials (search),
each logging to one MLflow child run under the sweep's parent run."""

from __future__ import annotations

import dataclasses
import functools
import os

from qam_ray.orchestration.presets import Preset


@dataclasses.dataclass
class SweepOptions:
    name: str
    preset_name: str
    storage_path: str = "ray_results"
    tracking_uri: str | None = None
    experiment: str = "qam_ray"
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    max_failures: int = 3
    resume: bool = False


def dry_run_summary(preset: Preset, specs: list[dict], name: str, verbose: bool = False) -> str:
    """Trials per method × domain, the seeds and budget; with ``verbose`` every row."""
    import pandas as pd

    table = pd.DataFrame(specs)
    lines = [f"sweep {name!r}: " + (f"search over {preset.num_samples} Optuna trials of" if preset.search else
                                    f"{len(specs)} trials")]
    counts = table.groupby(["domain", "method"]).size().unstack("method", fill_value=0)
    lines.append(counts.to_string())
    lines.append(f"tasks {preset.tasks}, seeds {preset.seeds}; {preset.steps:,} offline steps"
                 + (f" + {preset.online_steps:,} online env steps" if preset.online_steps else "")
                 + f", evaluation every {preset.eval_every:,} steps with {preset.eval_episodes} episodes")
    if verbose:
        lines.append(table[["method", "domain", "task", "seed", "steps", "eval_every", "online_steps",
                            "env_runners", "dataset_dir"]].to_string())
    return "\n".join(lines)


def run_sweep(preset: Preset, specs: list[dict], options: SweepOptions) -> int:
    """Start (or ``resume``) the sweep; returns 0 when every trial finished, 1 otherwise."""
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    from qam_ray.orchestration.tracking import default_tracking_uri, ensure_experiment, git_commit, parent_run
    from qam_ray.orchestration.trial import agent_trial, optuna_space

    storage = os.path.abspath(options.storage_path)
    uri = options.tracking_uri or default_tracking_uri(os.getcwd())
    experiment_id = ensure_experiment(uri, options.experiment)
    parent = parent_run(uri, experiment_id, options.name,
                        {"preset": options.preset_name, "methods": " ".join(preset.methods)})
    commit = git_commit(os.path.dirname(os.path.abspath(__file__)))
    tracking = {"uri": uri, "experiment_id": experiment_id, "parent_run_id": parent, "sweep": options.name}
    path = os.path.join(storage, options.name)
    for spec in specs:
        spec.update(tracking=tracking, git_commit=commit, results_dir=path)
    ray.init(ignore_reinit_error=True, include_dashboard=False)
    # The trial's own bundle (learner, evaluation) plus one per EnvRunner, which RLlib starts inside the trial.
    runners = preset.env_runners if preset.online_steps else 0
    trial_bundle = {"CPU": options.cpus_per_trial, **({"GPU": options.gpus_per_trial} if options.gpus_per_trial else {})}
    resources = tune.PlacementGroupFactory([trial_bundle] + [{"CPU": preset.cpus_per_env_runner}] * runners)
    trainable = tune.with_resources(tune.with_parameters(agent_trial, base_spec=specs[0]), resources)
    if options.resume:
        if not tune.Tuner.can_restore(path):
            raise SystemExit(f"error: nothing to resume at {path}; run without --resume first")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        run_config = tune.RunConfig(
            name=options.name, storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        )
        if preset.search:
            from ray.tune.schedulers import ASHAScheduler
            from ray.tune.search import ConcurrencyLimiter
            from ray.tune.search.optuna import OptunaSearch

            iterations = preset.steps // preset.steps_per_iteration
            per_eval = preset.eval_every // preset.steps_per_iteration
            searcher = ConcurrencyLimiter(
                OptunaSearch(space=functools.partial(optuna_space, method=specs[0]["method"]),
                             metric="success_rate", mode="max", seed=specs[0]["seed"]),
                max_concurrent=preset.max_concurrent)
            tune_config = tune.TuneConfig(
                search_alg=searcher, num_samples=preset.num_samples,
                scheduler=ASHAScheduler(metric="success_rate", mode="max", max_t=iterations, grace_period=2 * per_eval))
            tuner = tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)
        else:
            tuner = tune.Tuner(trainable, param_space={"spec": tune.grid_search(specs)}, run_config=run_config)
    results = tuner.fit()
    errors = [r.error for r in results if r.error is not None]
    MlflowClient(uri).set_terminated(parent, "FAILED" if errors else "FINISHED")
    print(f"sweep {options.name!r}: {len(results)} trials, {len(errors)} failed; MLflow {uri} "
          f"(experiment {options.experiment!r}, parent run {parent}); Tune results in {path}")
    return 1 if errors else 0

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


def preflight_errors(preset: Preset, options: SweepOptions, generate: bool) -> list[str]:
    """Everything outside the command line, checked before Ray starts or anything is written."""
    from qam_ray.orchestration.checks import (ray_address_errors, resource_errors, storage_path_errors,
                                              tracking_uri_errors)
    from qam_ray.orchestration.presets import data_errors
    from qam_ray.orchestration.tracking import default_tracking_uri

    address = os.environ.get("RAY_ADDRESS")
    uri = options.tracking_uri or default_tracking_uri(os.getcwd())
    source = "--tracking-uri" if options.tracking_uri else ("MLFLOW_TRACKING_URI" if os.environ.get(
        "MLFLOW_TRACKING_URI") else "the default tracking URI")
    runner_cpus = preset.env_runners * preset.cpus_per_env_runner if preset.online_steps else 0.0
    errors = tracking_uri_errors(uri, source) + ray_address_errors(address) + storage_path_errors(
        options.storage_path) + resource_errors(options.cpus_per_trial, options.gpus_per_trial, runner_cpus,
                                                local=not address or address == "local")
    if not isinstance(options.max_failures, int) or options.max_failures < 0:
        errors.append(f"--max-failures {options.max_failures}: must be an integer >= 0")
    path = os.path.join(os.path.abspath(options.storage_path), options.name)
    if options.resume:
        from ray.tune import Tuner

        if not Tuner.can_restore(path):
            errors.append(f"--resume: no sweep {options.name!r} to resume at {path}; run it without --resume first")
    elif not options.resume and os.path.exists(path):
        errors.append(f"a sweep named {options.name!r} already exists at {path}: pass --resume to continue it, or "
                      "--name for a new sweep")
    return errors + (data_errors(preset, generate) if not errors else [])


def run_sweep(preset: Preset, specs: list[dict], options: SweepOptions) -> int:
    """Start (or ``resume``) the sweep; returns 0 when every trial finished, 1 otherwise.  The parent run ends
    FINISHED, FAILED (a trial failed) or KILLED (the driver was interrupted)."""
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    from qam_ray.orchestration.tracking import default_tracking_uri, ensure_experiment, git_commit, parent_run
    from qam_ray.orchestration.trial import agent_trial, optuna_space, run_name

    storage = os.path.abspath(options.storage_path)
    uri = options.tracking_uri or default_tracking_uri(os.getcwd())
    path = os.path.join(storage, options.name)
    if not options.resume:
        try:  # claims the name: a second sweep of the same name started at the same moment is refused here
            os.makedirs(path)
        except FileExistsError:
            raise SystemExit(f"error: a sweep named {options.name!r} already exists at {path}: pass --resume to "
                             "continue it, or --name for a new sweep") from None
    try:
        experiment_id = ensure_experiment(uri, options.experiment)
        parent = parent_run(uri, experiment_id, options.name,
                            {"preset": options.preset_name, "methods": " ".join(preset.methods)})
    except BaseException:
        if not options.resume:  # the sweep never started: give its name back
            os.rmdir(path)
        raise
    client = MlflowClient(uri)
    status = "KILLED"
    try:
        client.update_run(parent, status="RUNNING")
        commit = git_commit(os.path.dirname(os.path.abspath(__file__)))
        tracking = {"uri": uri, "experiment_id": experiment_id, "parent_run_id": parent, "sweep": options.name}
        for spec in specs:
            spec.update(tracking=tracking, git_commit=commit, results_dir=path)
        ray.init(ignore_reinit_error=True, include_dashboard=False)
        # The trial's own bundle (learner, evaluation) plus one per EnvRunner, which RLlib starts inside the trial.
        runners = preset.env_runners if preset.online_steps else 0
        trial_bundle = {"CPU": options.cpus_per_trial,
                        **({"GPU": options.gpus_per_trial} if options.gpus_per_trial else {})}
        resources = tune.PlacementGroupFactory([trial_bundle] + [{"CPU": preset.cpus_per_env_runner}] * runners)
        trainable = tune.with_resources(tune.with_parameters(agent_trial, base_spec=specs[0]), resources)
        if options.resume:
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        else:
            run_config = tune.RunConfig(
                name=options.name, storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=options.max_failures),
            )  # trials keep their own checkpoints (orchestration.trial.save_checkpoint)
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
                    scheduler=ASHAScheduler(metric="success_rate", mode="max", max_t=iterations,
                                            grace_period=2 * per_eval))
                tuner = tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)
            else:
                tuner = tune.Tuner(trainable, param_space={"spec": tune.grid_search(specs)}, run_config=run_config)
        results = tuner.fit()
        failures = failed_trials(results, run_name)
        status = "FAILED" if failures else "FINISHED"
    except Exception:
        status = "FAILED"
        raise
    finally:  # KILLED when interrupted (Ctrl-C, SIGTERM): neither the parent nor a child stays RUNNING
        close_runs(client, experiment_id, parent, status)
    print(f"sweep {options.name!r}: {len(results)} trials, {len(failures)} failed; MLflow {uri} "
          f"(experiment {options.experiment!r}, parent run {parent}); Tune results in {path}")
    for name, reason in failures:
        print(f"  FAILED {name}: {reason}")
    return 1 if failures else 0


def close_runs(client, experiment_id: str, parent: str, status: str) -> None:
    """End the parent run with ``status`` and any child still RUNNING (its trial was interrupted) as KILLED; a
    resumed trial reopens its run."""
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and "
                                  "attributes.status = 'RUNNING'")
    for run in children:
        client.set_terminated(run.info.run_id, "KILLED")
    client.set_terminated(parent, status)


def failed_trials(results, run_name) -> list[tuple[str, str]]:
    """(trial, one-line reason) of every trial that raised (after its retries) or ended with a ``trial_error``."""
    failures = []
    for result in results:
        spec = (result.config or {}).get("spec") or {}
        name = run_name(spec) if spec else result.path.rsplit("/", 1)[-1]
        if result.error is not None:
            failures.append((name, str(result.error).strip().splitlines()[-1][:300]))
        elif (result.metrics or {}).get("trial_error"):
            failures.append((name, f"{result.metrics['trial_error']} (not retried: a retry cannot change it)"))
    return failures

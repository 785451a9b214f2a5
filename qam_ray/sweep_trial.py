"""One Tune trial: offline QAM through the RLlib algorithm, with MLflow logging and checkpoint/resume.

The trial's ``spec`` (plain values, built by ``experiments/sweep.py``) names the task, variant, seed, data,
budget and tracking target.  Progress reaches MLflow only after the checkpoint that covers it is saved, and the
not-yet-logged metrics travel inside that checkpoint (``MetricBuffer``); the child run is found again by the
Tune trial id.  So a trial restarted after a failure, or by ``--resume``, continues the same run from the
checkpoint step with every step logged exactly once.
"""

from __future__ import annotations

import json
import os
import tempfile

TRIAL_STATE = "trial.json"


def optuna_space(trial, variant: str) -> dict:
    """Optuna define-by-run space of the search preset: τ on a log scale, the ensemble pessimism ρ and the
    variant's own knob.  Module-level so Tune can pickle the searcher into its checkpoints."""
    values = {"inv_temp": trial.suggest_float("inv_temp", 0.03, 100.0, log=True),
              "rho": trial.suggest_float("rho", 0.0, 1.0)}
    if variant == "QAM-E":
        values["edit_scale"] = trial.suggest_float("edit_scale", 0.02, 0.9, log=True)
    if variant == "QAM-F":
        values["fql_alpha"] = trial.suggest_float("fql_alpha", 1.0, 1000.0, log=True)
    return values


def qam_trial(config: dict, base_spec: dict | None = None) -> None:
    """Tune function trainable.  ``config["spec"]`` (grid sweeps) or ``base_spec`` plus top-level search values
    (Optuna define-by-run) give the trial; top-level values override hyperparameters."""
    import torch
    from ray import tune

    from qam_ray.rllib.algorithm import build_qam_config
    from qam_ray.tracking import MetricBuffer

    spec = dict(config.get("spec") or base_spec)
    spec["overrides"] = {**spec["overrides"], **{k: v for k, v in config.items() if k != "spec"}}
    torch.set_num_threads(spec["threads"])
    iterations_per_eval = spec["eval_every"] // spec["steps_per_iteration"]
    qam_config = build_qam_config(
        spec["domain"], spec["task"], spec["variant"], dataset_dir=spec["dataset_dir"], overrides=spec["overrides"],
        steps_per_iteration=spec["steps_per_iteration"], batch_size=spec["batch_size"],
        eval_interval=iterations_per_eval, eval_episodes=spec["eval_episodes"], seed=spec["seed"],
        gpus_per_learner=spec["gpus"],
    )
    algo = qam_config.build_algo()
    state = {"step": 0, "curve": [], "pending": []}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            algo.restore_from_path(os.path.join(directory, "algorithm"))
            with open(os.path.join(directory, TRIAL_STATE)) as f:
                state = json.load(f)
    obs_dim, chunk = qam_config.observation_space.shape[0], qam_config.action_space.shape[0]
    hyperparams = vars(qam_config.qam_hyperparams(obs_dim, chunk // qam_config.horizon_length))
    run_id = _find_or_create_run(spec, hyperparams, algo.dataset_info)
    metrics = MetricBuffer(spec["tracking"]["uri"], run_id, state["pending"])
    metrics.flush(skip_logged=True)  # what the restored checkpoint covers but a killed run may not have logged
    iteration, step = 0, state["step"]
    while step < spec["steps"]:
        result = algo.train()
        iteration += 1
        step = int(result["num_gradient_steps_lifetime"])
        learner = dict(result["learners"]["default_policy"])
        logged = {"perf/updates_per_s": learner.pop("updates_per_s"), **{f"train/{k}": v for k, v in learner.items()}}
        report = {"step": step, "total_loss": learner["total_loss"]}
        if "evaluation" in result:
            runners = result["evaluation"]["env_runners"]
            logged["eval/success_rate"] = report["success_rate"] = float(runners["success_rate"])
            logged["eval/episode_length"] = float(runners["episode_env_steps"])
            state["curve"].append([step, report["success_rate"]])
        metrics.add(logged, step)
        state["step"] = step
        if step >= spec["steps"] or iteration % spec["checkpoint_every"] == 0:
            state["pending"] = metrics.pending
            with tempfile.TemporaryDirectory() as directory:
                algo.save_to_path(os.path.join(directory, "algorithm"))
                with open(os.path.join(directory, TRIAL_STATE), "w") as f:
                    json.dump(state, f)
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(directory))
            metrics.flush()  # only now is this progress safe from a restart
        else:
            tune.report(report)
    _finish_run(spec, run_id, hyperparams, state["curve"])
    algo.stop()


def _run_tags(spec: dict, dataset_info: dict) -> dict[str, str]:
    from ray import tune

    return {
        "algo": "QAM", "variant": spec["variant"], "domain": spec["domain"], "task": str(spec["task"]),
        "env_name": f"{spec['domain']}-singletask-task{spec['task']}-v0", "seed": str(spec["seed"]),
        "dataset_source": dataset_info["dataset_source"], "dataset_sha256": dataset_info["dataset_sha256"],
        "sweep": spec["tracking"]["sweep"], "git_commit": spec["git_commit"],
        "tune_trial_id": tune.get_context().get_trial_id(), "tune_trial_dir": tune.get_context().get_trial_dir(),
    }


def _find_or_create_run(spec: dict, hyperparams: dict, dataset_info: dict) -> str:
    """The trial's child run; a restarted trial (same Tune trial id) gets its run back instead of a duplicate."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from qam_ray.tracking import trial_run

    tracking = spec["tracking"]
    client = MlflowClient(tracking["uri"])
    trial_id = tune.get_context().get_trial_id()
    found = client.search_runs(
        [tracking["experiment_id"]],
        filter_string=f"tags.tune_trial_id = '{trial_id}' and tags.sweep = '{tracking['sweep']}'", max_results=1,
    )
    if found:
        return found[0].info.run_id
    params = {**hyperparams, **{k: spec[k] for k in ("steps", "steps_per_iteration", "batch_size", "eval_every",
                                                     "eval_episodes", "seed", "variant", "gpus", "threads")}}
    name = f"{spec['variant']}-{spec['domain']}-task{spec['task']}-seed{spec['seed']}"
    return trial_run(tracking["uri"], tracking["experiment_id"], tracking["parent_run_id"], name,
                     _run_tags(spec, dataset_info), params)


def _finish_run(spec: dict, run_id: str, hyperparams: dict, curve: list) -> None:
    """Artifacts: the resolved config, the checkpoint reference and the learning curve; then mark it finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient
    from ray import tune

    client = MlflowClient(spec["tracking"]["uri"])
    client.log_dict(run_id, {"spec": spec, "hyperparams": hyperparams}, "config/resolved_config.json")
    client.log_dict(run_id, {"tune_trial_dir": tune.get_context().get_trial_dir(),
                             "note": "the latest checkpoint_* folder holds algorithm/ (QAM.from_checkpoint)"},
                    "checkpoint_reference.json")
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "learning_curve.png")
        fig, ax = plt.subplots(figsize=(5, 3.2))
        if curve:
            steps, success = zip(*curve)
            ax.plot(steps, [100 * s for s in success], marker="o")
        ax.set(title=f"{spec['variant']} {spec['domain']} task {spec['task']} seed {spec['seed']}",
               xlabel="gradient steps", ylabel="success rate (%)", ylim=(-2, 102))
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        client.log_artifact(run_id, path)
    client.set_terminated(run_id, "FINISHED")

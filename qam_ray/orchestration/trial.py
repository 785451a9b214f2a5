"""One Tune trial: any registered method offline, then optionally online fine-tuning, through the RLlib algorithm,
with MLflow logging and checkpoint/resume.

The trial's ``spec`` (plain values, built by ``presets.resolve``) names the method, task, seed, data, budget and
tracking target.  Progress reaches MLflow only after the checkpoint that covers it is saved, and the
not-yet-logged metrics travel inside that checkpoint (``MetricBuffer``); the child run is found again by the
Tune trial id.  So a trial restarted after a failure, or by ``--resume``, continues the same run from the
checkpoint step with every step logged exactly once.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

from qam_ray.orchestration.tracking import CHECKPOINT_DIR_TAG

TRIAL_STATE = "trial.json"


def optuna_space(trial, method: str) -> dict:
    """Optuna define-by-run space of the search preset: the method's own (``Agent.search_space``).  Module-level,
    so Tune can pickle the searcher into its checkpoints."""
    from qam_ray.agents import agent_class

    return agent_class(method).search_space(trial, method)


def agent_trial(config: dict, base_spec: dict | None = None) -> None:
    """Tune function trainable.  ``config["spec"]`` (grid sweeps) or ``base_spec`` plus top-level search values
    (Optuna define-by-run) give the trial; top-level values override hyperparameters.

    Phases: offline (``steps`` gradient steps, skipped when ``offline_checkpoint`` names a finished one), then
    online when ``online_steps`` > 0.  One MLflow run covers both on one timeline: step = gradient steps
    offline, offline steps + env steps online (the paper's curves).
    """
    import torch
    from ray import tune

    from qam_ray.orchestration.tracking import MetricBuffer

    spec = dict(config.get("spec") or base_spec)
    spec["overrides"] = {**spec["overrides"], **{k: v for k, v in config.items() if k != "spec"}}
    torch.set_num_threads(spec["threads"])
    online = spec.get("online_steps", 0) > 0
    state = {"phase": "online" if spec.get("offline_checkpoint") else "offline", "step": 0, "offline_steps": None,
             "curve": [], "pending": []}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            with open(os.path.join(directory, TRIAL_STATE)) as f:
                state = json.load(f)
            algo = _build_algo(spec, state["phase"], offline_checkpoint=None)
            algo.restore_from_path(os.path.join(directory, "algorithm"))
    else:
        algo = _build_algo(spec, state["phase"], offline_checkpoint=spec.get("offline_checkpoint"))
    hyperparams = _hyperparams(algo.config)
    run_id = spec.get("mlflow_run_id") or _find_or_create_run(spec, hyperparams, algo.dataset_info)
    if spec.get("mlflow_run_id"):  # a continued run: its checkpoints now live with this trial
        _add_params(spec, run_id, _online_params(spec))
        from mlflow.tracking import MlflowClient

        MlflowClient(spec["tracking"]["uri"]).set_tag(run_id, CHECKPOINT_DIR_TAG, _checkpoint_dir(spec))
    metrics = MetricBuffer(spec["tracking"]["uri"], run_id, state["pending"])
    metrics.flush(skip_logged=True)  # what the restored checkpoint covers but a killed run may not have logged

    if state["phase"] == "offline":
        _run_phase(algo, spec, state, metrics, _offline_row, done=lambda step: step >= spec["steps"])
        if online:
            with tempfile.TemporaryDirectory() as directory:  # hand the learner state to the online algorithm
                algo.save_to_path(directory)
                algo.stop()
                algo = _build_algo(spec, "online", offline_checkpoint=directory)
            state["phase"] = "online"
    if state["phase"] == "online":
        if state["offline_steps"] is None:  # the learner's gradient steps when the online phase began
            state["offline_steps"] = algo.learner_value(lambda learner: learner.gradient_steps)
        offset = state["offline_steps"]
        _run_phase(algo, spec, state, metrics, lambda result: _online_row(result, offset),
                   done=lambda step: step - offset >= spec["online_steps"])
    _finish_run(spec, run_id, hyperparams, state["curve"])
    algo.stop()


def _build_algo(spec: dict, phase: str, offline_checkpoint: str | None):
    from qam_ray.rllib import build_agent_config

    config = build_agent_config(
        spec["method"], spec["domain"], spec["task"], dataset_dir=spec["dataset_dir"], overrides=spec["overrides"],
        steps_per_iteration=spec["steps_per_iteration"], batch_size=spec["batch_size"],
        eval_interval=spec["eval_every"] // spec["steps_per_iteration"], eval_episodes=spec["eval_episodes"],
        seed=spec["seed"], gpus_per_learner=spec["gpus"],
    )
    if phase == "online":
        config = (config.online(spec["online_steps"], utd_ratio=spec["utd_ratio"], start_training=spec["start_training"],
                                eval_every=spec["online_eval_every"], offline_checkpoint=offline_checkpoint)
                  .env_runners(num_env_runners=spec["env_runners"], num_envs_per_env_runner=spec["envs_per_env_runner"],
                               num_cpus_per_env_runner=spec["cpus_per_env_runner"],
                               rollout_fragment_length=spec["rollout_fragment_length"]))
    return config.build_algo()


def _hyperparams(config) -> dict:
    return vars(config.hyperparams_for_spaces())


def _offline_row(result: dict) -> tuple[int, dict, dict]:
    """(step, metrics to log, Tune report) of an offline iteration."""
    step = int(result["num_gradient_steps_lifetime"])
    learner = dict(result["learners"]["default_policy"])
    logged = {"perf/updates_per_s": learner.pop("updates_per_s"), **{f"train/{k}": v for k, v in learner.items()}}
    return step, logged, {"step": step, "total_loss": learner["total_loss"]}


def _online_row(result: dict, offline_steps: int) -> tuple[int, dict, dict]:
    """(step, metrics, report) of an online iteration; step = offline gradient steps + env steps."""
    online = result["online"]
    step = offline_steps + int(online["env_steps"])
    logged = {f"online/{k}": online[k] for k in ("env_steps", "buffer_size", "gradient_steps")}
    logged.update({f"perf/{k}": online[k] for k in ("env_steps_per_s", "sample_s", "update_s")})
    report = {"step": step, "env_steps": int(online["env_steps"])}
    if online["updates"]:
        learner = result["learners"]["default_policy"]
        logged["perf/updates_per_s"] = online["updates_per_s"]
        logged.update({f"train/{k}": v for k, v in learner.items()})
        report["total_loss"] = learner["total_loss"]
    runners = result.get("env_runners", {})
    if math.isfinite(runners.get("success_rate", math.nan)):  # NaN in iterations where no episode ended
        logged["online/episode_success"] = runners["success_rate"]
        logged["online/episode_length"] = runners["episode_env_steps"]
    return step, logged, report


def _run_phase(algo, spec: dict, state: dict, metrics, row, done) -> None:
    """Train until ``done(step)``; log each iteration, evaluate on the algorithm's schedule, checkpoint every
    ``checkpoint_every`` iterations and at the end, flushing metrics only once a checkpoint covers them."""
    from ray import tune

    iteration = 0
    while not done(state["step"]):
        result = algo.train()
        iteration += 1
        step, logged, report = row(result)
        if "evaluation" in result:
            runners = result["evaluation"]["env_runners"]
            logged["eval/success_rate"] = report["success_rate"] = float(runners["success_rate"])
            logged["eval/episode_length"] = float(runners["episode_env_steps"])
            state["curve"].append([step, report["success_rate"]])
        metrics.add(logged, step)
        state["step"] = step
        if done(step) or iteration % spec["checkpoint_every"] == 0:
            state["pending"] = metrics.pending
            with tempfile.TemporaryDirectory() as directory:
                algo.save_to_path(os.path.join(directory, "algorithm"))
                with open(os.path.join(directory, TRIAL_STATE), "w") as f:
                    json.dump(state, f)
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(directory))
            metrics.flush()  # only now is this progress safe from a restart
        else:
            tune.report(report)


ONLINE_PARAMS = ("online_steps", "utd_ratio", "start_training", "online_eval_every", "env_runners",
                 "envs_per_env_runner", "rollout_fragment_length")


def _online_params(spec: dict) -> dict:
    return {k: spec[k] for k in ONLINE_PARAMS} if spec.get("online_steps", 0) > 0 else {}


def _add_params(spec: dict, run_id: str, params: dict) -> None:
    """Log the params a continued run does not have yet (MLflow params are write-once)."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(spec["tracking"]["uri"])
    existing = client.get_run(run_id).data.params
    new = [Param(k, str(v)) for k, v in sorted(params.items()) if k not in existing]
    if new:
        client.log_batch(run_id, params=new)


def _run_tags(spec: dict, dataset_info: dict) -> dict[str, str]:
    from ray import tune

    return {
        "agent": spec["agent"], "method": spec["method"], "domain": spec["domain"], "task": str(spec["task"]),
        "env_name": f"{spec['domain']}-singletask-task{spec['task']}-v0", "seed": str(spec["seed"]),
        "dataset_source": dataset_info["dataset_source"], "dataset_sha256": dataset_info["dataset_sha256"],
        "sweep": spec["tracking"]["sweep"], "git_commit": spec["git_commit"],
        "tune_trial_id": tune.get_context().get_trial_id(), "tune_trial_dir": tune.get_context().get_trial_dir(),
        CHECKPOINT_DIR_TAG: _checkpoint_dir(spec),
    }


def _checkpoint_dir(spec: dict) -> str:
    """Where Tune persists this trial's checkpoints: <storage>/<sweep>/<trial folder> (same folder name as the
    local trial dir)."""
    from ray import tune

    return os.path.join(spec["results_dir"], os.path.basename(tune.get_context().get_trial_dir()))


def run_name(spec: dict) -> str:
    """``<method> <domain> t<task> s<seed>``: the runs of a sweep told apart at a glance."""
    return f"{spec['method']} {spec['domain']} t{spec['task']} s{spec['seed']}"


def _find_or_create_run(spec: dict, hyperparams: dict, dataset_info: dict) -> str:
    """The trial's child run; a restarted trial (same Tune trial id) gets its run back instead of a duplicate."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from qam_ray.orchestration.tracking import trial_run

    tracking = spec["tracking"]
    client = MlflowClient(tracking["uri"])
    trial_id = tune.get_context().get_trial_id()
    found = client.search_runs(
        [tracking["experiment_id"]],
        filter_string=f"tags.tune_trial_id = '{trial_id}' and tags.sweep = '{tracking['sweep']}'", max_results=1,
    )
    if found:
        return found[0].info.run_id
    params = {**hyperparams, **_online_params(spec),
              **{k: spec[k] for k in ("steps", "steps_per_iteration", "batch_size", "eval_every", "eval_episodes",
                                      "seed", "method", "gpus", "threads")}}
    name = run_name(spec)
    return trial_run(tracking["uri"], tracking["experiment_id"], tracking["parent_run_id"], name,
                     _run_tags(spec, dataset_info), params)


def _finish_run(spec: dict, run_id: str, hyperparams: dict, curve: list) -> None:
    """Artifacts: the resolved config, the checkpoint reference and the learning curve; then mark it finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(spec["tracking"]["uri"])
    client.log_dict(run_id, {"spec": spec, "hyperparams": hyperparams}, "config/resolved_config.json")
    client.log_dict(run_id, {"checkpoint_dir": _checkpoint_dir(spec),
                             "note": "its latest checkpoint_* folder holds algorithm/ (AgentAlgorithm.from_checkpoint; "
                                     "experiments/finetune.py --mlflow-run <run id>)"},
                    "checkpoint_reference.json")
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "learning_curve.png")
        fig, ax = plt.subplots(figsize=(5, 3.2))
        if curve:
            steps, success = zip(*curve)
            ax.plot(steps, [100 * s for s in success], marker="o")
        ax.set(title=run_name(spec),
               xlabel="gradient steps" + (" + online env steps" if spec.get("online_steps") else ""),
               ylabel="success rate (%)", ylim=(-2, 102))
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        client.log_artifact(run_id, path)
    client.set_terminated(run_id, "FINISHED")

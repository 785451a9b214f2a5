"""One Tune trial: any registered method offline, then optionally online fine-tuning, through the RLlib algorithm,
with MLflow logging and checkpoint/resume.

The trial's ``spec`` (plain values, built by ``presets.resolve``) names the method, task, seed, data, budget and
tracking target.  The trial keeps its own checkpoints in its folder under the storage path (``save_checkpoint``)
and restarts from the newest.  Progress reaches MLflow only after the checkpoint that covers it is saved, and the
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
POLICY_TAG = "policy_model_uri"  # on finished trial runs: mlflow.pyfunc.load_model(<it>).predict(observations)


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

    The run is created (or found again) before anything is built, so every failure reaches it: it is marked FAILED
    with the error.  Errors a retry cannot change (non-finite losses, bad data, an invalid config) end the trial
    with a ``trial_error`` report instead of an exception, so Tune does not retry them.
    """
    import torch
    from ray import tune

    from qam_ray.orchestration.tracking import MetricBuffer, mark_failed

    spec = dict(config.get("spec") or base_spec)
    spec["overrides"] = {**spec["overrides"], **{k: v for k, v in config.items() if k != "spec"}}
    torch.set_num_threads(spec["threads"])
    online = spec.get("online_steps", 0) > 0
    starts_online = bool(spec.get("offline_checkpoint")) or not _has_offline_phase(spec)
    state = {"phase": "online" if starts_online else "offline", "step": 0, "offline_steps": None,
             "curve": [], "pending": []}
    run_id, algo = None, None
    try:
        fresh_config = _algo_config(spec, state["phase"], offline_checkpoint=spec.get("offline_checkpoint"))
        hyperparams = vars(fresh_config.hyperparams_for_spaces())
        run_id = spec.get("mlflow_run_id") or _find_or_create_run(spec, hyperparams)
        if spec.get("mlflow_run_id"):  # a continued run: its checkpoints now live with this trial
            _add_params(spec, run_id, _online_params(spec))
        checkpoints = trial_checkpoints(_checkpoint_dir(spec))
        if checkpoints:  # a retried or resumed trial
            algo, state = restore_newest_readable(spec, checkpoints)
        else:
            algo = fresh_config.build_algo()
        _set_run_tags(spec, run_id, algo.dataset_info)
        # Steps MLflow already holds are never logged again, whichever checkpoint Tune restored.
        metrics = MetricBuffer(spec["tracking"]["uri"], run_id, state["pending"])
        metrics.flush()

        if state["phase"] == "offline":
            _run_phase(algo, spec, state, metrics, _offline_row, done=lambda step: step >= spec["steps"])
            if online:
                with tempfile.TemporaryDirectory() as directory:  # hand the learner state to the online algorithm
                    algo.save_to_path(directory)
                    algo.stop()
                    algo = _algo_config(spec, "online", offline_checkpoint=directory).build_algo()
                state["phase"] = "online"
        if state["phase"] == "online":
            if state["offline_steps"] is None:  # the learner's gradient steps when the online phase began
                state["offline_steps"] = algo.learner_value(lambda learner: learner.gradient_steps)
            offset = state["offline_steps"]
            _run_phase(algo, spec, state, metrics, lambda result: _online_row(result, offset),
                       done=lambda step: step - offset >= spec["online_steps"])
        _finish_run(spec, run_id, hyperparams, state["curve"],
                    algo.learner_value(lambda learner: learner.agent_module.agent))
    except Exception as error:
        if run_id is not None:
            mark_failed(spec["tracking"]["uri"], run_id, error)
        if not isinstance(error, not_retried_errors()):
            raise
        # A retry would fail the same way: end the trial with the reason instead of raising.
        tune.report({"trial_error": f"{type(error).__name__}: {error}".splitlines()[0][:500],
                     "success_rate": float("nan"), "step": state["step"]})
    finally:
        if algo is not None:
            algo.stop()


def _has_offline_phase(spec: dict) -> bool:
    """False for a method without offline data (``Agent.OFFLINE_DATA``) or a budget of 0 offline steps: the trial
    starts with the online phase, from fresh learners."""
    from qam_ray.agents import agent_class

    return agent_class(spec["method"]).OFFLINE_DATA and spec["steps"] > 0


def not_retried_errors() -> tuple[type[Exception], ...]:
    """Errors that a retry of the same trial cannot change."""
    from qam_ray.data.ogbench_data import DatasetError, DatasetUnavailableError
    from qam_ray.rllib.algorithm import InvalidConfigError
    from qam_ray.training import NonFiniteLossError

    return NonFiniteLossError, DatasetError, DatasetUnavailableError, InvalidConfigError


def _algo_config(spec: dict, phase: str, offline_checkpoint: str | None):
    from qam_ray.rllib import build_agent_config

    config = build_agent_config(
        spec["method"], spec["domain"], spec["task"], dataset_dir=spec["dataset_dir"],
        dataset_size=spec.get("dataset_size", "1M"), dataset_url=spec.get("dataset_url"), overrides=spec["overrides"],
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
    return config


def _offline_row(result: dict) -> tuple[int, dict, dict]:
    """(step, metrics to log, Tune report) of an offline iteration."""
    step = int(result["num_gradient_steps_lifetime"])
    learner = dict(result["learners"]["default_policy"])
    updates_per_s = learner.pop("updates_per_s")
    logged = {"perf/updates_per_s": updates_per_s, **{f"train/{k}": v for k, v in learner.items()}}
    return step, logged, {"step": step, "total_loss": learner["total_loss"], "updates_per_s": updates_per_s}


def _online_row(result: dict, offline_steps: int) -> tuple[int, dict, dict]:
    """(step, metrics, report) of an online iteration; step = offline gradient steps + env steps."""
    online = result["online"]
    step = offline_steps + int(online["env_steps"])
    logged = {f"online/{k}": online[k] for k in ("env_steps", "buffer_size", "gradient_steps")}
    logged.update({f"perf/{k}": online[k] for k in ("env_steps_per_s", "sample_s", "update_s")})
    report = {"step": step, "env_steps": int(online["env_steps"])}
    if online["updates"]:
        learner = result["learners"]["default_policy"]
        logged["perf/updates_per_s"] = report["updates_per_s"] = online["updates_per_s"]
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
        # Every report carries the latest evaluation (NaN before the first), as schedulers and searchers need.
        report.setdefault("success_rate", state["curve"][-1][1] if state["curve"] else float("nan"))
        metrics.add(logged, step)
        state["step"] = step
        if done(step) or iteration % spec["checkpoint_every"] == 0:
            state["pending"] = metrics.pending
            save_checkpoint(_checkpoint_dir(spec), step, algo, state)
            metrics.flush()  # only now is this progress safe from a restart
        tune.report(report)


CHECKPOINTS = "checkpoints"  # <trial folder>/checkpoints/step_<N>/{algorithm/, trial.json}
KEEP_CHECKPOINTS = 2


def save_checkpoint(trial_dir: str, step: int, algo, state: dict) -> str:
    """Write ``step_<N>`` atomically (a complete folder or none) into the trial's own folder and keep the latest two.

    The trial keeps its checkpoints itself instead of handing them to Tune: after a driver kill Tune restores from
    its last snapshot of the experiment, which can name a checkpoint its own ``num_to_keep`` has already deleted,
    and the trial could then never start again.  The trial folder lives under the sweep's storage path, which
    every trial can reach (a local or shared filesystem).
    """
    import shutil

    root = os.path.join(trial_dir, CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".saving-", dir=root)
    algo.save_to_path(os.path.join(staging, "algorithm"))
    with open(os.path.join(staging, TRIAL_STATE), "w") as f:
        json.dump(state, f)
    final = os.path.join(root, f"step_{step:012d}")
    if os.path.exists(final):  # a replay of a step after a restart: the newer save wins
        shutil.rmtree(final)
    os.replace(staging, final)
    for old in sorted(d for d in os.listdir(root) if d.startswith("step_"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def trial_checkpoints(trial_dir: str) -> list[str]:
    """A trial's complete checkpoint folders, oldest first."""
    root = os.path.join(trial_dir, CHECKPOINTS)
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
    return [os.path.join(root, step) for step in steps]


def restore_newest_readable(spec: dict, checkpoints: list[str]):
    """The algorithm restored from the newest checkpoint that reads back (a damaged one falls back to the one before
    it), and that checkpoint's trial state.  None readable: an InvalidConfigError naming the folders, which a retry
    cannot change."""
    from qam_ray.rllib.algorithm import InvalidConfigError

    problems = []
    for folder in reversed(checkpoints):
        try:
            with open(os.path.join(folder, TRIAL_STATE)) as f:
                state = json.load(f)
        except (OSError, ValueError) as error:
            problems.append(f"{folder}: {type(error).__name__}: {error}".splitlines()[0])
            continue
        algo = _algo_config(spec, state["phase"], offline_checkpoint=None).build_algo()
        try:
            algo.restore_from_path(os.path.join(folder, "algorithm"))
            return algo, state
        except Exception as error:  # noqa: BLE001 - try the older one, and report every reason
            algo.stop()
            problems.append(f"{folder}: {type(error).__name__}: {error}".splitlines()[0])
            print(f"warning: checkpoint {folder} cannot be restored ({problems[-1]}); trying an older one")
    raise InvalidConfigError("no checkpoint of this trial can be restored: " + "; ".join(problems) +
                             ". Remove the damaged folders to start the trial over.")


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


def _run_tags(spec: dict) -> dict[str, str]:
    from ray import tune

    return {
        "agent": spec["agent"], "method": spec["method"], "domain": spec["domain"], "task": str(spec["task"]),
        "env_name": f"{spec['domain']}-singletask-task{spec['task']}-v0", "seed": str(spec["seed"]),
        "sweep": spec["tracking"]["sweep"], "git_commit": spec["git_commit"],
        "tune_trial_id": tune.get_context().get_trial_id(), "tune_trial_dir": _checkpoint_dir(spec),
    }


def _set_run_tags(spec: dict, run_id: str, dataset_info: dict) -> None:
    """What is known once the algorithm is built: the dataset (also as the run's MLflow dataset input), and where
    this trial keeps its checkpoints."""
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    from qam_ray.orchestration.tracking import log_dataset_input

    tags = {"dataset_source": dataset_info["dataset_source"], "dataset_sha256": dataset_info["dataset_sha256"],
            "dataset_size": dataset_info["dataset_size"], CHECKPOINT_DIR_TAG: _checkpoint_dir(spec)}
    MlflowClient(spec["tracking"]["uri"]).log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    if dataset_info["path"] is not None:  # an online-only method trains on no dataset
        log_dataset_input(spec["tracking"]["uri"], run_id, dataset_info)


def _checkpoint_dir(spec: dict) -> str:
    """Where Tune persists this trial's checkpoints: <storage>/<sweep>/<trial folder> (same folder name as the
    local trial dir)."""
    from ray import tune

    return os.path.join(spec["results_dir"], os.path.basename(tune.get_context().get_trial_dir()))


def run_name(spec: dict) -> str:
    """``<method> <domain> t<task> s<seed>``: the runs of a sweep told apart at a glance."""
    return f"{spec['method']} {spec['domain']} t{spec['task']} s{spec['seed']}"


def _find_or_create_run(spec: dict, hyperparams: dict) -> str:
    """The trial's child run; a restarted trial (same Tune trial id) gets its run back, RUNNING again, instead of a
    duplicate."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from qam_ray.orchestration.tracking import reopen_run, trial_run

    tracking = spec["tracking"]
    client = MlflowClient(tracking["uri"])
    trial_id = tune.get_context().get_trial_id()
    found = client.search_runs(
        [tracking["experiment_id"]],
        filter_string=f"tags.tune_trial_id = '{trial_id}' and tags.sweep = '{tracking['sweep']}'", max_results=1,
    )
    if found:
        reopen_run(tracking["uri"], found[0].info.run_id)
        return found[0].info.run_id
    params = {**hyperparams, **_online_params(spec),
              **{k: spec[k] for k in ("steps", "steps_per_iteration", "batch_size", "eval_every", "eval_episodes",
                                      "seed", "method", "gpus", "threads")}}
    name = run_name(spec)
    return trial_run(tracking["uri"], tracking["experiment_id"], tracking["parent_run_id"], name, _run_tags(spec),
                     params)


def _finish_run(spec: dict, run_id: str, hyperparams: dict, curve: list, agent) -> None:
    """Artifacts: the resolved config, the checkpoint reference, the learning curve and the final policy as an MLflow
    model (its URI in the ``policy_model_uri`` tag); then mark it finished."""
    from qam_ray.orchestration.policy_model import log_policy

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(spec["tracking"]["uri"])
    client.log_dict(run_id, {"spec": spec, "hyperparams": hyperparams}, "config/resolved_config.json")
    client.log_dict(run_id, {"checkpoint_dir": _checkpoint_dir(spec),
                             "note": f"its latest {CHECKPOINTS}/step_* folder holds algorithm/ "
                                     "(AgentAlgorithm.from_checkpoint; experiments/finetune.py --mlflow-run <run id>)"},
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
    policy_uri = log_policy(spec["tracking"]["uri"], run_id, spec["method"], agent, spec["seed"])
    client.set_tag(run_id, POLICY_TAG, policy_uri)
    client.set_terminated(run_id, "FINISHED")

"""MLflow tracking for sweeps: one parent run per sweep, one child run per trial, explicit run ids.

Everything goes through ``MlflowClient`` with explicit run ids (no global active run), so the driver and
every trial process can write safely, and a restored trial keeps writing to its own run.  With no
``MLFLOW_TRACKING_URI`` the store is ``sqlite:///<absolute path>/mlflow.db`` with artifacts in an absolute folder
beside it: trials run in Ray's session directories, so nothing may be relative.
"""

from __future__ import annotations

import os
import subprocess
import time

DEFAULT_EXPERIMENT = "qam_ray"
ROLE_TAG = "qam_ray.role"  # "sweep" on parent runs, "trial" on child runs
CHECKPOINT_DIR_TAG = "checkpoint_dir"  # on trial runs: the folder of the trial's Tune checkpoints


def default_tracking_uri(base_dir: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath(base_dir)}/mlflow.db"


def ensure_experiment(tracking_uri: str, name: str = DEFAULT_EXPERIMENT) -> str:
    """The experiment's id, creating it with an absolute artifact location next to a local sqlite store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        artifact_location = "file://" + os.path.join(os.path.dirname(tracking_uri[len("sqlite:///"):]), "mlartifacts")
    return client.create_experiment(name, artifact_location=artifact_location)


def parent_run(tracking_uri: str, experiment_id: str, sweep: str, tags: dict[str, str]) -> str:
    """The sweep's parent run: reused when it exists (``--resume``), created otherwise."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.sweep = '{sweep}' and tags.`{ROLE_TAG}` = 'sweep'", max_results=1
    )
    if existing:
        return existing[0].info.run_id
    run = client.create_run(experiment_id, run_name=sweep, tags={**tags, "sweep": sweep, ROLE_TAG: "sweep"})
    return run.info.run_id


def trial_run(tracking_uri: str, experiment_id: str, parent_run_id: str, name: str, tags: dict[str, str],
              params: dict) -> str:
    """A child run of the sweep with the trial's tags and every hyperparameter as a param."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.create_run(
        experiment_id, run_name=name, tags={**tags, "mlflow.parentRunId": parent_run_id, ROLE_TAG: "trial"}
    )
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
    return run.info.run_id


class MetricBuffer:
    """Metrics held back until the checkpoint that covers them is saved, then written in batches.

    The pending entries are also stored in that checkpoint (``pending``): a trial killed between saving it and
    flushing restores them and logs what MLflow lacks (``flush(skip_logged=True)``).  After a restart the run's
    history therefore has every step exactly once.
    """

    def __init__(self, tracking_uri: str, run_id: str, pending=()):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._pending = [tuple(entry) for entry in pending]  # (key, value, timestamp ms, step)

    @property
    def pending(self) -> list[list]:
        return [list(entry) for entry in self._pending]

    def add(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._pending += [(k, float(v), now, int(step)) for k, v in metrics.items()]

    def flush(self, skip_logged: bool = False) -> None:
        """Write the pending entries; with ``skip_logged``, only steps past each metric's last logged step."""
        if not self._pending:
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        entries = self._pending
        if skip_logged:
            last = {key: max((m.step for m in client.get_metric_history(self.run_id, key)), default=-1)
                    for key in {entry[0] for entry in entries}}
            entries = [entry for entry in entries if entry[3] > last[entry[0]]]
        metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step in entries]
        for start in range(0, len(metrics), 1000):  # MLflow's log_batch limit
            client.log_batch(self.run_id, metrics=metrics[start:start + 1000])
        self._pending = []


def git_commit(path: str) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_checkpoint(tracking_uri: str, run_id: str) -> tuple[str, dict]:
    """The latest algorithm checkpoint of a sweep trial's run and the trial's resolved spec.

    Raises ValueError naming what is missing: the run, its ``checkpoint_dir`` tag (set by sweep trials), a
    ``checkpoint_*/algorithm`` folder there, or the ``config/resolved_config.json`` artifact of a finished trial.
    """
    import json
    import tempfile

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"MLflow run {run_id!r} not found in {tracking_uri}; check --tracking-uri") from None
    folder = run.data.tags.get(CHECKPOINT_DIR_TAG)
    if not folder:
        raise ValueError(f"run {run_id} has no checkpoint_dir tag (it is not a sweep trial): pass --checkpoint PATH")
    checkpoints = sorted(d for d in os.listdir(folder) if d.startswith("checkpoint_")) if os.path.isdir(folder) else []
    checkpoints = [os.path.join(folder, d, "algorithm") for d in checkpoints
                   if os.path.isdir(os.path.join(folder, d, "algorithm"))]
    if not checkpoints:
        raise ValueError(f"no checkpoint_*/algorithm folder in {folder} (run {run_id}); was the storage path moved? "
                         "pass --checkpoint PATH")
    with tempfile.TemporaryDirectory() as directory:
        try:
            path = client.download_artifacts(run_id, "config/resolved_config.json", directory)
        except (MlflowException, OSError):
            raise ValueError(f"run {run_id} has no config/resolved_config.json: only finished trials can be "
                             "continued by run id; pass --checkpoint PATH and the task flags instead") from None
        with open(path) as f:
            spec = json.load(f)["spec"]
    return checkpoints[-1], spec

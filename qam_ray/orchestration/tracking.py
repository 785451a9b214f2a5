"""MLflow tracking for sweeps: one parent run per sweep, one child run per trial, explicit run ids.

Everything goes through ``MlflowClient`` with explicit run ids (no global active run), so the driver and
every trial process can write safely, and a restored trial keeps writing to its own run.  With no
``MLFLOW_TRACKING_URI`` the store is ``sqlite:///<absolute path>/mlflow.db`` with artifacts in an absolute folder
beside it: trials run in Ray's session directories, so nothing may be relative.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import traceback

DEFAULT_EXPERIMENT = "qam_ray"
ROLE_TAG = "qam_ray.role"  # "sweep" on parent runs, "trial" on child runs
CHECKPOINT_DIR_TAG = "checkpoint_dir"  # on trial runs: the trial's folder, which holds its checkpoints/
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def default_tracking_uri(base_dir: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath(base_dir)}/mlflow.db"


@contextlib.contextmanager
def store_lock(tracking_uri: str):
    """For a local sqlite store, an exclusive lock on ``<db>.lock`` while the store and its experiment are created:
    two sweeps starting together would otherwise both run MLflow's schema migration and one would crash."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = os.path.abspath(tracking_uri[len("sqlite:///"):]) + ".lock"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_experiment(tracking_uri: str, name: str = DEFAULT_EXPERIMENT) -> str:
    """The experiment's id, creating it (and the store) with an absolute artifact location next to a local sqlite
    store; safe when several sweeps start at once."""
    from mlflow.tracking import MlflowClient

    with store_lock(tracking_uri):
        client = MlflowClient(tracking_uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        artifact_location = None
        if tracking_uri.startswith("sqlite:///"):
            artifact_location = "file://" + os.path.join(os.path.dirname(tracking_uri[len("sqlite:///"):]),
                                                         "mlartifacts")
        # MLflow 3's UI opens an experiment of this kind on its training runs, not on GenAI traces.
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: "custom_model_development"})


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


def log_dataset_input(tracking_uri: str, run_id: str, dataset_info: dict) -> None:
    """The run's training dataset as an MLflow dataset input (the runs table's Dataset column): its file, name,
    digest (SHA-256 prefix) and whether it is official or generated."""
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.tracking import MlflowClient

    # MLflow registers its local-file source twice (once per scheme), which alone makes it warn: name the first.
    local = next(source for source in get_registered_sources() if source.__name__ == "LocalArtifactDatasetSource")
    dataset = MetaDataset(resolve_dataset_source(dataset_info["path"], candidate_sources=[local]),
                          name=f"{dataset_info['name']} ({dataset_info['dataset_source']})",
                          digest=dataset_info["dataset_sha256"][:16])
    tags = [InputTag("mlflow.data.context", "training"), InputTag("source", dataset_info["dataset_source"]),
            InputTag("transitions", str(dataset_info["transitions"]))]
    MlflowClient(tracking_uri).log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), tags=tags)])


ERROR_TAG = "error"  # on a failed run: the one-line reason (the traceback is its errors/ artifact)


def mark_failed(tracking_uri: str, run_id: str, error: BaseException) -> None:
    """Mark a run FAILED with the reason as a tag and the traceback as an artifact (never raises: the original
    error is what matters)."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri)
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:5000]
        client.set_tag(run_id, ERROR_TAG, reason)
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        client.log_text(run_id, text, f"errors/{time.strftime('%Y%m%d-%H%M%S')}-{type(error).__name__}.txt")
        client.set_terminated(run_id, "FAILED")
    except Exception as tracking_error:  # noqa: BLE001 - report, but never hide the trial's own error
        print(f"warning: could not mark MLflow run {run_id} FAILED: {tracking_error}")


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """A retried or resumed trial's run is RUNNING again; an earlier attempt's error stays in its errors/ artifact."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    client.update_run(run_id, status="RUNNING")
    if ERROR_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, ERROR_TAG)


def last_logged_steps(tracking_uri: str, run_id: str) -> dict[str, int]:
    """The highest step MLflow holds for each metric of a run (empty for a new run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    keys = client.get_run(run_id).data.metrics
    return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in keys}


# Errors of a tracking server whose database is momentarily saturated (many trials writing to one sqlite-backed
# server): the batch's transaction never ran, so sending it again cannot duplicate a point.  MLflow answers them
# with HTTP 400, which its client does not retry.
TRANSIENT_STORE_ERRORS = ("QueuePool limit", "database is locked")
BATCH_RETRY_SECONDS = (1, 2, 4, 8, 15, 30, 30, 30)  # ~2 minutes in all, then the error is raised


def log_batch_retrying(client, run_id: str, metrics: list, sleep=time.sleep) -> None:
    """``client.log_batch``, sent again after a transient store error (with jittered backoff)."""
    import random

    from mlflow.exceptions import MlflowException

    for wait in (*BATCH_RETRY_SECONDS, None):
        try:
            client.log_batch(run_id, metrics=metrics)
            return
        except MlflowException as error:
            if wait is None or not any(text in str(error) for text in TRANSIENT_STORE_ERRORS):
                raise
            sleep(wait * random.uniform(0.5, 1.5))


class MetricBuffer:
    """Metrics held back until the checkpoint that covers them is saved, then written in batches.

    The pending entries are also stored in that checkpoint (``pending``), so a trial killed between saving it and
    flushing restores and logs them.  Whatever checkpoint a trial restarts from (Tune may restore an older one
    than MLflow has seen, after a driver kill), steps MLflow already holds for a metric are dropped: the run's
    history has every step exactly once.
    """

    def __init__(self, tracking_uri: str, run_id: str, pending=()):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._logged = last_logged_steps(tracking_uri, run_id)  # metric → the last step MLflow holds
        self._pending = []
        for key, value, timestamp, step in pending:
            self._keep(key, value, timestamp, step)

    @property
    def pending(self) -> list[list]:
        return [list(entry) for entry in self._pending]

    def _keep(self, key: str, value: float, timestamp: int, step: int) -> None:
        if step > self._logged.get(key, -1):
            self._pending.append((key, float(value), int(timestamp), int(step)))

    def add(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            self._keep(key, value, now, step)

    def flush(self) -> None:
        """Write the pending entries."""
        if not self._pending:
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step in self._pending]
        for start in range(0, len(metrics), 1000):  # MLflow's log_batch limit
            log_batch_retrying(client, self.run_id, metrics[start:start + 1000])
        for key, _, _, step in self._pending:
            self._logged[key] = max(step, self._logged.get(key, -1))
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
    ``checkpoints/step_*/algorithm`` folder there, or the ``config/resolved_config.json`` artifact of a finished trial.
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
    root = os.path.join(folder, "checkpoints")  # the trial's own checkpoints (orchestration.trial.save_checkpoint)
    checkpoints = sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
    checkpoints = [os.path.join(root, d, "algorithm") for d in checkpoints
                   if os.path.isdir(os.path.join(root, d, "algorithm"))]
    if not checkpoints:
        raise ValueError(f"no checkpoints/step_*/algorithm folder in {folder} (run {run_id}); was the storage path "
                         "moved? pass --checkpoint PATH")
    with tempfile.TemporaryDirectory() as directory:
        try:
            path = client.download_artifacts(run_id, "config/resolved_config.json", directory)
        except (MlflowException, OSError):
            raise ValueError(f"run {run_id} has no config/resolved_config.json: only finished trials can be "
                             "continued by run id; pass --checkpoint PATH and the task flags instead") from None
        with open(path) as f:
            spec = json.load(f)["spec"]
    return checkpoints[-1], spec

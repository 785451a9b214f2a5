"""MLflow tracking: metrics are logged exactly once whatever moment a trial was killed at and whichever checkpoint it
restarts from; failed runs say so; two sweeps creating a fresh store at once both succeed."""

from __future__ import annotations

import multiprocessing

from mlflow.tracking import MlflowClient

from qam_ray.orchestration.tracking import MetricBuffer, ensure_experiment, mark_failed, reopen_run


def new_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    return uri, client, client.create_run(ensure_experiment(uri)).info.run_id


def test_restored_pending_metrics_fill_the_gap_without_duplicates(tmp_path):
    uri, client, run_id = new_run(tmp_path)
    buffer = MetricBuffer(uri, run_id)
    buffer.add({"loss": 1.0}, step=4)
    buffer.flush()  # checkpoint 1 saved and flushed
    buffer.add({"loss": 0.8}, step=8)
    buffer.add({"loss": 0.6}, step=12)
    in_checkpoint = buffer.pending  # checkpoint 2 saved with these ... and the trial is killed before flushing

    restored = MetricBuffer(uri, run_id, in_checkpoint)
    restored.flush()
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [4, 8, 12]

    # Killed after the flush instead: the restored entries are already there and are not written twice.
    again = MetricBuffer(uri, run_id, in_checkpoint)
    again.flush()
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [4, 8, 12]
    assert again.pending == []


def test_a_trial_restored_from_an_older_checkpoint_logs_only_new_steps(tmp_path):
    """After a driver kill Tune may restore a checkpoint older than what MLflow holds: the replayed steps are
    dropped as they are added, and logging resumes at the first step MLflow lacks."""
    uri, client, run_id = new_run(tmp_path)
    buffer = MetricBuffer(uri, run_id)
    for step in (4, 8, 12):
        buffer.add({"loss": 1.0 / step, "q": -float(step)}, step)
        buffer.flush()
    restarted = MetricBuffer(uri, run_id, pending=[["loss", 0.25, 0, 4]])  # the checkpoint of step 4
    for step in (8, 12, 16):  # the trial replays 8 and 12, then goes on
        restarted.add({"loss": 0.0, "q": 0.0}, step)
    restarted.flush()
    for key in ("loss", "q"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == [4, 8, 12, 16]
        assert history[1].value != 0.0  # the original step-8 value, not the replay's


def test_failed_runs_say_why_and_a_retry_reopens_them(tmp_path):
    uri, client, run_id = new_run(tmp_path)
    try:
        raise FloatingPointError("non-finite training metrics {'critic_loss': nan}\nsecond line")
    except FloatingPointError as error:
        mark_failed(uri, run_id, error)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "FloatingPointError: non-finite training metrics {'critic_loss': nan}"
    (artifact,) = client.list_artifacts(run_id, "errors")
    assert artifact.path.endswith("FloatingPointError.txt")
    reopen_run(uri, run_id)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and "error" not in run.data.tags


def _create_store(uri: str, queue) -> None:
    try:
        queue.put(ensure_experiment(uri))
    except Exception as error:  # noqa: BLE001 - reported to the test
        queue.put(f"error: {error!r}")


def test_two_sweeps_creating_a_fresh_store_at_once_both_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_create_store, args=(uri, queue)) for _ in range(4)]
    for process in processes:
        process.start()
    results = [queue.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert len(set(results)) == 1 and not results[0].startswith("error"), results


class _FlakyClient:
    """A client whose first ``failures`` log_batch calls raise ``message`` as the tracking server would."""

    def __init__(self, failures: int, message: str):
        self.failures, self.message, self.calls = failures, message, 0

    def log_batch(self, run_id, metrics):
        from mlflow.exceptions import MlflowException

        self.calls += 1
        if self.calls <= self.failures:
            raise MlflowException(self.message)


def test_a_saturated_server_is_retried_and_other_errors_are_not():
    import pytest
    from mlflow.exceptions import MlflowException

    from qam_ray.orchestration.tracking import BATCH_RETRY_SECONDS, log_batch_retrying

    waits = []
    saturated = _FlakyClient(3, "BAD_REQUEST: QueuePool limit of size 5 overflow 10 reached")
    log_batch_retrying(saturated, "run", [], sleep=waits.append)
    assert saturated.calls == 4 and len(waits) == 3

    always = _FlakyClient(10**6, "database is locked")
    with pytest.raises(MlflowException, match="locked"):
        log_batch_retrying(always, "run", [], sleep=waits.append)
    assert always.calls == len(BATCH_RETRY_SECONDS) + 1  # bounded: the error surfaces after the last wait

    invalid = _FlakyClient(1, "INVALID_PARAMETER_VALUE: metric value is not a float")
    with pytest.raises(MlflowException, match="INVALID"):
        log_batch_retrying(invalid, "run", [], sleep=waits.append)
    assert invalid.calls == 1

"""MetricBuffer: metrics restored from a checkpoint are logged once, whatever moment the trial was killed at."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from qam_ray.orchestration.tracking import MetricBuffer, ensure_experiment


def test_restored_pending_metrics_fill_the_gap_without_duplicates(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(ensure_experiment(uri)).info.run_id
    buffer = MetricBuffer(uri, run_id)
    buffer.add({"loss": 1.0}, step=4)
    buffer.flush()  # checkpoint 1 saved and flushed
    buffer.add({"loss": 0.8}, step=8)
    buffer.add({"loss": 0.6}, step=12)
    in_checkpoint = buffer.pending  # checkpoint 2 saved with these ... and the trial is killed before flushing

    restored = MetricBuffer(uri, run_id, in_checkpoint)
    restored.flush(skip_logged=True)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [4, 8, 12]

    # Killed after the flush instead: the restored entries are already there and are not written twice.
    again = MetricBuffer(uri, run_id, in_checkpoint)
    again.flush(skip_logged=True)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [4, 8, 12]
    assert again.pending == []

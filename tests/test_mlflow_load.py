"""A bounded load test of the cluster's logging pattern against one real `mlflow server` on loopback.

On a cluster every trial is its own process that writes to one tracking server: it creates its child run under the
sweep's parent run, then logs its metrics through ``MetricBuffer`` in one batch per checkpoint.  Here 32 writer
processes (spawned, as Ray's workers are fresh interpreters) do exactly that at the same time, against a server
started like the launcher's (sqlite backend, proxied artifacts, the default number of workers).  Every point has a
value that names its writer, key and step, so reading the histories back tells lost points from duplicated ones
(a client retry of a batch the server had already stored shows up as a duplicate).

Sized for a 2-core machine: 32 writers x 2 keys x 500 steps = 32,000 points in 320 batches of 100 points
(a flush every 50 steps).  The measured throughput is printed and attached to the test report (record_property);
it is not asserted, because it depends on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import collections
import multiprocessing
import queue
import threading
import time
import traceback

from tests.mlflow_server import MlflowServer

WRITERS = 32
KEYS = ("train/total_loss", "eval/success_rate")
STEPS = 500  # x 2 keys = 1,000 points per writer
FLUSH_EVERY = 50  # steps per flush, like a trial that checkpoints every 50 iterations -> 10 batches of 100 points
SWEEP = "load-test"
START_TIMEOUT = 180  # s for all writers to import MLflow and create their runs (32 interpreters on 2 cores)
WRITE_TIMEOUT = 180


def point_value(writer: int, key: int, step: int) -> float:
    """Unique per (writer, key, step) and exact in a float64, so a read-back value identifies its point."""
    return writer * 1_000_000 + key * 100_000 + step + 0.25


def lost_and_duplicated(history, writer: int, key: int) -> tuple[int, int]:
    """(points missing from ``history``, points in it that are repeats or were never sent) for one metric."""
    got = collections.Counter((m.step, m.value) for m in history)
    expected = collections.Counter((step, point_value(writer, key, step)) for step in range(STEPS))
    return sum((expected - got).values()), sum((got - expected).values())


def test_lost_and_duplicated_counts_missing_repeated_and_foreign_points():
    from mlflow.entities import Metric

    full = [Metric("m", point_value(3, 1, step), 0, step) for step in range(STEPS)]
    assert lost_and_duplicated(full, 3, 1) == (0, 0)
    assert lost_and_duplicated(full[:-2], 3, 1) == (2, 0)
    assert lost_and_duplicated(full + full[:1], 3, 1) == (0, 1)  # a retried batch stored twice
    assert lost_and_duplicated(full, 4, 1) == (STEPS, STEPS)  # another writer's points


def _writer(index: int, uri: str, experiment_id: str, parent_id: str, barrier, results) -> None:
    try:
        from qam_ray.orchestration.tracking import MetricBuffer, trial_run

        run_id = trial_run(uri, experiment_id, parent_id, f"writer {index}",
                           tags={"sweep": SWEEP, "writer": str(index)}, params={"writer": index, "steps": STEPS})
        buffer = MetricBuffer(uri, run_id)
        barrier.wait(timeout=START_TIMEOUT)  # all writers start logging together: that is the load
        start = time.monotonic()
        flush_seconds = []
        for step in range(STEPS):
            buffer.add({key: point_value(index, k, step) for k, key in enumerate(KEYS)}, step)
            if (step + 1) % FLUSH_EVERY == 0:
                t = time.monotonic()
                buffer.flush()
                flush_seconds.append(time.monotonic() - t)
        buffer.flush()
        results.put({"writer": index, "run_id": run_id, "start": start, "end": time.monotonic(),
                     "flush_seconds": flush_seconds})
    except BaseException:  # noqa: BLE001 - the parent reports every writer's failure
        results.put({"writer": index, "error": traceback.format_exc()})
        barrier.abort()  # don't leave the others waiting for a writer that will never arrive


def collect(results, reports: list, deadline: float) -> None:
    """Append writer reports until all are in or ``deadline`` passes (reading also lets failed writers exit:
    a child blocks at exit until its queued report has been read)."""
    while len(reports) < WRITERS:
        try:
            reports.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            return


def test_32_concurrent_metric_buffers_lose_and_duplicate_no_point(tmp_path, record_property):
    from mlflow.tracking import MlflowClient

    from qam_ray.orchestration.tracking import ROLE_TAG, ensure_experiment, parent_run

    ctx = multiprocessing.get_context("spawn")
    with MlflowServer(tmp_path / "mlflow") as server:
        experiment_id = ensure_experiment(server.uri)
        parent_id = parent_run(server.uri, experiment_id, SWEEP, tags={"preset": "load"})
        barrier, results = ctx.Barrier(WRITERS + 1), ctx.Queue()
        writers = [ctx.Process(target=_writer, args=(i, server.uri, experiment_id, parent_id, barrier, results))
                   for i in range(WRITERS)]
        for process in writers:
            process.start()
        reports = []
        try:
            barrier.wait(timeout=START_TIMEOUT)
            t0 = time.monotonic()
            collect(results, reports, deadline=t0 + WRITE_TIMEOUT)
        except threading.BrokenBarrierError:  # a writer failed (or hung) before logging: gather every reason
            collect(results, reports, deadline=time.monotonic() + 30)
        finally:
            join_deadline = time.monotonic() + 30  # one grace period for all, not 30 s per writer
            for process in writers:
                process.join(timeout=max(0.0, join_deadline - time.monotonic()))
            for process in writers:
                if process.is_alive():  # only our own writers, by their handle
                    process.kill()
                    process.join(timeout=10)

        errors = [r for r in reports if "error" in r]
        assert not errors, "\n".join(f"writer {r['writer']}:\n{r['error']}" for r in errors) + server.log_tail()
        assert sorted(r["writer"] for r in reports) == list(range(WRITERS)), (
            f"only {len(reports)} of {WRITERS} writers reported:\n{server.log_tail()}")
        wall = max(r["end"] for r in reports) - t0
        points = WRITERS * len(KEYS) * STEPS
        flushes = sorted(s for r in reports for s in r["flush_seconds"])

        # Read every history back through the same server, as the analysis does.
        client = MlflowClient(server.uri)
        trials = f"tags.sweep = '{SWEEP}' and tags.`{ROLE_TAG}` = 'trial'"
        runs = client.search_runs([experiment_id], filter_string=trials, max_results=1000)
        assert len(runs) == WRITERS
        lost, duplicated = collections.Counter(), collections.Counter()
        for run in runs:
            assert run.data.tags["mlflow.parentRunId"] == parent_id
            writer = int(run.data.tags["writer"])
            for k, key in enumerate(KEYS):
                missing, extra = lost_and_duplicated(client.get_metric_history(run.info.run_id, key), writer, k)
                lost[writer] += missing
                duplicated[writer] += extra
        assert sum(lost.values()) == 0, f"lost points per writer: {dict(+lost)}"
        assert sum(duplicated.values()) == 0, f"duplicated or foreign points per writer: {dict(+duplicated)}"

    summary = {"writers": WRITERS, "points": points, "batches": len(flushes), "wall_s": round(wall, 2),
               "points_per_s": round(points / wall), "batch_s_median": round(flushes[len(flushes) // 2], 3),
               "batch_s_max": round(flushes[-1], 3)}
    for name, value in summary.items():
        record_property(name, value)
    print(f"\nMLflow load test (sqlite on loopback, default server workers): {summary}")

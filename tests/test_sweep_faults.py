"""A trial killed mid-run resumes from its checkpoint, and its MLflow history continues without duplicates.

The sweep runs as a subprocess with its own local Ray.  Once a trial has flushed progress to MLflow, the test
kills that trial's worker process, which it finds in the subprocess's own process tree, so nothing outside the
test is touched.  Tune then retries the trial from its last checkpoint (FailureConfig).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from qam_ray.orchestration.tracking import ensure_experiment

ROOT = Path(__file__).parents[1]
STEPS, PER_ITERATION = 240, 4


def trial_workers(parent: psutil.Process) -> list[psutil.Process]:
    workers = []
    for proc in parent.children(recursive=True):
        try:
            if proc.name().startswith("ray::ImplicitFunc"):  # Ray's process title for a function trainable
                workers.append(proc)
        except psutil.Error:
            continue
    return workers


def logged_steps(uri: str, metric: str = "train/total_loss") -> dict[str, list[int]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("qam_ray")
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`qam_ray.role` = 'trial'")
    return {r.info.run_id: [m.step for m in client.get_metric_history(r.info.run_id, metric)] for r in runs}


def sweep_killed_once(tmp_path, preset_args: list[str], metric: str, kill_after: int) -> tuple[list[int], int]:
    """Run a one-trial sweep in a subprocess, SIGKILL its trial worker once ``metric`` has been logged at a step
    >= ``kill_after`` (so a checkpoint exists), let Tune retry it; returns the metric's logged steps and the
    step at the kill."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ray_tmp = tempfile.mkdtemp(prefix="qf", dir="/tmp")  # this sweep's own Ray temp dir (short: socket paths)
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    argv = [sys.executable, str(ROOT / "experiments" / "sweep.py"), *preset_args, "--seeds", "0",
            "--storage-path", str(tmp_path / "results"), "--tracking-uri", uri, "--name", "fault-test"]
    ensure_experiment(uri)  # create the store once, so polling it cannot race the sweep's own schema migration
    log = open(tmp_path / "sweep.log", "w")
    sweep = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    killed_at = None
    try:
        deadline = time.time() + 240
        while killed_at is None and time.time() < deadline and sweep.poll() is None:
            steps = logged_steps(uri, metric)
            workers = trial_workers(psutil.Process(sweep.pid))
            if steps and max(map(max, filter(None, steps.values())), default=0) >= kill_after and workers:
                killed_at = max(map(max, steps.values()))
                for worker in workers:
                    worker.send_signal(signal.SIGKILL)
            time.sleep(0.2)
        assert killed_at is not None, "the trial never reached a checkpoint: " + (tmp_path / "sweep.log").read_text()[-3000:]
        assert sweep.wait(timeout=300) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    finally:
        if sweep.poll() is None:  # stop exactly the process group this test started (its Ray included)
            os.killpg(sweep.pid, signal.SIGKILL)
        log.close()
    history = logged_steps(uri, metric)
    assert len(history) == 1, history  # the restarted trial kept its run: no duplicate run
    # Tune recorded the kill as a trial failure and retried it (FailureConfig).
    assert list((tmp_path / "results").rglob("error.txt")), "no trial failure recorded"
    (steps,) = history.values()
    return steps, killed_at


def test_killed_trial_resumes_from_checkpoint_with_intact_history(tiny_dataset_dir, tmp_path):
    steps, killed_at = sweep_killed_once(
        tmp_path, ["--preset", "smoke", "--steps", str(STEPS), "--eval-every", str(STEPS),
                   "--dataset-dir", tiny_dataset_dir], "train/total_loss", kill_after=3 * PER_ITERATION)
    expected = list(range(PER_ITERATION, STEPS + 1, PER_ITERATION))
    assert steps == expected, f"killed after step {killed_at}; logged {steps}"  # complete, in order, no repeats
    assert killed_at < STEPS


def test_trial_killed_in_the_online_phase_resumes_there(tiny_dataset_dir, tmp_path):
    """The online checkpoint carries the online transitions; the restarted trial continues the online phase."""
    online_steps, per_iteration = 400, 50  # smoke-online: 2 EnvRunners × 5 chunks × 5 env steps
    steps, killed_at = sweep_killed_once(
        tmp_path, ["--preset", "smoke-online", "--online-steps", str(online_steps), "--online-eval-every",
                   str(online_steps), "--dataset-dir", tiny_dataset_dir], "online/env_steps", kill_after=8 + 100)
    expected = list(range(8 + per_iteration, 8 + online_steps + 1, per_iteration))  # offline 8 steps, then env
    assert steps == expected, f"killed after step {killed_at}; logged {steps}"
    assert killed_at < 8 + online_steps


def test_a_nan_loss_fails_its_run_with_the_reason_and_is_not_retried(local_ray, tiny_dataset_dir, tmp_path, capsys):
    """Observations of 1e30 (finite, so the data checks pass) overflow the flows' losses: the trial stops with
    NonFiniteLossError, its run is FAILED with the reason and one traceback, Tune does not retry it although
    --max-failures allows 3, and the sweep's summary names it."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from .test_sweep import load_script

    data = tmp_path / "data"
    data.mkdir()
    for suffix in ("", "-val"):  # an "official" copy (no manifest): its values are checked on load only
        arrays = dict(np.load(f"{tiny_dataset_dir}/cube-single-play-v0{suffix}.npz"))
        arrays["observations"] = np.full_like(arrays["observations"], 1e30)
        np.savez(data / f"cube-single-play-v0{suffix}", **arrays)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = load_script("sweep")
    argv = ["--preset", "smoke", "--seeds", "0", "--dataset-dir", str(data), "--tracking-uri", uri,
            "--storage-path", str(tmp_path / "results"), "--name", "nan", "--max-failures", "3"]
    assert sweep.main(argv) == 1
    out = capsys.readouterr().out
    assert "FAILED QAM cube-single-play t2 s0: NonFiniteLossError: non-finite training metrics" in out
    assert "(not retried" in out
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("qam_ray").experiment_id])
    (trial,) = [r for r in runs if r.data.tags["qam_ray.role"] == "trial"]
    (parent,) = [r for r in runs if r.data.tags["qam_ray.role"] == "sweep"]
    assert trial.info.status == "FAILED" and parent.info.status == "FAILED"
    assert trial.data.tags["error"].startswith("NonFiniteLossError: non-finite training metrics")
    assert len(client.list_artifacts(trial.info.run_id, "errors")) == 1  # one attempt: no retry


def test_a_killed_driver_resumes_with_every_metric_point_exactly_once(tiny_dataset_dir, tmp_path):
    """SIGKILL of the whole sweep (driver and its Ray) mid-run, then --resume: Tune may restore a checkpoint older
    than what MLflow holds; the trial keeps its run, and every metric has every step exactly once."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = [sys.executable, str(ROOT / "experiments" / "sweep.py"), "--preset", "smoke", "--seeds", "0", "--steps",
            str(STEPS), "--eval-every", str(STEPS // 2), "--dataset-dir", tiny_dataset_dir, "--storage-path",
            str(tmp_path / "results"), "--tracking-uri", uri, "--name", "driver-kill"]
    ensure_experiment(uri)

    def start(extra: list[str], log_name: str):
        env = {**os.environ, "RAY_ADDRESS": "local", "RAY_TMPDIR": tempfile.mkdtemp(prefix="qd", dir="/tmp"),
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(tmp_path / log_name, "w")
        return subprocess.Popen([*argv, *extra], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True), log

    sweep, log = start([], "first.log")
    try:
        deadline = time.time() + 240
        while time.time() < deadline and sweep.poll() is None:
            steps = logged_steps(uri)
            if steps and max(map(max, filter(None, steps.values())), default=0) >= 3 * PER_ITERATION:
                break
            time.sleep(0.2)
        assert sweep.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(sweep.pid, signal.SIGKILL)  # the driver and every Ray process of this sweep, at once
        sweep.wait(timeout=60)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
        log.close()
    resumed, log = start(["--resume"], "resume.log")
    try:
        assert resumed.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
        log.close()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("qam_ray").experiment_id])
    (trial,) = [r for r in runs if r.data.tags["qam_ray.role"] == "trial"]  # no second run for the trial
    assert all(r.info.status == "FINISHED" for r in runs)
    expected = list(range(PER_ITERATION, STEPS + 1, PER_ITERATION))
    for key in ("train/total_loss", "train/critic_loss", "perf/updates_per_s"):
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, key)]
        assert steps == expected, (key, steps)  # 0 missing, 0 duplicated
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "eval/success_rate")] == [STEPS // 2, STEPS]


def test_a_damaged_checkpoint_falls_back_to_the_one_before_it(local_ray, tiny_dataset_dir, tmp_path):
    from qam_ray.orchestration.presets import resolve
    from qam_ray.orchestration.trial import (TRIAL_STATE, restore_newest_readable, save_checkpoint,
                                             trial_checkpoints)
    from qam_ray.rllib.algorithm import InvalidConfigError

    _, (spec, *_), errors = resolve("smoke", {"dataset_dir": tiny_dataset_dir, "seeds": [0]})
    assert not errors
    from qam_ray.orchestration.trial import _algo_config

    algo = _algo_config(spec, "offline", offline_checkpoint=None).build_algo()
    try:
        for step in (4, 8):
            algo.train()
            save_checkpoint(str(tmp_path), step, algo, {"phase": "offline", "step": step, "pending": []})
    finally:
        algo.stop()
    older, newer = trial_checkpoints(str(tmp_path))
    for path in (Path(newer) / "algorithm").rglob("*.pkl"):  # damage the newest: truncated state files
        path.write_bytes(b"\x80\x04")
    restored, state = restore_newest_readable(spec, [older, newer])
    try:
        assert state["step"] == 4
    finally:
        restored.stop()
    (Path(older) / TRIAL_STATE).write_text("{not json")
    with pytest.raises(InvalidConfigError, match="no checkpoint of this trial can be restored"):
        restore_newest_readable(spec, [older, newer])

"""Bad input is rejected before Ray starts, in seconds, with a message that names the problem and the fix, no
traceback, a non-zero exit status, and nothing created (no MLflow store, no results folder)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest


from .test_sweep import ROOT, load_script

sweep = load_script("sweep")
DATA_STEM = "cube-single-play-v0"


@pytest.fixture
def place(tmp_path):
    """Where a rejected sweep would have written: its store and its results folder must stay absent."""
    paths = {"uri": f"sqlite:///{tmp_path}/store/mlflow.db", "results": tmp_path / "results"}
    yield paths
    assert not (tmp_path / "store" / "mlflow.db").exists(), "a rejected sweep created an MLflow store"
    assert not paths["results"].exists(), "a rejected sweep created its results folder"


def rejected(capsys, argv: list[str], *fragments: str) -> str:
    start = time.time()
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code not in (0, None), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    assert time.time() - start < 60
    return err


def smoke(place, dataset_dir: str, *extra: str) -> list[str]:
    return ["--preset", "smoke", "--dataset-dir", dataset_dir, "--tracking-uri", place["uri"],
            "--storage-path", str(place["results"]), *extra]


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps 0: must be an integer >= 1"),
    (["--steps", "-8"], "--steps -8: must be an integer >= 1"),
    (["--steps-per-iteration", "0"], "--steps-per-iteration 0: must be an integer >= 1"),
    (["--eval-every", "0"], "--eval-every 0: must be an integer >= 1"),
    (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
    (["--eval-episodes", "0"], "--eval-episodes 0"),
    (["--utd-ratio", "nan", "--online-steps", "10"], "--utd-ratio nan: must be a finite number > 0"),
    (["--online-steps", "-1"], "--online-steps -1"),
    (["--online-steps", "10", "--env-runners", "0"], "--env-runners 0"),
    (["--seeds", "-1"], "seeds are integers >= 0"),
    (["--tasks", "0"], "tasks are 1..5"),
    (["--methods", "QAM", "SAC"], "known methods are"),
    (["--set", "lr=1e400"], "lr=inf: must be a finite number >= 0"),
    (["--set", "num_qs=0"], "num_qs=0: must be an integer >= 1"),
    (["--set", "actor_hidden_dims=(0,)"], "actor_hidden_dims=(0,)"),
    (["--set", "horizon_length=0"], "horizon_length=0"),
    (["--set", "discount=1.5"], "discount=1.5: must be in (0, 1]"),
    (["--set", "tau=0"], "tau=0"),
    (["--set", "clip_grad_max_norm=-1"], "clip_grad_max_norm=-1"),
    (["--set", "inv_temp"], "expected KEY=VALUE"),
    (["--set", "inv_temp=three"], "is not a Python literal"),
])
def test_bad_flags_and_hyperparameters(capsys, place, tiny_dataset_dir, flags, message):
    rejected(capsys, smoke(place, tiny_dataset_dir, *flags), message)


@pytest.mark.parametrize("flags, message", [
    (["--gpus-per-trial", "1.5"], "Ray shares a GPU only in fractions <= 1"),
    (["--gpus-per-trial", "1"], "GPU(s) torch can use"),
    (["--cpus-per-trial", "64"], "this machine has"),
    (["--cpus-per-trial", "0"], "a trial needs a CPU"),
    (["--max-failures", "-1"], "--max-failures -1"),
])
def test_resources_a_trial_can_never_get(capsys, place, tiny_dataset_dir, flags, message):
    if flags == ["--gpus-per-trial", "1"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    rejected(capsys, smoke(place, tiny_dataset_dir, *flags), message)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_uris(capsys, place, tiny_dataset_dir, tmp_path, monkeypatch):
    base = smoke(place, tiny_dataset_dir)[:-4] + ["--storage-path", str(place["results"])]
    port = closed_port()
    rejected(capsys, [*base, "--tracking-uri", f"http://127.0.0.1:{port}"], "no MLflow server answers",
             "--tracking-uri")
    rejected(capsys, [*base, "--tracking-uri", "sqlite:/relative.db"], "sqlite:///<path>")
    rejected(capsys, [*base, "--tracking-uri", "ftp://host/x"], "unknown scheme 'ftp'")
    rejected(capsys, [*base, "--tracking-uri", str(tmp_path / "mlruns")], "file store")
    rejected(capsys, [*base, "--tracking-uri", "sqlite:////proc/qam_ray/mlflow.db"], "cannot write in /proc")
    not_sqlite = tmp_path / "notes.db"
    not_sqlite.write_text("not a database")
    rejected(capsys, [*base, "--tracking-uri", f"sqlite:///{not_sqlite}"], "is not a sqlite database")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    rejected(capsys, base, "MLFLOW_TRACKING_URI=")


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:{port}", "nothing answers at 127.0.0.1"), ("not-an-address", "expected host:port"),
    ("ray://127.0.0.1:{port}", "nothing answers at 127.0.0.1"),
])
def test_ray_address_pointing_at_nothing(capsys, place, tiny_dataset_dir, monkeypatch, address, message):
    monkeypatch.setenv("RAY_ADDRESS", address.format(port=closed_port()))
    rejected(capsys, smoke(place, tiny_dataset_dir), message, "RAY_ADDRESS")


def test_storage_paths(capsys, place, tiny_dataset_dir, tmp_path):
    argv = smoke(place, tiny_dataset_dir)[:-2]
    rejected(capsys, [*argv, "--storage-path", "/proc/qam_ray/results"], "cannot write in /proc")
    a_file = tmp_path / "file"
    a_file.write_text("")
    rejected(capsys, [*argv, "--storage-path", str(a_file)], "is a file")


def test_resume_of_a_sweep_that_never_ran_creates_nothing(capsys, place, tiny_dataset_dir):
    rejected(capsys, [*smoke(place, tiny_dataset_dir), "--name", "never-ran", "--resume"],
             "no sweep 'never-ran' to resume")


def test_a_second_sweep_of_the_same_name_is_refused(capsys, tmp_path, tiny_dataset_dir):
    (tmp_path / "results" / "taken").mkdir(parents=True)
    argv = ["--preset", "smoke", "--dataset-dir", tiny_dataset_dir, "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db", "--storage-path", str(tmp_path / "results"), "--name", "taken"]
    rejected(capsys, argv, "a sweep named 'taken' already exists", "--resume")
    assert not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------------------------------------------
# Dataset files, validated on disk before Ray starts
# --------------------------------------------------------------------------------------------------
def dataset_copy(source: str, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def rewrite(path: Path, change) -> None:
    arrays = dict(np.load(path))
    change(arrays)
    np.savez(path.with_suffix(""), **arrays)  # np.savez appends .npz


def test_dataset_problems_are_found_before_ray(capsys, place, tiny_dataset_dir, tmp_path):
    truncated = dataset_copy(tiny_dataset_dir, tmp_path / "truncated")
    data = (truncated / f"{DATA_STEM}.npz").read_bytes()
    (truncated / f"{DATA_STEM}.npz").write_bytes(data[: len(data) // 2])
    rejected(capsys, smoke(place, str(truncated)), f"{DATA_STEM}.npz is not a readable .npz archive")

    no_qpos = dataset_copy(tiny_dataset_dir, tmp_path / "no_qpos")
    rewrite(no_qpos / f"{DATA_STEM}.npz", lambda arrays: arrays.pop("qpos"))
    rejected(capsys, smoke(place, str(no_qpos)), "has no 'qpos' array")

    # NaNs in a generated file: it no longer matches its manifest's checksum (the values are checked on load).
    nan = dataset_copy(tiny_dataset_dir, tmp_path / "nan")
    rewrite(nan / f"{DATA_STEM}.npz", lambda arrays: arrays["observations"].__setitem__((3, 1), np.nan))
    rejected(capsys, smoke(place, str(nan)), "does not match the checksum")

    lying = dataset_copy(tiny_dataset_dir, tmp_path / "lying")
    manifest_path = lying / f"{DATA_STEM}.manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["episodes"] += 1
    manifest_path.write_text(json.dumps(manifest))
    rejected(capsys, smoke(place, str(lying)), "rows for", "regenerate the dataset")

    with zipfile.ZipFile(no_qpos / f"{DATA_STEM}.npz") as archive:  # the check read headers, not the arrays
        assert "observations.npy" in archive.namelist()


def test_a_mistyped_dataset_folder_is_not_filled_with_generated_data(capsys, place, tmp_path):
    typo = tmp_path / "dta" / "smoke"
    rejected(capsys, smoke(place, str(typo)), f"{typo}/{DATA_STEM}.npz is missing", "--generate")
    assert not typo.exists()


def test_offline_checkpoints_that_cannot_be_loaded(capsys, place, tiny_dataset_dir, tmp_path):
    online = ["--preset", "smoke-online", "--dataset-dir", tiny_dataset_dir, "--tracking-uri", place["uri"],
              "--storage-path", str(place["results"])]
    rejected(capsys, [*online, "--offline-checkpoint", str(tmp_path / "missing")], "no learner_group/ folder")


# --------------------------------------------------------------------------------------------------
# The process: no hang, and SIGTERM ends it
# --------------------------------------------------------------------------------------------------
def test_rejections_exit_nonzero_without_a_traceback_in_a_real_process(tmp_path, tiny_dataset_dir):
    port = closed_port()
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, str(ROOT / "experiments" / "sweep.py"), "--preset", "smoke", "--dataset-dir",
            tiny_dataset_dir, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage-path",
            str(tmp_path / "results")]
    start = time.time()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "RAY_ADDRESS" in done.stderr
    assert time.time() - start < 60


def test_a_head_that_accepts_but_never_answers_is_rejected_in_time_and_sigterm_ends_the_wait(tmp_path,
                                                                                             tiny_dataset_dir):
    """A port that accepts connections but is no Ray head (here: a bare socket) passes the reachability check;
    the driver's connection probe then gives up within its deadline, and SIGTERM ends the driver while it waits.
    Nothing is created either way."""
    import signal

    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen()
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{listener.getsockname()[1]}", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, str(ROOT / "experiments" / "sweep.py"), "--preset", "smoke", "--dataset-dir",
            tiny_dataset_dir, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage-path",
            str(tmp_path / "results")]
    try:
        start = time.time()
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "RAY_ADDRESS" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert time.time() - start < 60
        process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        time.sleep(8)  # inside the connection probe
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 128 + signal.SIGTERM
    finally:
        if "process" in locals() and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        listener.close()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "results").exists()

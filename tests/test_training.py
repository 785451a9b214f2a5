"""The plain trainer and the training CLI on a tiny generated dataset."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest

from qam_ray.data.ogbench_data import load_offline_dataset
from qam_ray.data.replay import ChunkReplayBuffer
from qam_ray.training import NonFiniteLossError, OfflineTrainer, hyperparams_for_env

from .conftest import TINY_ENV

TINY = {"actor_hidden_dims": (16, 16), "value_hidden_dims": (16, 16), "num_qs": 2, "flow_steps": 3}


def load_train_script():
    path = Path(__file__).parents[1] / "experiments" / "train.py"
    spec = importlib.util.spec_from_file_location("train_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_trainer(dataset_dir, seed=0):
    dataset = load_offline_dataset(TINY_ENV, dataset_dir)
    hp = hyperparams_for_env(TINY_ENV, "QAM", dataset.obs_dim, dataset.action_dim, TINY)
    return OfflineTrainer(hp, ChunkReplayBuffer.from_arrays(dataset.train, "cpu"), batch_size=8, seed=seed)


def test_registry_settings_reach_the_hyperparameters():
    hp = hyperparams_for_env("puzzle-4x4-play-singletask-task1-v0", "QAM-E", 83, 5)
    assert (hp.inv_temp, hp.edit_scale, hp.horizon_length, hp.variant) == (0.1, 0.9, 5, "QAM-E")
    hp = hyperparams_for_env("humanoidmaze-medium-navigate-singletask-task1-v0", "QAM", 69, 21)
    assert (hp.rho, hp.discount, hp.horizon_length) == (0.0, 0.995, 1)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        hyperparams_for_env(TINY_ENV, "QAM", 28, 5, {"inverse_temperature": 1.0})


def test_training_is_deterministic_and_resumes_identically(tiny_dataset_dir):
    a = make_trainer(tiny_dataset_dir)
    a.train(3)
    state = copy.deepcopy(a.state_dict())  # state_dict() holds live references
    expected = a.train(3)
    b = make_trainer(tiny_dataset_dir, seed=123)  # different init, overwritten by the checkpoint
    b.load_state_dict(state)
    assert b.train(3) == expected
    assert make_trainer(tiny_dataset_dir).train(3) == make_trainer(tiny_dataset_dir).train(3)


def test_nan_loss_stops_training_loudly(tiny_dataset_dir):
    trainer = make_trainer(tiny_dataset_dir)
    trainer.buffer._storage["rewards"].fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite training metrics .*critic_loss.*steps \[0, 2\)"):
        trainer.train(2)


def test_train_cli_end_to_end(local_ray, tiny_dataset_dir, tmp_path):
    """The CLI trains through the RLlib algorithm (a no-op ray.init joins the test's private Ray)."""
    script = load_train_script()
    out = tmp_path / "run"
    args = ["--env", TINY_ENV, "--dataset-dir", tiny_dataset_dir, "--steps", "6", "--log-every", "3",
            "--eval-every", "3", "--eval-episodes", "1", "--out", str(out)]
    for key, value in TINY.items():
        args += ["--set", f"{key}={value!r}"]
    args += ["--batch-size", "8"]
    assert script.main(args) == 0
    metrics = list(csv.DictReader(open(out / "metrics.csv")))
    evals = list(csv.DictReader(open(out / "eval.csv")))
    assert [int(r["step"]) for r in metrics] == [3, 6] and [int(r["step"]) for r in evals] == [3, 6]
    assert 0.0 <= float(evals[-1]["success_rate"]) <= 1.0 and float(evals[-1]["episode_length"]) > 0
    assert (out / "checkpoint" / "learner_group" / "learner" / "rl_module" / "default_policy").is_dir()
    config = json.load(open(out / "config.json"))
    assert config["dataset_source"] == "generated" and list(config["hyperparams"]["actor_hidden_dims"]) == [16, 16]


def test_train_cli_fails_early_with_clear_messages(local_ray, tmp_path, capsys):
    script = load_train_script()
    with pytest.raises(SystemExit):
        script.main(["--env", TINY_ENV, "--set", "bogus=1"])
    assert "unknown hyperparameter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--env", "cube-single-play-task2-v0"])  # not a singletask name
    assert "singletask" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--dataset-dir"):  # no data and no network here
        script.main(["--env", TINY_ENV, "--dataset-dir", str(tmp_path / "empty"), "--steps", "1",
                     "--log-every", "1", "--set", "num_qs=2"])
    assert not os.path.exists(tmp_path / "empty" / "cube-single-play-v0.npz")

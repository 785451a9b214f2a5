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
from qam_ray.agents import make_hyperparams
from qam_ray.training import NonFiniteLossError, OfflineTrainer

from .conftest import TINY_ENV

TINY = {"actor_hidden_dims": (16, 16), "value_hidden_dims": (16, 16), "num_qs": 2, "flow_steps": 3}


def load_train_script():
    path = Path(__file__).parents[1] / "experiments" / "train.py"
    spec = importlib.util.spec_from_file_location("train_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_trainer(dataset_dir, seed=0, method="QAM"):
    dataset = load_offline_dataset(TINY_ENV, dataset_dir)
    buffer = ChunkReplayBuffer.from_arrays(dataset.train, "cpu")
    return OfflineTrainer.for_env(method, TINY_ENV, buffer, TINY, batch_size=8, seed=seed)


def test_registry_settings_reach_the_hyperparameters():
    hp = make_hyperparams("QAM-E", "puzzle-4x4-play-singletask-task1-v0", 83, 5)
    assert (hp.inv_temp, hp.edit_scale, hp.horizon_length, hp.variant) == (0.1, 0.9, 5, "QAM-E")
    hp = make_hyperparams("QAM", "humanoidmaze-medium-navigate-singletask-task1-v0", 69, 21)
    assert (hp.rho, hp.discount, hp.horizon_length) == (0.0, 0.995, 1)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        make_hyperparams("QAM", TINY_ENV, 28, 5, {"inverse_temperature": 1.0})


@pytest.mark.parametrize("method", ["QAM", "FQL", "BAM", "IFQL"])
def test_training_is_deterministic_and_resumes_identically(tiny_dataset_dir, method):
    a = make_trainer(tiny_dataset_dir, method=method)
    a.train(3)
    state = copy.deepcopy(a.state_dict())  # state_dict() holds live references
    expected = a.train(3)
    b = make_trainer(tiny_dataset_dir, seed=123, method=method)  # different init, overwritten by the checkpoint
    b.load_state_dict(state)
    assert b.train(3) == expected
    assert make_trainer(tiny_dataset_dir, method=method).train(3) == make_trainer(tiny_dataset_dir, method=method).train(3)


def test_nan_loss_stops_training_loudly(tiny_dataset_dir):
    trainer = make_trainer(tiny_dataset_dir)
    trainer.buffer._storage["rewards"].fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite training metrics .*critic_loss.*steps \[0, 2\)"):
        trainer.train(2)


def test_train_cli_end_to_end(local_ray, tiny_dataset_dir, tmp_path):
    """The CLI trains each method through the RLlib algorithm (a no-op ray.init joins the test's private Ray)."""
    script = load_train_script()
    out = tmp_path / "run"
    args = ["--env", TINY_ENV, "--dataset-dir", tiny_dataset_dir, "--methods", "QAM", "FQL", "--steps", "6",
            "--log-every", "3", "--eval-every", "3", "--eval-episodes", "1", "--out", str(out), "--set", "FQL.alpha=3.0"]
    for key, value in TINY.items():
        args += ["--set", f"{key}={value!r}"]
    args += ["--batch-size", "8"]
    assert script.main(args) == 0
    for method, own_metric in (("QAM", "adj_loss"), ("FQL", "distill_loss")):
        metrics = list(csv.DictReader(open(out / method / "metrics.csv")))
        evals = list(csv.DictReader(open(out / method / "eval.csv")))
        assert [int(r["step"]) for r in metrics] == [3, 6] and [int(r["step"]) for r in evals] == [3, 6]
        assert own_metric in metrics[0]
        assert 0.0 <= float(evals[-1]["success_rate"]) <= 1.0 and float(evals[-1]["episode_length"]) > 0
        assert (out / method / "checkpoint" / "learner_group" / "learner" / "rl_module" / "default_policy").is_dir()
        config = json.load(open(out / method / "config.json"))
        assert config["dataset_source"] == "generated" and list(config["hyperparams"]["actor_hidden_dims"]) == [16, 16]
    assert json.load(open(out / "FQL" / "config.json"))["hyperparams"]["alpha"] == 3.0


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

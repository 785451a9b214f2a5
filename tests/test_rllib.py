"""QAM on RLlib: config validation, local and remote learners, evaluation EnvRunners, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qam_ray.rllib.algorithm import QAM, QAMConfig
from qam_ray.training import NonFiniteLossError

TINY = dict(actor_hidden_dims=(16, 16), value_hidden_dims=(16, 16), num_qs=2, flow_steps=3,
            num_steps_per_iteration=4, train_batch_size_per_learner=8)


def tiny_config(dataset_dir, **learners):
    return (QAMConfig()
            .ogbench("cube-single-play", task=2, dataset_dir=dataset_dir)
            .training(**TINY)
            .learners(**learners)
            .debugging(seed=3))


def learner_losses(result):
    metrics = result["learners"]["default_policy"]
    return {k: float(metrics[k]) for k in ("total_loss", "critic_loss", "flow_loss", "adj_loss")}


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="env_name is not set"):
        QAMConfig().validate()
    with pytest.raises(ValueError, match="variant='QAM-X'"):
        QAMConfig().ogbench("cube-double-play", task=1, variant="QAM-X")
    config = QAMConfig().training(num_steps_per_iteration=0, fql_alpha=1.0, edit_scale=0.1)
    config.env_name = "cube-double-play-singletask-task1-v0"
    with pytest.raises(ValueError) as err:
        config.validate()
    assert "num_steps_per_iteration" in str(err.value) and "exclusive" in str(err.value)


def test_ogbench_preset_fills_the_registry_values():
    config = QAMConfig().ogbench("puzzle-4x4-play", task=3, variant="QAM-E")
    assert (config.env_name, config.inv_temp, config.edit_scale, config.horizon_length, config.sparse) == (
        "puzzle-4x4-play-singletask-task3-v0", 0.1, 0.9, 5, True)
    assert config.action_space.shape == (25,) and config.observation_space.shape == (83,)


def test_local_learner_trains_and_evaluates(local_ray, tiny_dataset_dir):
    config = tiny_config(tiny_dataset_dir).evaluation(
        evaluation_interval=2, evaluation_duration=2, evaluation_num_env_runners=0)
    algo = config.build_algo()
    try:
        first, second, third = algo.train(), algo.train(), algo.train()
    finally:
        algo.stop()
    assert second["num_gradient_steps_lifetime"] == 8
    assert "evaluation" not in third  # Ray would re-report the previous evaluation here (QAM.step drops it)
    metrics = second["learners"]["default_policy"]
    assert {"critic_loss", "adj_loss", "q_mean", "adj_mean", "updates_per_s"} <= set(metrics)
    assert "evaluation" not in first  # evaluation_interval=2
    evaluation = second["evaluation"]["env_runners"]
    assert 0.0 <= evaluation["success_rate"] <= 1.0 and evaluation["num_episodes"] == 2
    assert evaluation["episode_env_steps"] > 0  # env steps; RLlib's episode_len counts chunks
    assert algo.dataset_info["dataset_source"] == "generated"


def test_remote_learner_trains(local_ray, tiny_dataset_dir):
    algo = tiny_config(tiny_dataset_dir, num_learners=1).build_algo()
    try:
        result = algo.train()
    finally:
        algo.stop()
    assert np.isfinite(learner_losses(result)["total_loss"])
    assert result["num_gradient_steps_lifetime"] == 4


def test_two_learners_average_gradients(local_ray, tiny_dataset_dir):
    """Each learner samples its own batch; averaged gradients keep their weights identical."""
    algo = tiny_config(tiny_dataset_dir, num_learners=2).build_algo()
    try:
        algo.train()
        states = algo.learner_group.foreach_learner(
            lambda learner: (learner.qam_module.get_state(), learner._generator.get_state())
        )
        (weights_a, gen_a), (weights_b, gen_b) = [r.get() for r in states]
    finally:
        algo.stop()
    assert not torch.equal(gen_a, gen_b)  # different sampling streams
    for key in weights_a:
        np.testing.assert_array_equal(weights_a[key], weights_b[key], err_msg=key)


def test_checkpoint_restore_continues_identically(local_ray, tiny_dataset_dir, tmp_path):
    algo = tiny_config(tiny_dataset_dir).build_algo()
    try:
        algo.train()
        algo.save_to_path(str(tmp_path / "ckpt"))
        expected = learner_losses(algo.train())
    finally:
        algo.stop()
    restored = QAM.from_checkpoint(str(tmp_path / "ckpt"))
    try:
        assert learner_losses(restored.train()) == expected
    finally:
        restored.stop()
    fresh = tiny_config(tiny_dataset_dir).build_algo()
    try:
        fresh.restore_from_path(str(tmp_path / "ckpt"))
        assert learner_losses(fresh.train()) == expected
    finally:
        fresh.stop()


def test_rl_module_from_checkpoint_is_a_usable_policy(local_ray, tiny_dataset_dir, tmp_path):
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.rl_module.rl_module import RLModule

    algo = tiny_config(tiny_dataset_dir).build_algo()
    try:
        algo.train()
        algo.save_to_path(str(tmp_path / "ckpt"))
        learner_weights = algo.learner_group.get_state()["learner"]["rl_module"]["default_policy"]
    finally:
        algo.stop()
    module = RLModule.from_checkpoint(str(tmp_path / "ckpt" / "learner_group" / "learner" / "rl_module" / "default_policy"))
    for key, value in module.get_state().items():
        np.testing.assert_array_equal(value, learner_weights[key])
    out = module.forward_inference({Columns.OBS: torch.zeros(3, 28)})
    assert out[Columns.ACTIONS].shape == (3, 25) and float(out[Columns.ACTIONS].abs().max()) <= 1.0


def test_nan_loss_stops_training(local_ray, tiny_dataset_dir):
    algo = tiny_config(tiny_dataset_dir).build_algo()
    try:
        algo.learner_group.foreach_learner(lambda learner: learner.buffer._storage["rewards"].fill_(float("nan")))
        with pytest.raises(NonFiniteLossError, match="non-finite training metrics"):
            algo.train()
    finally:
        algo.stop()

"""QAM on RLlib: config validation, local and remote learners, evaluation EnvRunners, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qam_ray.rllib import FQL, QAM, AgentAlgorithm, AgentConfig, FQLConfig, IFQLConfig, QAMConfig
from qam_ray.training import NonFiniteLossError

TINY = dict(actor_hidden_dims=(16, 16), value_hidden_dims=(16, 16), num_qs=2, flow_steps=3,
            num_steps_per_iteration=4, train_batch_size_per_learner=8)


def tiny_config(dataset_dir, method="QAM", **learners):
    config_class = {"QAM": QAMConfig, "FQL": FQLConfig}[method]
    return (config_class()
            .ogbench("cube-single-play", task=2, dataset_dir=dataset_dir)
            .training(**TINY)
            .learners(**learners)
            .debugging(seed=3))


def learner_losses(result):
    metrics = result["learners"]["default_policy"]
    return {k: float(v) for k, v in metrics.items() if k.endswith("loss")}


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="env_name is not set"):
        QAMConfig().validate()
    with pytest.raises(ValueError, match="method='QAM-X'"):
        QAMConfig().ogbench("cube-double-play", task=1, method="QAM-X")
    config = QAMConfig().training(num_steps_per_iteration=0, fql_alpha=1.0, edit_scale=0.1)
    config.env_name = "cube-double-play-singletask-task1-v0"
    with pytest.raises(ValueError) as err:
        config.validate()
    assert "num_steps_per_iteration" in str(err.value) and "exclusive" in str(err.value)


def test_ogbench_preset_fills_the_registry_values():
    config = QAMConfig().ogbench("puzzle-4x4-play", task=3, method="QAM-E")
    assert (config.env_name, config.inv_temp, config.edit_scale, config.horizon_length, config.sparse) == (
        "puzzle-4x4-play-singletask-task3-v0", 0.1, 0.9, 5, True)
    assert config.action_space.shape == (25,) and config.observation_space.shape == (83,)
    # Per-family classes: FQL's defaults, its per-domain α, and RLlib's own names for γ / clip.
    fql = FQLConfig().ogbench("antmaze-giant-navigate", task=1)
    assert (fql.method, fql.alpha, fql.gamma, fql.grad_clip, fql.horizon_length) == ("FQL", 3.0, 0.995, None, 1)
    assert fql.algo_class is FQL and not hasattr(fql, "inv_temp")
    assert IFQLConfig().training(kappa=0.7).kappa == 0.7
    # The generic config switches families, resetting the hyperparameters to the new family's defaults; a
    # per-family config refuses another family's method.
    switched = AgentConfig().training(inv_temp=5.0).ogbench("scene-play", task=1, method="FQL")
    assert switched.alpha == 300.0 and not hasattr(switched, "inv_temp") and switched.grad_clip is None
    with pytest.raises(ValueError, match="use FQLConfig or AgentConfig"):
        QAMConfig().ogbench("scene-play", task=1, method="FQL")


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
            lambda learner: (learner.agent_module.get_state(), learner._generator.get_state())
        )
        (weights_a, gen_a), (weights_b, gen_b) = [r.get() for r in states]
    finally:
        algo.stop()
    assert not torch.equal(gen_a, gen_b)  # different sampling streams
    for key in weights_a:
        np.testing.assert_array_equal(weights_a[key], weights_b[key], err_msg=key)


def adam_first_moments(learner) -> list[np.ndarray]:
    optimizer = learner.agent_optimizers()["adam"]
    return [optimizer.state[p]["exp_avg"].cpu().numpy() for p in learner.agent_module.agent.online_parameters()]


def test_two_learners_average_their_gradients_rather_than_sum_them(local_ray, tiny_dataset_dir):
    """With both learners sampling the same batch, the averaged gradient equals one learner's own, so Adam's first
    moment m₁ = (1−β₁)·g matches a single learner's exactly; a sum would double it (Adam's first *step* is nearly
    scale-free, so the weights alone could not tell).  No clip here: it would normalise a doubled gradient back."""
    single = tiny_config(tiny_dataset_dir, num_learners=1).training(num_steps_per_iteration=1, grad_clip=None).build_algo()
    try:
        single.train()
        (expected,) = [r.get() for r in single.learner_group.foreach_learner(adam_first_moments)]
    finally:
        single.stop()
    pair = tiny_config(tiny_dataset_dir, num_learners=2).training(num_steps_per_iteration=1, grad_clip=None).build_algo()
    try:
        (rank0_state,) = [r.get() for r in pair.learner_group.foreach_learner(
            lambda learner: learner._generator.get_state())][:1]
        pair.learner_group.foreach_learner(lambda learner: learner._generator.set_state(rank0_state))
        pair.train()
        moments = [r.get() for r in pair.learner_group.foreach_learner(adam_first_moments)]
    finally:
        pair.stop()
    for rank in moments:
        for ours, theirs in zip(rank, expected):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("method, algo_class", [("QAM", QAM), ("FQL", FQL)])
def test_checkpoint_restore_continues_identically(local_ray, tiny_dataset_dir, tmp_path, method, algo_class):
    algo = tiny_config(tiny_dataset_dir, method).build_algo()
    try:
        algo.train()
        algo.save_to_path(str(tmp_path / "ckpt"))
        expected = learner_losses(algo.train())
    finally:
        algo.stop()
    assert len(expected) >= 4  # every loss term of the method, compared exactly
    restored = algo_class.from_checkpoint(str(tmp_path / "ckpt"))
    try:
        assert learner_losses(restored.train()) == expected
    finally:
        restored.stop()
    fresh = tiny_config(tiny_dataset_dir, method).build_algo()
    try:
        fresh.restore_from_path(str(tmp_path / "ckpt"))
        assert learner_losses(fresh.train()) == expected
    finally:
        fresh.stop()
    generic = AgentAlgorithm.from_checkpoint(str(tmp_path / "ckpt"))  # the checkpoint knows its method
    try:
        assert generic.config.method == method and type(generic.config).__name__ == f"{method}Config"
    finally:
        generic.stop()


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


def test_a_horizon_length_override_replays_the_env_with_that_chunk_length(local_ray, tiny_dataset_dir):
    """``--set horizon_length=1`` on a chunk-5 domain used to pass validation and fail at the first update (the
    env kept its 5-action chunks); the env now follows the override, and a mismatch is an error before building."""
    config = tiny_config(tiny_dataset_dir).training(horizon_length=1)
    assert config.action_space.shape == (5,) and config.env_config["horizon"] == 1
    algo = config.evaluation(evaluation_interval=1, evaluation_duration=1).build_algo()
    try:
        result = algo.train()
    finally:
        algo.stop()
    assert np.isfinite(result["learners"]["default_policy"]["total_loss"])
    assert result["evaluation"]["env_runners"]["episode_env_steps"] > 0
    mismatched = tiny_config(tiny_dataset_dir)
    mismatched.horizon_length = 1  # set behind .training()'s back
    with pytest.raises(ValueError, match="the env plays chunks of 5"):
        mismatched.validate()

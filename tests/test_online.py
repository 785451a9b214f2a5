"""Offline-to-online fine-tuning: per-step transitions from EnvRunner episodes, the UTD schedule, and the online
phase on RLlib EnvRunners (2 runners) against the learner-resident buffer, with checkpoint/resume."""

from __future__ import annotations

import numpy as np
import pytest
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from qam_ray.rllib import AgentConfig, QAMConfig
from qam_ray.rllib.algorithm import online_updates
from qam_ray.rllib.chunk_env import episode_transitions

TINY = dict(actor_hidden_dims=(16, 16), value_hidden_dims=(16, 16), num_qs=2, flow_steps=3,
            num_steps_per_iteration=4, train_batch_size_per_learner=8)
FRAGMENT, HORIZON = 5, 5  # chunks per env and iteration; chunk length of cube/puzzle
PER_ITERATION = 2 * FRAGMENT * HORIZON  # env steps per iteration with 2 EnvRunners (no episode ends early)


def chunk_info(start: float, steps: int, terminated_last: bool = False) -> dict:
    """An ActionChunkEnv info for ``steps`` env steps whose observations count up from ``start``."""
    obs = np.arange(start, start + steps + 1, dtype=np.float32)[:, None]
    terminated = np.zeros(steps, np.float32)
    terminated[-1] = float(terminated_last)
    return {"chunk_steps": steps, "transitions": {
        "observations": obs[:-1], "next_observations": obs[1:], "actions": np.full((steps, 2), start, np.float32),
        "rewards": -np.ones(steps, np.float32), "terminated": terminated}}


def test_episode_transitions_keep_order_and_close_every_fragment():
    episode = SingleAgentEpisode()
    episode.add_env_reset(observation=np.zeros(1, np.float32), infos={})
    episode.add_env_step(np.full(1, 2.0, np.float32), np.zeros(4, np.float32), -2.0, infos=chunk_info(0, 2))
    episode.add_env_step(np.full(1, 4.0, np.float32), np.zeros(4, np.float32), -2.0, infos=chunk_info(2, 2))
    continued = episode.cut()  # what an EnvRunner ships next iteration: the carried-over info is not a new step
    continued.add_env_step(np.full(1, 5.0, np.float32), np.zeros(4, np.float32), -1.0, infos=chunk_info(4, 1, True),
                           terminated=True)

    first = episode_transitions([episode])
    np.testing.assert_array_equal(first["observations"][:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(first["terminals"], [0, 0, 0, 1])  # a cut fragment ends with a boundary
    np.testing.assert_array_equal(first["masks"], [1, 1, 1, 1])  # ... but bootstrapping continues through it
    second = episode_transitions([continued])
    np.testing.assert_array_equal(second["observations"][:, 0], [4])  # no duplicate of the carried-over step
    np.testing.assert_array_equal(second["next_observations"][:, 0], [5])
    np.testing.assert_array_equal(second["terminals"], [1])
    np.testing.assert_array_equal(second["masks"], [0])  # success: no bootstrapping
    both = episode_transitions([episode, continued])
    assert set(both) == {"observations", "actions", "next_observations", "rewards", "masks", "terminals"}
    assert len(both["rewards"]) == 5


def test_online_updates_follow_start_and_utd():
    assert online_updates(0, 5000, 5000, 1) == 0  # nothing until start_training env steps exist
    assert online_updates(4990, 5010, 5000, 1) == 10
    assert online_updates(6000, 6050, 5000, 2) == 100
    # A fractional ratio owes exactly floor(utd · (N − start)) updates in total, however the steps arrive.
    rng = np.random.default_rng(0)
    bounds = np.concatenate([[0], np.cumsum(rng.integers(1, 60, 300))])
    total = sum(online_updates(int(a), int(b), 100, 0.3) for a, b in zip(bounds[:-1], bounds[1:]))
    assert total == int(np.floor(0.3 * (bounds[-1] - 100)))


def test_online_config_validation_names_the_problem(tmp_path):
    config = QAMConfig().ogbench("cube-single-play", task=2).online(0, utd_ratio=0, offline_checkpoint=str(tmp_path))
    with pytest.raises(ValueError) as err:
        config.validate()
    message = str(err.value)
    assert "online_steps=0" in message and "utd_ratio=0" in message and "no learner_group/ folder" in message


def offline_checkpoint(dataset_dir, path, domain="cube-single-play", method="QAM", **variant):
    algo = (AgentConfig().ogbench(domain, task=2, method=method, dataset_dir=dataset_dir).training(**TINY, **variant)
            .debugging(seed=3).build_algo())
    try:
        algo.train()
        algo.save_to_path(str(path))
        return algo.learner_group.get_state()["learner"]["rl_module"]["default_policy"]
    finally:
        algo.stop()


def online_config(dataset_dir, checkpoint, domain="cube-single-play", runners=2, online_steps=500,
                  start_training=PER_ITERATION, method="QAM", **variant):
    return (AgentConfig().ogbench(domain, task=2, method=method, dataset_dir=dataset_dir).training(**TINY, **variant)
            .debugging(seed=3)
            .online(online_steps, start_training=start_training, eval_every=250, offline_checkpoint=checkpoint)
            .env_runners(num_env_runners=runners, num_cpus_per_env_runner=0.5, rollout_fragment_length=FRAGMENT)
            .evaluation(evaluation_duration=2))


def learner_state(algo):
    return algo.learner_value(lambda learner: (
        learner.buffer.rows(0), learner.gradient_steps, learner.agent_module.get_state()))


@pytest.fixture(scope="module")
def online_run(local_ray, tiny_dataset_dir, tmp_path_factory):
    """An offline checkpoint, then 500 online env steps on 2 EnvRunners, checkpointed halfway."""
    root = tmp_path_factory.mktemp("online")
    offline_weights = offline_checkpoint(tiny_dataset_dir, root / "offline")
    algo = online_config(tiny_dataset_dir, str(root / "offline")).build_algo()
    try:
        offline_rows = algo.dataset_info["transitions"]
        restored_weights = algo.learner_group.get_state()["learner"]["rl_module"]["default_policy"]
        results, runner_weights, saved = [], [], None
        while not results or results[-1]["online"]["env_steps"] < 500:
            results.append(algo.train())
            runner_weights.append(algo.env_runner_group.foreach_env_runner(
                lambda runner: runner.module.get_state(), local_env_runner=False))
            if results[-1]["online"]["env_steps"] == 250:
                algo.save_to_path(str(root / "online"))
                saved = learner_state(algo)
        learner_weights = algo.learner_group.get_state()["learner"]["rl_module"]["default_policy"]
    finally:
        algo.stop()
    return dict(root=root, offline_rows=offline_rows, offline_weights=offline_weights, restored_weights=restored_weights, results=results,
                runner_weights=runner_weights, learner_weights=learner_weights, saved=saved)


def test_online_phase_starts_from_the_offline_checkpoint(online_run):
    for key, value in online_run["offline_weights"].items():
        np.testing.assert_array_equal(online_run["restored_weights"][key], value, err_msg=key)
    assert online_run["results"][0]["online"]["gradient_steps"] == 4  # the offline steps; online ones wait


def test_rollouts_fill_the_buffer_and_drive_utd_updates(online_run):
    results = online_run["results"]
    steps = [r["online"]["env_steps"] for r in results]
    assert steps == list(range(PER_ITERATION, 501, PER_ITERATION))  # both runners' fragments, every iteration
    offline_rows = online_run["offline_rows"]
    assert [r["online"]["buffer_size"] for r in results] == [offline_rows + s for s in steps]
    # UTD 1 after start_training: no update in the first iteration, one per new env step afterwards.
    assert [r["online"]["updates"] for r in results] == [0] + [PER_ITERATION] * (len(results) - 1)
    assert results[-1]["online"]["gradient_steps"] == 4 + 500 - PER_ITERATION
    assert all(r["online"]["env_steps_per_s"] > 0 and r["online"]["sample_s"] > 0 for r in results)
    assert np.isfinite(results[-1]["learners"]["default_policy"]["total_loss"])


def test_env_runners_act_with_the_learners_weights(online_run):
    learner, runners = online_run["learner_weights"], online_run["runner_weights"][-1]
    assert len(runners) == 2
    for weights in runners:
        assert weights and set(weights) < set(learner)  # inference-only: the critics stay on the learner
        for key, value in weights.items():
            np.testing.assert_array_equal(value, learner[key], err_msg=key)
    # and they really changed during the phase
    first = online_run["runner_weights"][0][0]
    assert any(not np.array_equal(first[k], runners[0][k]) for k in first)


def test_success_is_logged_for_training_and_evaluation_episodes(online_run):
    results = online_run["results"]
    evaluated = [r["online"]["env_steps"] for r in results if "evaluation" in r]
    assert evaluated == [250, 500]  # every eval_every env steps, the last one at the end of the phase
    for result in results:
        if "evaluation" in result:
            assert 0.0 <= result["evaluation"]["env_runners"]["success_rate"] <= 1.0
    # cube-single episodes end after 200 env steps, i.e. in the 4th iteration of each runner
    # (iterations in which no training episode ended report NaN)
    finished = [r for r in results if np.isfinite(r["env_runners"].get("success_rate", np.nan))]
    assert finished and 0.0 <= finished[-1]["env_runners"]["success_rate"] <= 1.0
    assert finished[-1]["env_runners"]["episode_env_steps"] == 200


def test_resume_from_an_online_checkpoint(online_run, tiny_dataset_dir):
    saved_rows, saved_steps, saved_weights = online_run["saved"]
    algo = online_config(tiny_dataset_dir, None).build_algo()
    try:
        algo.restore_from_path(str(online_run["root"] / "online"))
        rows, steps, weights = learner_state(algo)
        for key in saved_rows:
            np.testing.assert_array_equal(rows[key], saved_rows[key], err_msg=key)  # online data came back
        assert steps == saved_steps
        for key in saved_weights:
            np.testing.assert_array_equal(weights[key], saved_weights[key], err_msg=key)
        result = algo.train()
    finally:
        algo.stop()
    assert result["online"]["env_steps"] == 250 + PER_ITERATION
    assert result["online"]["gradient_steps"] == saved_steps + PER_ITERATION


def test_an_online_checkpoint_reopens_after_its_offline_start_is_gone(local_ray, tiny_dataset_dir, tmp_path):
    """The offline folder an online phase started from is often temporary (a sweep trial's hand-over): the online
    checkpoint must not need it (it was pickled into the config before the fix)."""
    import shutil

    from qam_ray.rllib import AgentAlgorithm

    offline_checkpoint(tiny_dataset_dir, tmp_path / "offline")
    shutil.copytree(tmp_path / "offline", tmp_path / "handover")
    algo = online_config(tiny_dataset_dir, str(tmp_path / "handover"), runners=1, start_training=0).build_algo()
    try:
        algo.train()
        algo.save_to_path(str(tmp_path / "online"))
        saved_rows, saved_steps, _ = learner_state(algo)
    finally:
        algo.stop()
    shutil.rmtree(tmp_path / "handover")
    reopened = AgentAlgorithm.from_checkpoint(str(tmp_path / "online"))
    try:
        rows, steps, _ = learner_state(reopened)
        assert steps == saved_steps and len(rows["rewards"]) == len(saved_rows["rewards"])
        assert reopened.train()["online"]["gradient_steps"] > saved_steps
    finally:
        reopened.stop()


def test_sparse_domain_stores_online_rewards_like_its_dataset(local_ray, tiny_puzzle_dataset_dir, tmp_path):
    offline_checkpoint(tiny_puzzle_dataset_dir, tmp_path / "offline", domain="puzzle-3x3-play")
    algo = online_config(tiny_puzzle_dataset_dir, str(tmp_path / "offline"), domain="puzzle-3x3-play",
                         runners=1).build_algo()
    try:
        result = algo.train()
        offline_rows = algo.dataset_info["transitions"]
        rows = algo.learner_value(lambda learner: learner.buffer.rows(offline_rows))
    finally:
        algo.stop()
    assert result["online"]["env_steps"] == FRAGMENT * HORIZON
    assert len(rows["rewards"]) == FRAGMENT * HORIZON
    # puzzle-3x3's raw reward is -(unsolved buttons) in -9..0; sparse domains store -1 until full success
    assert set(np.unique(rows["rewards"])) <= {-1.0, 0.0}
    np.testing.assert_array_equal(rows["observations"][1:], rows["next_observations"][:-1])  # one env, in order


ACTING_MODULES = {"QAM-E": {"actor_fast", "edit_actor"}, "QAM-F": {"one_step_actor"}, "FQL": {"actor_onestep_flow"},
                  "BAM": {"actor_fast"}, "IFQL": {"actor_flow", "critic"}}


@pytest.mark.parametrize("method, variant", [("QAM-E", {"edit_scale": 0.1}), ("QAM-F", {"fql_alpha": 30.0}),
                                             ("FQL", {}), ("BAM", {}), ("IFQL", {"num_samples": 4})],
                         ids=["QAM-E", "QAM-F", "FQL", "BAM", "IFQL"])
def test_every_method_fine_tunes_online_with_its_acting_modules_on_the_env_runners(
        local_ray, tiny_dataset_dir, tmp_path, method, variant):
    """Each method acts through its own policy (QAM-E's edit, QAM-F's and FQL's one-step policy, BAM's f_θ, IFQL's
    flow ranked by the critic); exactly those modules live on the EnvRunners and are synced after the updates."""
    offline_checkpoint(tiny_dataset_dir, tmp_path / "offline", method=method, **variant)
    algo = online_config(tiny_dataset_dir, str(tmp_path / "offline"), runners=1, start_training=0, method=method,
                         **variant).build_algo()
    try:
        result = algo.train()
        learner = algo.learner_group.get_state()["learner"]["rl_module"]["default_policy"]
        (runner,) = algo.env_runner_group.foreach_env_runner(lambda r: r.module.get_state(), local_env_runner=False)
    finally:
        algo.stop()
    assert result["online"]["updates"] == FRAGMENT * HORIZON and np.isfinite(
        result["learners"]["default_policy"]["total_loss"])
    assert {key.split(".")[1] for key in runner} == ACTING_MODULES[method], sorted(runner)
    for key, value in runner.items():
        np.testing.assert_array_equal(value, learner[key], err_msg=key)

"""Evaluation with several EnvRunners reports the exact success rate over every episode, whatever each runner ran.

RLlib merges "mean" metrics of parallel runners as a mean of their means; the success and episode counts are summed
instead (exact), and divided once.  A scripted env with known outcomes, and a ground-truth log of every episode
that ended, shows it.
"""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np

from .conftest import TINY_ENV  # noqa: F401  (the dataset fixture's env)

TINY = dict(actor_hidden_dims=(16, 16), value_hidden_dims=(16, 16), num_qs=2, flow_steps=3,
            num_steps_per_iteration=2, train_batch_size_per_learner=8)


def make_scripted_env(config):
    """Runner 1: one-chunk episodes that all succeed; runner 2: three-chunk episodes that all fail.  Every ended
    episode is appended to ``config['log']``.  Defined in a function, so Ray ships it by value to its workers."""

    class ScriptedChunkEnv(gym.Env):
        def __init__(self):
            self.worker = config.worker_index
            self.length, self.success = (1, 1.0) if self.worker == 1 else (3, 0.0)
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (28,), np.float32)
            self.action_space = gym.spaces.Box(-1.0, 1.0, (25,), np.float32)

        def reset(self, *, seed=None, options=None):
            self.t = 0
            return np.zeros(28, np.float32), {}

        def step(self, action):
            self.t += 1
            done = self.t >= self.length
            if done:
                with open(config["log"], "a") as f:
                    f.write(json.dumps({"worker": self.worker, "success": self.success}) + "\n")
            info = {"success": self.success if done else 0.0, "episode_env_steps": 5 * self.t, "chunk_steps": 5}
            return np.zeros(28, np.float32), 0.0, done, False, info

    return ScriptedChunkEnv()


def test_success_rate_is_the_mean_over_all_episodes_of_all_evaluation_runners(local_ray, tiny_dataset_dir, tmp_path):
    from ray.tune.registry import register_env

    from qam_ray.rllib import QAMConfig

    register_env("qam-scripted-success", make_scripted_env)
    log = tmp_path / "episodes.jsonl"
    config = (QAMConfig().ogbench("cube-single-play", task=2, dataset_dir=tiny_dataset_dir).training(**TINY)
              .evaluation(evaluation_interval=1, evaluation_num_env_runners=2, evaluation_duration=12,
                          evaluation_duration_unit="timesteps"))
    spaces = dict(observation_space=config.observation_space, action_space=config.action_space)
    config.environment("qam-scripted-success", env_config={**config.env_config, "log": str(log)}, **spaces)
    algo = config.build_algo()
    try:
        evaluation = algo.train()["evaluation"]["env_runners"]
    finally:
        algo.stop()
    episodes = [json.loads(line) for line in log.read_text().splitlines()]
    per_worker = {w: [e["success"] for e in episodes if e["worker"] == w] for w in (1, 2)}
    assert per_worker[1] and per_worker[2], per_worker  # both runners ended episodes
    true_mean = np.mean([e["success"] for e in episodes])
    mean_of_means = np.mean([np.mean(v) for v in per_worker.values()])
    assert abs(true_mean - mean_of_means) > 0.05  # the setup tells the two apart (unequal episode counts)
    assert evaluation["success_rate"] == true_mean
    assert evaluation["episodes_ended"] == len(episodes)
    steps = [5 * (1 if e["worker"] == 1 else 3) for e in episodes]
    assert evaluation["episode_env_steps"] == np.mean(steps)

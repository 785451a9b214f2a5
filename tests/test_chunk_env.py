"""ActionChunkEnv plays a chunk of H actions open-loop and stops where the episode ends."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from qam_ray.rllib.chunk_env import ActionChunkEnv


class CountingEnv(gym.Env):
    """Records the actions it receives; terminates on its 3rd step."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), dtype=np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        self.received = []
        return np.zeros(1), {}

    def step(self, action):
        self.received.append(np.array(action))
        n = len(self.received)
        return np.full(1, float(n)), -1.0, n == 3, False, {"success": n == 3}


def test_chunk_is_played_in_order_and_cut_at_termination():
    env = ActionChunkEnv(CountingEnv(), horizon=2)
    assert env.action_space.shape == (4,) and env.observation_space.dtype == np.float32
    env.reset()
    obs, reward, terminated, truncated, info = env.step(np.array([0.1, 0.2, 0.3, 0.4], np.float32))
    np.testing.assert_allclose(np.stack(env.env.received), [[0.1, 0.2], [0.3, 0.4]])
    assert (reward, terminated, info["chunk_steps"], obs.dtype) == (-2.0, False, 2, np.float32)
    obs, reward, terminated, truncated, info = env.step(np.array([0.5, 0.6, 0.7, 0.8], np.float32))
    assert len(env.env.received) == 3  # the chunk's second action is never played
    assert (reward, terminated, info["chunk_steps"], info["success"], float(obs[0])) == (-1.0, True, 1, True, 3.0)
    assert info["episode_env_steps"] == 3


def test_chunk_reports_its_single_step_transitions():
    env = ActionChunkEnv(CountingEnv(), horizon=2)
    env.reset()
    _, _, _, _, first = env.step(np.array([0.1, 0.2, 0.3, 0.4], np.float32))
    _, _, _, _, second = env.step(np.array([0.5, 0.6, 0.7, 0.8], np.float32))
    steps = first["transitions"]
    np.testing.assert_allclose(steps["observations"][:, 0], [0.0, 1.0])  # s_t before each action
    np.testing.assert_allclose(steps["next_observations"][:, 0], [1.0, 2.0])
    np.testing.assert_allclose(steps["actions"], [[0.1, 0.2], [0.3, 0.4]])
    np.testing.assert_allclose(steps["rewards"], [-1.0, -1.0])
    np.testing.assert_allclose(steps["terminated"], [0.0, 0.0])
    last = second["transitions"]  # cut at termination: one step, continuing from the previous chunk's end
    np.testing.assert_allclose(last["observations"][:, 0], [2.0])
    np.testing.assert_allclose(last["actions"], [[0.5, 0.6]])
    np.testing.assert_allclose(last["terminated"], [1.0])

"""OGBench singletask envs for RLlib EnvRunners, with action chunks executed open-loop.

QAM acts in chunks of H actions that are played without re-planning (the official evaluation.py).  RLlib's
EnvRunners call the module once per env step, so the wrapper makes one env step = one chunk: its action space is
the flattened chunk (H·A) and ``step`` plays the H actions in order, stopping early when the episode ends.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.tune.registry import register_env

ENV_ID = "qam-ogbench-chunked"


class ActionChunkEnv(gym.Wrapper):
    """One step = an open-loop chunk of ``horizon`` actions; the reward is the chunk's undiscounted sum."""

    def __init__(self, env: gym.Env, horizon: int):
        super().__init__(env)
        self.horizon = horizon
        low = np.tile(env.action_space.low, horizon).astype(np.float32)
        high = np.tile(env.action_space.high, horizon).astype(np.float32)
        self.action_space = gym.spaces.Box(low, high, dtype=np.float32)
        self.observation_space = gym.spaces.Box(
            -np.inf, np.inf, env.observation_space.shape, dtype=np.float32
        )

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return obs.astype(np.float32), info

    def step(self, chunk):
        actions = np.asarray(chunk, dtype=np.float32).reshape(self.horizon, -1)
        total_reward, steps = 0.0, 0
        for action in actions:
            obs, reward, terminated, truncated, info = self.env.step(action)
            total_reward += float(reward)
            steps += 1
            if terminated or truncated:
                break
        info = dict(info, chunk_steps=steps)
        return obs.astype(np.float32), total_reward, terminated, truncated, info


def make_chunked_env(env_config: dict) -> ActionChunkEnv:
    """RLlib env creator: ``env_config = {"env_name": <singletask name>, "horizon": H}``."""
    import ogbench  # imported here so EnvRunner processes register the OGBench ids themselves

    env = ogbench.make_env_and_datasets(env_config["env_name"], env_only=True)
    return ActionChunkEnv(env, env_config["horizon"])


register_env(ENV_ID, make_chunked_env)


class SuccessMetricsCallback(RLlibCallback):
    """Logs OGBench's ``info['success']`` at each episode's end as ``success_rate`` and the episode length in
    env steps (RLlib's own length counts chunks)."""

    def on_episode_end(self, *, episode, metrics_logger, **kwargs) -> None:
        infos = episode.get_infos()
        metrics_logger.log_value("success_rate", float(infos[-1].get("success", 0.0)), reduce="mean")
        env_steps = sum(int(info.get("chunk_steps", 0)) for info in infos)
        metrics_logger.log_value("episode_env_steps", float(env_steps), reduce="mean")

"""OGBench singletask envs for RLlib EnvRunners, with action chunks executed open-loop.

QAM acts in chunks of H actions that are played without re-planning (the official evaluation.py).  RLlib's
EnvRunners call the module once per env step, so the wrapper makes one env step = one chunk: its action space is
the flattened chunk (H·A) and ``step`` plays the H actions in order, stopping early when the episode ends.

Online training stores single-step transitions, as the reference does (QAM_SPEC §3), so each chunk step also reports
the env steps it played in ``info["transitions"]``; ``episode_transitions`` turns sampled episodes into buffer rows.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.tune.registry import register_env

import qam_ray.data  # noqa: F401  (its warning filter)

ENV_ID = "qam-ogbench-chunked"

# Every algorithm this process builds re-registers RLlib's env wrapper with gymnasium: harmless, silenced by its exact
# text (the OGBench Box warning is silenced by qam_ray.data, imported here for that).
warnings.filterwarnings("ignore", message=r".*Overriding environment rllib-.* already in registry", category=UserWarning)


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
        self._obs, self._episode_steps = obs.astype(np.float32), 0
        return self._obs, info

    def step(self, chunk):
        actions = np.asarray(chunk, dtype=np.float32).reshape(self.horizon, -1)
        observations, rewards, terminations = [self._obs], [], []
        for action in actions:
            obs, reward, terminated, truncated, info = self.env.step(action)
            observations.append(obs.astype(np.float32))
            rewards.append(float(reward))
            terminations.append(bool(terminated))
            if terminated or truncated:
                break
        steps = len(rewards)
        self._obs, self._episode_steps = observations[-1], self._episode_steps + steps
        transitions = {
            "observations": np.stack(observations[:-1]), "actions": actions[:steps].copy(),
            "next_observations": np.stack(observations[1:]), "rewards": np.asarray(rewards, np.float32),
            "terminated": np.asarray(terminations, np.float32),
        }
        info = dict(info, chunk_steps=steps, episode_env_steps=self._episode_steps, transitions=transitions)
        return self._obs, float(sum(rewards)), terminated, truncated, info


def make_chunked_env(env_config: dict) -> ActionChunkEnv:
    """RLlib env creator: ``env_config = {"env_name": <singletask name>, "horizon": H}``."""
    import ogbench  # imported here so EnvRunner processes register the OGBench ids themselves

    env = ogbench.make_env_and_datasets(env_config["env_name"], env_only=True)
    return ActionChunkEnv(env, env_config["horizon"])


register_env(ENV_ID, make_chunked_env)


# Per-episode sums the runners report; RLlib adds sums exactly across runners, while its "mean" merges parallel
# runners as a mean of their means (ray/rllib/utils/metrics/stats/mean.py), not the mean over episodes.
EPISODES, SUCCESSES, ENV_STEPS = "episodes_ended", "successes", "episode_env_steps_sum"


class SuccessMetricsCallback(RLlibCallback):
    """Counts, at each episode's end, the episode, OGBench's ``info['success']`` and the episode's length in env
    steps (RLlib's own length counts chunks, and a training episode here is only its last fragment, so the wrapper
    counts the steps).  ``episode_means`` turns the sums into ``success_rate`` and ``episode_env_steps``."""

    def on_episode_end(self, *, episode, metrics_logger, **kwargs) -> None:
        last = episode.get_infos()[-1]
        metrics_logger.log_value(EPISODES, 1, reduce="sum")
        metrics_logger.log_value(SUCCESSES, float(last.get("success", 0.0)), reduce="sum")
        metrics_logger.log_value(ENV_STEPS, float(last.get("episode_env_steps", 0)), reduce="sum")


def episode_means(runner_results: dict) -> dict:
    """``runner_results`` (an ``env_runners`` result) with the exact means over every episode that ended on any
    runner: ``success_rate`` and ``episode_env_steps`` (NaN when none ended)."""
    episodes = runner_results.get(EPISODES, 0)
    nan = float("nan")
    return {**runner_results, "success_rate": runner_results.get(SUCCESSES, 0.0) / episodes if episodes else nan,
            "episode_env_steps": runner_results.get(ENV_STEPS, 0.0) / episodes if episodes else nan}


def episode_transitions(episodes) -> dict[str, np.ndarray]:
    """The single-step transitions of sampled episode fragments, in buffer layout (``TRANSITION_KEYS``).

    Fragments are appended one after another, so the last transition of every fragment gets ``terminals = 1``:
    at an episode end that is the reference's ``terminals = done``; at a fragment cut by
    ``rollout_fragment_length`` it stops buffer chunks from running into another env's data (those few chunk
    starts then carry no critic/BC loss; ``batch_mode="complete_episodes"`` avoids cuts altogether).
    ``masks = 1 - terminated``: bootstrapping stops only at success, not at a time limit or a cut.
    """
    blocks = []
    for episode in episodes:
        if len(episode) == 0:
            continue
        # The last len(episode) infos belong to this fragment's steps; an earlier one is the reset's or, on a
        # continued fragment, the previous fragment's last step.
        steps = [info["transitions"] for info in episode.get_infos()[-len(episode):]]
        block = {key: np.concatenate([step[key] for step in steps]) for key in steps[0]}
        block["terminals"] = np.zeros_like(block["rewards"])
        block["terminals"][-1] = 1.0
        block["masks"] = 1.0 - block.pop("terminated")
        blocks.append(block)
    if not blocks:
        return {}
    return {key: np.concatenate([block[key] for block in blocks]) for key in blocks[0]}

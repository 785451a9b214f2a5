"""Success-rate evaluation on OGBench singletask envs, executing action chunks open-loop
(the official evaluation.py): the policy is queried once per chunk of H actions, and the whole chunk is
played unless the episode ends first.  Success = ``info['success']`` at the episode's last step."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ChunkPolicy = Callable[[np.ndarray], np.ndarray]  # (B, obs_dim) -> (B, H, A)


def make_eval_env(env_name: str):
    """The singletask env as OGBench builds it (``success_timing='pre'``, ``terminate_at_goal``)."""
    import ogbench

    return ogbench.make_env_and_datasets(env_name, env_only=True)


def run_episode(env, policy: ChunkPolicy, seed: int) -> dict[str, float]:
    # The maze start noise and the oracles use the global numpy RNG, so seed it too (OGBENCH.md §4).
    np.random.seed(seed)
    obs, info = env.reset(seed=seed)
    queue: list[np.ndarray] = []
    length, total_reward, done = 0, 0.0, False
    while not done:
        if not queue:
            queue = list(policy(obs[None].astype(np.float32))[0])
        obs, reward, terminated, truncated, info = env.step(queue.pop(0))
        length += 1
        total_reward += float(reward)
        done = terminated or truncated
    return {"success": float(info["success"]), "length": float(length), "return": total_reward}


def evaluate(env_name: str, policy: ChunkPolicy, episodes: int, seed: int = 0, env=None) -> dict[str, float]:
    """Mean success rate, episode length and return over ``episodes`` seeded episodes."""
    env = env if env is not None else make_eval_env(env_name)
    results = [run_episode(env, policy, seed + i) for i in range(episodes)]
    return {
        "success_rate": float(np.mean([r["success"] for r in results])),
        "episode_length": float(np.mean([r["length"] for r in results])),
        "episode_return": float(np.mean([r["return"] for r in results])),
        "episodes": float(episodes),
    }

"""Every evaluation env of the paper's 10 domains × 5 tasks builds, plays a chunk, reports OGBench's success, and
has the domain's episode limit."""

from __future__ import annotations

import numpy as np
import pytest

from qam_ray.domains import DOMAINS


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_task_env_builds_plays_a_chunk_and_scores(domain):
    from qam_ray.rllib.chunk_env import make_chunked_env

    facts = DOMAINS[domain]
    for env_name in facts.task_env_names:
        env = make_chunked_env({"env_name": env_name, "horizon": facts.horizon_length})
        try:
            assert env.spec.max_episode_steps == facts.episode_length, env_name
            obs, _ = env.reset(seed=0)
            assert obs.shape == (facts.obs_dim,) and env.action_space.shape == (facts.horizon_length * facts.action_dim,)
            obs, reward, terminated, truncated, info = env.step(np.zeros(env.action_space.shape, np.float32))
            assert info["chunk_steps"] == facts.horizon_length and info["success"] in (0.0, 1.0, False, True)
            assert np.isfinite(reward) and obs.shape == (facts.obs_dim,)
        finally:
            env.close()

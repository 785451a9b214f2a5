"""The four locomotion domains end to end on generated data: antmaze and humanoidmaze datasets written offline by the
generator, trained and evaluated through the RLlib algorithm with chunk length 1, the registry's γ, ρ and episode
length reaching the learner and the env."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qam_ray.data.generate import LOCOMOTION_BEHAVIOUR, generate_dataset
from qam_ray.domains import get_domain

TINY = dict(actor_hidden_dims=(16, 16), value_hidden_dims=(16, 16), num_qs=2, flow_steps=3,
            num_steps_per_iteration=2, train_batch_size_per_learner=8)
CASES = {"antmaze-large-navigate": "antmaze-large", "humanoidmaze-medium-navigate": "humanoidmaze-medium"}


@pytest.fixture(scope="module")
def locomotion_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("locomotion")
    for env in CASES.values():
        generate_dataset(env, "navigate", episodes=2, seed=0, out_dir=out, episode_length=60, progress=False)
    return str(out)


def test_generated_locomotion_data_is_tagged_with_its_behaviour_and_reproducible(locomotion_dir, tmp_path):
    manifest = json.loads(open(f"{locomotion_dir}/antmaze-large-navigate-v0.manifest.json").read())
    assert manifest["source"] == "generated" and manifest["behaviour"] == LOCOMOTION_BEHAVIOUR
    again = generate_dataset("antmaze-large", "navigate", episodes=2, seed=0, out_dir=tmp_path, episode_length=60,
                             progress=False)
    first, second = np.load(f"{locomotion_dir}/antmaze-large-navigate-v0.npz"), np.load(again["train_path"])
    assert set(first.files) == {"observations", "actions", "terminals", "qpos", "qvel"}
    for key in first.files:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    assert first["qpos"].shape == (120, 15) and np.abs(first["actions"]).max() <= 1.0
    # The walk moves the ant: its xy leaves the start cell within an episode.
    assert np.linalg.norm(first["qpos"][59, :2] - first["qpos"][0, :2]) > 0.05


@pytest.mark.parametrize("domain", CASES)
def test_a_locomotion_task_trains_and_evaluates_with_its_registry_settings(local_ray, locomotion_dir, domain):
    from qam_ray.rllib import QAMConfig

    facts = get_domain(domain)
    config = (QAMConfig().ogbench(domain, task=1, dataset_dir=locomotion_dir).training(**TINY)
              .evaluation(evaluation_interval=1, evaluation_duration=1))
    assert (config.horizon_length, config.gamma, config.rho) == (1, facts.discount, facts.rho)
    assert config.action_space.shape == (facts.action_dim,) and config.observation_space.shape == (facts.obs_dim,)
    algo = config.build_algo()
    try:
        result = algo.train()
        hp = algo.learner_value(lambda learner: learner.agent_module.agent.hp)
    finally:
        algo.stop()
    assert (hp.horizon_length, hp.discount, hp.rho) == (1, facts.discount, facts.rho)
    assert np.isfinite(result["learners"]["default_policy"]["total_loss"])
    evaluation = result["evaluation"]["env_runners"]
    # A random walk does not reach the goal: the episode runs to the domain's time limit, one env step per chunk.
    assert evaluation["episode_env_steps"] == facts.episode_length and evaluation["success_rate"] == 0.0

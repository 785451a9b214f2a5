"""SAC Flow from scratch (FIXTURE_FORMAT_SACFLOW §5, §14; no fixture covers it): the per-step log-probability with
a learned σ is the Gaussian transition density (including the −log σ − log Δt that the official from-scratch
Flow-T drops), the policy delay and the gradient routing of one update, and an online-only run through RLlib from
an empty buffer (the framework's generic ``Agent.OFFLINE_DATA = False`` path)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from qam_ray.agents import agent_class, sacflow_scratch
from qam_ray.agents.base import sample_draws
from qam_ray.agents.sacflow import standard_normal_log_density, tanh_log_jacobian

OBS, A, H, B = 4, 2, 2, 6
TINY = dict(actor_hidden_dims=(16,), value_hidden_dims=(16, 16), sigma_hidden_dims=(16,), gate_hidden_dim=16,
            transformer_d_model=16, transformer_n_head=2, transformer_n_layers=1, num_qs=2, flow_steps=3)
VARIANTS = {"Flow-G": "SAC-Flow-G-scratch", "Flow-T": "SAC-Flow-T-scratch", "naive": "SAC-Flow-naive-scratch"}


def make(variant: str, **kw):
    cls = agent_class(VARIANTS[variant])
    torch.manual_seed(0)
    return cls(cls.Hyperparams(obs_dim=OBS, action_dim=A, horizon_length=H, variant=variant, **{**TINY, **kw})).double()


def batch():
    g = torch.Generator().manual_seed(1)
    return {"observations": torch.randn(B, OBS, generator=g, dtype=torch.float64),
            "actions": torch.rand(B, H, A, generator=g, dtype=torch.float64) * 2 - 1,
            "rewards": -torch.rand(B, H, generator=g, dtype=torch.float64),
            "masks": torch.ones(B, H, dtype=torch.float64), "valid": torch.ones(B, H, dtype=torch.float64),
            "next_observations": torch.randn(B, H, OBS, generator=g, dtype=torch.float64)}


def draws(agent, seed=2):
    specs = agent.draw_specs(B)
    return {k: v.double() for k, v in sample_draws(specs, torch.Generator().manual_seed(seed), "cpu").items()}


def step_density_errors(agent) -> tuple[float, float]:
    """Largest |logp_steps − log N(x_{k+1}; m_k, std_k²)| and |log_probs − (prior + Σ steps − tanh Jacobian)|, the
    transition density from torch.distributions with σ and the noise space read off the networks directly:
    Flow-G / naive x_{k+1} = x_k + Δt·v + σ(s)·ε; Flow-T x_{k+1} = x_k + (μ_k + σ_k·ε)·Δt (std σ_k·Δt)."""
    hp, actor = agent.hp, agent.actor
    g = torch.Generator().manual_seed(5)
    obs = torch.randn(B, OBS, generator=g, dtype=torch.float64)
    x0 = torch.randn(B, hp.chunk_dim, generator=g, dtype=torch.float64)
    eps = torch.randn(hp.flow_steps, B, hp.chunk_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = agent.rollout(obs, x0, eps)
        dt, step_errors, expected_steps = 1.0 / hp.flow_steps, [], []
        for k in range(hp.flow_steps):
            x, x_next, t = out["xs"][k], out["xs"][k + 1], torch.full((1, 1), k / hp.flow_steps, dtype=torch.float64)
            if hp.variant == "Flow-T":
                parts = {}
                mu = actor.velocity(obs, x, t, parts)
                sigma = actor.squash_log_std(actor.log_std(parts["layer_outputs"][-1])).exp()
                mean, std = x + mu * dt, sigma * dt
            else:
                mean, std = x + dt * actor.velocity(obs, x, t), actor.squash_log_std(actor.log_std(obs)).exp()
            torch.testing.assert_close(x_next, mean + std * eps[k])  # the rollout is this transition
            expected = Normal(mean, std).log_prob(x_next).sum(-1)
            expected_steps.append(expected)
            step_errors.append(float((out["logp_steps"][k] - expected).abs().max()))
        total = (standard_normal_log_density(x0) + torch.stack(expected_steps).sum(0)
                 - tanh_log_jacobian(out["xs"][-1]))
    return max(step_errors), float((out["log_probs"] - total).abs().max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_log_prob_with_learned_sigma_is_the_gaussian_transition_density(variant):
    agent = make(variant)
    step_error, total_error = step_density_errors(agent)
    assert step_error < 1e-10 and total_error < 1e-10


def test_dropping_minus_log_sigma_minus_log_dt_fails_the_density_check(monkeypatch):
    """The official from-scratch Flow-T's log-probability: Σ_d log N(ε; 0, 1) per step, without −log σ_k − log Δt."""
    original = sacflow_scratch.learned_noise_rollout

    def official_flow_t_logp(*args, **kwargs):
        out = original(*args, **kwargs)
        dropped = out["logp_steps"] + out["log_stds"].sum(-1)
        return {**out, "logp_steps": dropped, "log_probs": out["logp_prior"] + dropped.sum(0) - out["logp_tanh"]}

    monkeypatch.setattr(sacflow_scratch, "learned_noise_rollout", official_flow_t_logp)
    step_error, total_error = step_density_errors(make("Flow-T"))
    # per step and dimension, −log(σ_k·Δt) ≥ −log_std_max + log K: never 0 here
    assert step_error > 0.1 and total_error > 0.1


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_loss_term_reaches_only_its_own_module(variant):
    agent = make(variant)
    losses = agent.losses(batch(), draws(agent))
    routes = {"critic": "critic", "actor": "actor", "alpha": "temperature"}
    for term, value in losses.terms.items():
        for module in routes.values():
            grads = torch.autograd.grad(value, list(getattr(agent, module).parameters()), retain_graph=True,
                                        allow_unused=True)
            reached = any(g is not None and bool(g.abs().max() > 0) for g in grads)
            assert reached == (routes[term] == module), (term, module)
    # The learned σ gets the entropy gradient through −log std (not only through the tanh Jacobian).
    sigma_grads = torch.autograd.grad(losses.terms["actor"], list(agent.actor.log_std.parameters()), allow_unused=True)
    assert any(g is not None and bool(g.abs().max() > 0) for g in sigma_grads)


@pytest.mark.parametrize("variant", VARIANTS)
def test_updates_move_the_critic_every_step_and_the_actor_and_alpha_every_policy_delay(variant):
    agent = make(variant, policy_delay=3)
    optimizers = agent.make_optimizers()
    assert {name: opt.param_groups[0]["betas"][0] for name, opt in optimizers.items()} == {
        "actor": 0.5, "critic": 0.5, "alpha": 0.5}
    moved_per_update, keys = [], None
    for i in range(4):
        before = {n: t.detach().clone() for n, t in agent.state_dict().items()}
        metrics, _ = agent.update(optimizers, batch(), draws(agent, seed=10 + i))
        assert all(math.isfinite(float(v)) for v in metrics.values())
        keys = keys or set(metrics)
        assert set(metrics) == keys  # the same metrics on actor and critic-only updates
        after = agent.state_dict()
        moved = {n.split(".")[0] for n in before if not torch.equal(before[n], after[n])}
        moved_per_update.append(moved)
        if moved & {"actor"}:
            # Every actor parameter moves, except Flow-T's q/k projections (one token per row: no gradient) and, in
            # the first update, Flow-G's gate hidden layer (the gate's output kernel starts at 0, §4.1).
            exempt = ("q_proj", "k_proj") + (("gate_hidden",) if i == 0 else ())
            unmoved = [n for n in before if n.startswith("actor.") and torch.equal(before[n], after[n])]
            assert all(any(e in n for e in exempt) for n in unmoved), unmoved
    everything = {"actor", "critic", "temperature"}
    assert moved_per_update == [everything, {"critic"}, {"critic"}, everything]
    # The critic's BatchNorm running statistics follow its train-mode passes (running = 0.99·running + 0.01·batch)
    input_norm = agent.critic.members[0]["norms"][0]
    assert not torch.equal(input_norm.running_var, torch.ones_like(input_norm.running_var))


@pytest.mark.parametrize("target_entropy, grows", [(1e3, True), (-1e3, False)])
def test_alpha_grows_while_the_entropy_is_below_its_target(target_entropy, grows):
    agent = make("Flow-G", target_entropy=target_entropy)
    before = float(agent.temperature())
    agent.update(agent.make_optimizers(), batch(), draws(agent))
    assert (float(agent.temperature()) > before) == grows


def test_the_critic_runs_the_joint_batch_in_train_mode_and_the_actor_loss_in_inference_mode():
    agent = make("Flow-G")
    obs, actions = torch.randn(B, OBS, dtype=torch.float64), torch.rand(B, H * A, dtype=torch.float64)
    running = agent.critic.members[0]["norms"][0].running_mean.clone()
    inference = agent.critic(obs, actions, training=False)
    assert torch.equal(agent.critic.members[0]["norms"][0].running_mean, running)  # not updated
    train = agent.critic(obs, actions, training=True)
    assert not torch.allclose(train, inference)  # batch statistics ≠ the initial running ones
    assert not torch.equal(agent.critic.members[0]["norms"][0].running_mean, running)


def test_online_only_methods_need_no_dataset_and_no_offline_phase(tmp_path):
    from qam_ray.orchestration.presets import data_errors, resolve
    from qam_ray.orchestration.trial import _has_offline_phase
    from qam_ray.rllib import AgentConfig

    config = AgentConfig().ogbench("cube-single-play", task=2, method="SAC-Flow-G-scratch")
    with pytest.raises(ValueError, match="learns online only"):
        config.validate()
    config.online(100, start_training=50).validate()  # no checkpoint, no dataset
    missing = str(tmp_path / "no-such-folder")
    preset, specs, errors = resolve("smoke-online", {"methods": ["SAC-Flow-G-scratch"], "dataset_dir": missing})
    assert not errors and specs and data_errors(preset, generate=False) == []
    _, _, errors = resolve("smoke", {"methods": ["SAC-Flow-G-scratch"]})
    assert any("online-only" in e for e in errors)
    # The trial starts such a method (or a budget of 0 offline steps) with the online phase.
    assert not _has_offline_phase({"method": "SAC-Flow-G-scratch", "steps": 8})
    assert not _has_offline_phase({"method": "SAC-Flow-G", "steps": 0})
    assert _has_offline_phase({"method": "SAC-Flow-G", "steps": 8})


SMOKE = dict(actor_hidden_dims=(16,), value_hidden_dims=(16, 16), sigma_hidden_dims=(16,), gate_hidden_dim=16,
             num_qs=2, flow_steps=4, train_batch_size_per_learner=16)


def test_from_scratch_run_collects_env_steps_and_updates_from_an_empty_buffer(local_ray):
    """Through RLlib with one EnvRunner (the Tune trial's path, ``experiments/sweep.py --preset smoke-online
    --methods SAC-Flow-G-scratch SAC-Flow-T-scratch``, runs the same phase inside a trial)."""
    from qam_ray.rllib import AgentConfig

    per_iteration = 5 * 5  # one EnvRunner, 5 chunks of 5 actions
    algo = (AgentConfig().ogbench("cube-single-play", task=2, method="SAC-Flow-G-scratch").training(**SMOKE)
            .debugging(seed=3).online(3 * per_iteration, start_training=per_iteration, eval_every=3 * per_iteration)
            .env_runners(num_env_runners=1, num_cpus_per_env_runner=0.5, rollout_fragment_length=5)
            .evaluation(evaluation_duration=1)).build_algo()
    try:
        assert algo.dataset_info["transitions"] == 0 and algo.dataset_info["path"] is None
        results = [algo.train() for _ in range(3)]
        held = algo.learner_value(lambda learner: (learner.buffer.size, learner.gradient_steps,
                                                   learner.agent_module.agent.critic_updates))
    finally:
        algo.stop()
    online = [r["online"] for r in results]
    assert [o["env_steps"] for o in online] == [per_iteration, 2 * per_iteration, 3 * per_iteration]
    assert [o["buffer_size"] for o in online] == [o["env_steps"] for o in online]  # online rows only
    assert [o["updates"] for o in online] == [0, per_iteration, per_iteration]  # none before start_training
    assert held == (3 * per_iteration, 2 * per_iteration, 2 * per_iteration)
    assert np.isfinite(results[-1]["learners"]["default_policy"]["total_loss"])
    assert "evaluation" in results[-1]

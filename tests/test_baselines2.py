"""ReBRAC, FEdit, DSRL, FBRAC and FAWAC (FIXTURE_FORMAT_BASELINES2.md): each reproduces its official update on the
shipped fixture, a plausible porting mistake in each makes its check fail, every loss term reaches only its own
module, the targets move as the official code moves them, and independent math checks (finite differences, closed
forms, torch.distributions)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from qam_ray import reference_check
from qam_ray.agents import agent_class, fbrac, fedit, make_hyperparams, rebrac, registry_hyperparams
from qam_ray.agents.base import sample_draws
from qam_ray.core import networks
from qam_ray.core.flow import time_grid
from qam_ray.core.networks import TanhGaussianEditPolicy

FIXTURES = {"ReBRAC": "rebrac_small", "FEdit": "fedit_small", "DSRL": "dsrl_small", "FBRAC": "fbrac_small",
            "FAWAC": "fawac_small"}
FIXTURE_DIR = Path(__file__).parent / "fixtures"


def fixture(method: str) -> str:
    return str(FIXTURE_DIR / f"{FIXTURES[method]}.npz")


def failed(path: str) -> set[str]:
    return {c.name for c in reference_check.check_fixture(path) if not c.ok}


def with_hyperparams(monkeypatch, **changes):
    """The checker builds the agent with ``changes`` on top of the fixture's configuration."""
    original = reference_check.hyperparams_from_config
    monkeypatch.setattr(reference_check, "hyperparams_from_config",
                        lambda agent, config: dataclasses.replace(original(agent, config), **changes))


# --------------------------------------------------------------------------------------------------
# The official updates
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", FIXTURES)
def test_port_matches_the_official_update(method):
    checks = reference_check.check_fixture(fixture(method))
    assert not [(c.name, c.error, c.tol) for c in checks if not c.ok]
    names = {c.name for c in checks}
    targets = agent_class(method).TARGETS
    for update in ("update1", "update2"):
        for key in ("total_loss", "info/critic/critic_loss", "next_actions", "next_v", "target_q", "critic_q",
                    "grad_global_norm"):
            assert f"{update}/{key}" in names, key
        for target in targets:
            assert any(n.startswith(f"{update}/params/{target}.") for n in names), target
    assert any(n.startswith("update1/adam_nu/") for n in names)


def test_rebrac_targets_moved_on_the_actor_less_update_fail(monkeypatch):
    """§6: update 2 of rebrac_small has full_update = false; a port that Polyak-averages anyway fails there only."""
    original = rebrac.joint_step
    monkeypatch.setattr(rebrac, "joint_step", lambda *args, **kwargs: original(*args, **{**kwargs, "polyak": True}))
    bad = failed(fixture("ReBRAC"))
    assert any(n.startswith("update2/params/target_critic.") for n in bad)
    assert any(n.startswith("update2/params/target_actor.") for n in bad)
    assert not any(n.startswith("update1/") for n in bad)


def test_rebrac_unclipped_smoothing_noise_fails(monkeypatch):
    with_hyperparams(monkeypatch, actor_noise_clip=1e30)
    assert "update1/target_noise_scaled" in failed(fixture("ReBRAC"))


def test_fawac_weights_not_capped_fail(monkeypatch):
    with_hyperparams(monkeypatch, awr_weight_cap=1e30)  # 4 of the 8 rows of fawac_small sit at the cap
    bad = failed(fixture("FAWAC"))
    assert {"update1/awr_weight", "update1/info/actor/actor_loss"} <= bad


def test_fbrac_gradient_stopped_through_the_sampler_fails(monkeypatch):
    def detached_between_steps(field, obs, x0, num_steps):
        states = [x0]
        for t in time_grid(num_steps, x0):
            x = states[-1].detach()
            states.append(x + field(obs, x, t) / num_steps)
        return torch.stack(states)

    monkeypatch.setattr(fbrac, "euler_ode_states", detached_between_steps)
    bad = failed(fixture("FBRAC"))
    assert any(n.startswith("update1/grads/actor_flow.") for n in bad)
    assert "update1/info/critic/critic_loss" not in bad  # the TD path is unaffected: the mistake is the BPTT


def test_fedit_log_prob_without_the_tanh_correction_fails(monkeypatch):
    def no_tanh_correction(mean, log_std, eps):
        pre_tanh = mean + log_std.exp() * eps
        log_prob = (-0.5 * eps.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        return pre_tanh, torch.tanh(pre_tanh), log_prob

    monkeypatch.setattr(fedit, "tanh_gaussian_sample", no_tanh_correction)
    bad = failed(fixture("FEdit"))
    assert {"update1/edit_log_probs", "update1/info/actor/edit_entropy_loss"} <= bad


def test_dsrl_latent_map_through_the_online_flow_fails(monkeypatch):
    with_hyperparams(monkeypatch, use_target_latent=False)
    assert {"update1/next_flow_xs", "update1/distill_flow_xs"} <= failed(fixture("DSRL"))


def test_dsrl_distillation_at_policy_latents_is_not_the_official_one(monkeypatch):
    with_hyperparams(monkeypatch, distill_at_policy_latents=True)
    bad = failed(fixture("DSRL"))
    assert "update1/z_qs" in bad and "update1/next_v" not in bad


# --------------------------------------------------------------------------------------------------
# Small float64 agents: routing, Polyak, acting
# --------------------------------------------------------------------------------------------------
OBS, A, H, B = 3, 2, 2, 5
SMALL = dict(obs_dim=OBS, action_dim=A, horizon_length=H, actor_hidden_dims=(16, 16), value_hidden_dims=(16, 16),
             num_qs=3, flow_steps=4)
EXTRA = {"ReBRAC": dict(alpha_actor=0.1, actor_noise=0.2), "FEdit": dict(edit_scale=0.3, best_of_n=2),
         "DSRL": dict(noise_scale=0.8, best_of_n=2), "FBRAC": dict(alpha=3.0, best_of_n=2),
         "FAWAC": dict(inv_temp=1.0)}
ROUTES = {
    "rebrac": {"critic": "critic", "actor_q": "actor", "bc": "actor"},
    "fedit": {"critic": "critic", "bc_flow": "actor_bc_flow", "edit": "edit_actor", "alpha": "alpha"},
    "dsrl": {"critic": "critic", "distill": "z_critic", "flow": "actor_bc_flow", "actor": "actor", "alpha": "alpha"},
    "fbrac": {"critic": "critic", "bc_flow": "actor_flow", "q": "actor_flow"},
    "fawac": {"critic": "critic", "value": "value", "actor": "actor"},
}


def make(method: str, **kw):
    cls = agent_class(method)
    torch.manual_seed(0)
    return cls(cls.Hyperparams(**{**SMALL, **EXTRA[method], **kw})).double()


def batch():
    g = torch.Generator().manual_seed(1)
    valid = torch.ones(B, H, dtype=torch.float64)
    valid[0, 1] = 0.0
    return {"observations": torch.randn(B, OBS, generator=g, dtype=torch.float64),
            "actions": torch.rand(B, H, A, generator=g, dtype=torch.float64) * 2 - 1,
            "rewards": -torch.rand(B, H, generator=g, dtype=torch.float64),
            "masks": torch.ones(B, H, dtype=torch.float64), "valid": valid,
            "next_observations": torch.randn(B, H, OBS, generator=g, dtype=torch.float64)}


def draws(agent):
    specs = agent.draw_specs(B)
    return {k: v.double() for k, v in sample_draws(specs, torch.Generator().manual_seed(2), "cpu").items()}


def test_registry_values_of_the_paper():
    domains = [d for d in agent_class("QAM").PER_DOMAIN["QAM"]]
    column = lambda method, field: [registry_hyperparams(method, f"{d}-singletask-task1-v0")[field]  # noqa: E731
                                    for d in domains]
    assert column("FBRAC", "alpha") == [0.03, 100, 0.1, 0.1, 30, 0.03, 1.0, 0.3, 0.1, 10]
    assert column("DSRL", "noise_scale") == [1.0, 0.4, 1.0, 0.8, 0.6, 1.4, 1.4, 1.0, 1.2, 0.8]
    assert column("FEdit", "edit_scale") == [0.2, 0.2, 0.2, 0.2, 0.5, 0.3, 0.4, 0.8, 0.3, 0.1]
    assert column("FAWAC", "inv_temp") == [0.8, 6.4, 0.8, 6.4, 6.4, 0.8, 0.8, 0.8, 0.8, 0.8]
    assert column("ReBRAC", "alpha_actor") == [0.1, 0.03, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]
    assert column("ReBRAC", "actor_noise") == [0, 0, 0, 0, 0, 0.2, 0.2, 0.2, 0, 0.1]
    hp = make_hyperparams("FEdit", "cube-double-play-singletask-task1-v0", 40, 5)
    assert (hp.target_entropy, hp.clip_grad_max_norm) == (-0.5 * 25, None)
    with pytest.raises(ValueError, match="alpha"):
        agent_class("FBRAC").Hyperparams(obs_dim=1, action_dim=1, alpha=0.0)  # α divides the Q term


@pytest.mark.parametrize("method", FIXTURES)
def test_each_loss_term_reaches_only_its_own_module(method):
    agent = make(method)
    losses = agent.losses(batch(), draws(agent))
    routes = ROUTES[agent.name]
    torch.testing.assert_close(losses.total, sum(losses.terms.values()))
    modules = {name: list(getattr(agent, name).parameters()) for name, _ in agent.named_children()
               if name not in agent.TARGETS}
    assert set(routes.values()) <= set(modules)
    for term, value in losses.terms.items():
        for module, params in modules.items():
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            reached = any(g is not None and bool(g.abs().max() > 0) for g in grads)
            assert reached == (routes[term] == module), (term, module)


@pytest.mark.parametrize("method", FIXTURES)
def test_acting_and_one_update_with_polyak_from_pre_step_weights(method):
    agent = make(method, **({"target_update_period": 1} if method == "ReBRAC" else {}))
    chunks = agent.sample_actions(torch.randn(7, OBS, dtype=torch.float64), torch.Generator().manual_seed(0))
    assert chunks.shape == (7, H, A) and float(chunks.abs().max()) <= 1.0
    before = {n: p.detach().clone() for n, p in agent.named_parameters()}
    metrics, _ = agent.update(agent.make_optimizers(), batch(), draws(agent))
    assert all(math.isfinite(float(v)) for v in metrics.values())
    for name, param in agent.named_parameters():
        module = name.split(".")[0]
        if module in agent.TARGETS:
            online = agent.TARGETS[module] + name[len(module):]
            torch.testing.assert_close(param, agent.hp.tau * before[online] + (1 - agent.hp.tau) * before[name])
        else:
            assert not torch.equal(before[name], param), name


def test_rebrac_targets_follow_the_official_default_or_the_period():
    """Official default (period 0): a plain update never moves the targets; period 2: every second update."""
    for period, moved in ((0, [False, False, False, False]), (2, [False, True, False, True])):
        agent = make("ReBRAC", target_update_period=period)
        optimizers = agent.make_optimizers()
        for expected in moved:
            before = [p.clone() for p in agent.target_actor.parameters()]
            agent.update(optimizers, batch(), draws(agent))
            assert (not all(torch.equal(a, b) for a, b in zip(before, agent.target_actor.parameters()))) == expected
    agent = make("ReBRAC")  # the explicit per-update switch wins over the period
    before = [p.clone() for p in agent.target_critic.parameters()]
    agent.update(agent.make_optimizers(), batch(), draws(agent), full_update=True)
    assert not all(torch.equal(a, b) for a, b in zip(before, agent.target_critic.parameters()))


# --------------------------------------------------------------------------------------------------
# Independent math checks
# --------------------------------------------------------------------------------------------------
def test_fbrac_bptt_gradient_matches_finite_differences():
    """The Q term back-propagates through all K Euler steps: its gradient w.r.t. a field weight equals a central
    difference of the loss."""
    agent = make("FBRAC")
    step_batch, step_draws = batch(), draws(agent)
    weight = agent.actor_flow.net.layers[0].weight

    def q_term():
        return agent.losses(step_batch, step_draws).terms["q"]

    (grad,) = torch.autograd.grad(q_term(), weight)
    eps = 1e-6
    for index in ((0, 0), (3, 4), (7, 1)):
        with torch.no_grad():
            weight[index] += eps
            up = q_term().item()
            weight[index] -= 2 * eps
            down = q_term().item()
            weight[index] += eps
        assert grad[index].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)


def test_rebrac_lambda_is_a_constant():
    """With λ constant, the Q term's actor gradient is λ times the gradient of −mean pess Q(s, π(s))."""
    agent = make("ReBRAC")
    step_batch = batch()
    losses = agent.losses(step_batch, draws(agent))
    params = list(agent.actor.parameters())
    grads = torch.autograd.grad(losses.terms["actor_q"], params)
    obs = step_batch["observations"]
    pi_v = reference_pessimistic(agent.critic(obs, agent.actor(obs)[1]), agent.hp.rho)
    lam = 1.0 / pi_v.detach().abs().mean()
    expected = torch.autograd.grad(-pi_v.mean(), params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, lam * e)


def reference_pessimistic(qs, rho):
    return qs.mean(0) - rho * torch.sqrt(((qs - qs.mean(0)) ** 2).mean(0))


@pytest.mark.parametrize("method", ["FEdit", "DSRL"])
def test_temperature_gradient_is_alpha_times_the_entropy_gap(method):
    """d/d log α of α·(H − H̄) with H constant is α·(H − H̄) (the official loss multiplies α, not log α)."""
    agent = make(method)
    losses = agent.losses(batch(), draws(agent))
    (grad,) = torch.autograd.grad(losses.terms["alpha"], agent.alpha.log_alpha)
    entropy = losses.metrics["edit_entropy" if method == "FEdit" else "entropy"]
    torch.testing.assert_close(grad, agent.alpha() * (entropy - agent.hp.target_entropy))


def test_observation_only_tanh_gaussian_matches_torch_distributions():
    torch.manual_seed(0)
    policy = TanhGaussianEditPolicy(OBS, 4, (8, 8), condition_on_action=False).double()
    obs, eps = torch.randn(B, OBS, dtype=torch.float64), torch.randn(B, 4, dtype=torch.float64)
    mean, log_std = policy.heads(obs)
    pre_tanh, sample, log_prob = networks.tanh_gaussian_sample(mean, log_std, eps)
    h = policy.trunk(obs)
    torch.testing.assert_close(mean, policy.mean(h))
    dist = torch.distributions.TransformedDistribution(torch.distributions.Normal(mean, log_std.exp()),
                                                       [torch.distributions.TanhTransform()])
    torch.testing.assert_close(sample, torch.tanh(mean + log_std.exp() * eps))
    torch.testing.assert_close(log_prob, dist.log_prob(sample).sum(-1), rtol=1e-8, atol=1e-8)


def test_fawac_value_net_regresses_to_the_target_ensemble_mean():
    """Σ_e (Q_e − V)² is minimised at V = mean_e Q_e: with V there, the value loss's gradient w.r.t. V vanishes."""
    agent = make("FAWAC")
    step_batch = batch()
    losses = agent.losses(step_batch, draws(agent))
    value_qs, v_pred = losses.intermediates["value_qs"], losses.intermediates["v_pred"]
    v = value_qs.mean(0).clone().requires_grad_(True)
    valid = step_batch["valid"][:, -1]
    (grad,) = torch.autograd.grad(((value_qs - v).square() * valid).mean(), v)
    torch.testing.assert_close(grad, torch.zeros_like(grad))
    expected = ((value_qs - v_pred).square() * valid).mean()
    torch.testing.assert_close(losses.terms["value"], expected)


# --------------------------------------------------------------------------------------------------
# Training: plain trainer and RLlib, offline → online
# --------------------------------------------------------------------------------------------------
TINY = {"actor_hidden_dims": (16, 16), "value_hidden_dims": (16, 16), "num_qs": 2, "flow_steps": 3}


@pytest.mark.parametrize("method", FIXTURES)
def test_plain_training_is_deterministic_and_resumes_identically(tiny_dataset_dir, method):
    import copy

    from tests.test_training import make_trainer

    a = make_trainer(tiny_dataset_dir, method=method)
    a.train(2)
    state = copy.deepcopy(a.state_dict())
    expected = a.train(2)
    b = make_trainer(tiny_dataset_dir, seed=123, method=method)
    b.load_state_dict(state)
    assert b.train(2) == expected and all(math.isfinite(v) for v in expected.values())


ACTING_MODULES = {"ReBRAC": {"actor"}, "FEdit": {"actor_bc_flow", "edit_actor"},
                  "DSRL": {"actor", "target_actor_bc_flow"}, "FBRAC": {"actor_flow"}, "FAWAC": {"actor"}}


@pytest.mark.parametrize("method", FIXTURES)
def test_rllib_trains_offline_then_fine_tunes_online(local_ray, tiny_dataset_dir, tmp_path, method):
    """An offline RLlib iteration and checkpoint, then an online iteration on one EnvRunner that holds exactly the
    method's acting modules, synced with the learner's weights."""
    import numpy as np

    from tests.test_online import FRAGMENT, HORIZON, offline_checkpoint, online_config

    offline_checkpoint(tiny_dataset_dir, tmp_path / "offline", method=method)
    algo = online_config(tiny_dataset_dir, str(tmp_path / "offline"), runners=1, start_training=0,
                         method=method).build_algo()
    try:
        result = algo.train()
        learner = algo.learner_group.get_state()["learner"]["rl_module"]["default_policy"]
        (runner,) = algo.env_runner_group.foreach_env_runner(lambda r: r.module.get_state(), local_env_runner=False)
    finally:
        algo.stop()
    assert result["online"]["updates"] == FRAGMENT * HORIZON
    assert np.isfinite(result["learners"]["default_policy"]["total_loss"])
    assert {key.split(".")[1] for key in runner} == ACTING_MODULES[method], sorted(runner)
    for key, value in runner.items():
        np.testing.assert_array_equal(value, learner[key], err_msg=key)


# --------------------------------------------------------------------------------------------------
# Other configurations of the format (written from our own agents): every size comes from the file
# --------------------------------------------------------------------------------------------------
WRITER_SMALL = dict(actor_hidden_dims=(8, 8), value_hidden_dims=(6,), flow_steps=3)
CONFIGURATIONS = {
    "ReBRAC-H1-E1-rho0-updates-FT": ("ReBRAC", dict(obs_dim=4, action_dim=3, horizon_length=1, num_qs=1, rho=0.0,
                                                    alpha_actor=0.3, actor_noise=0.3),
                                     {"full_update": [False, True]}),
    "FEdit-n3-K1": ("FEdit", dict(obs_dim=3, action_dim=2, horizon_length=2, num_qs=2, flow_steps=1, best_of_n=3,
                                  edit_scale=0.4), None),
    "DSRL-H1-n1-E3": ("DSRL", dict(obs_dim=5, action_dim=2, horizon_length=1, num_qs=3, best_of_n=1,
                                   noise_scale=1.2), None),
    "FBRAC-n3-E1-K1": ("FBRAC", dict(obs_dim=3, action_dim=1, horizon_length=4, num_qs=1, flow_steps=1, best_of_n=3,
                                     alpha=0.3), None),
    "FAWAC-H1-noLN": ("FAWAC", dict(obs_dim=4, action_dim=2, horizon_length=1, num_qs=2, inv_temp=0.8,
                                    value_layer_norm=False), None),
}


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_checker_reads_every_size_and_flag_from_the_file(tmp_path, name):
    from tests.fixture_writer import write_fixture

    method, hyperparams, per_update = CONFIGURATIONS[name]
    path = tmp_path / f"{name}.npz"
    write_fixture(path, method, per_update=per_update, **{**WRITER_SMALL, **hyperparams})
    checks = reference_check.check_fixture(str(path))
    assert not [(c.name, c.error) for c in checks if not c.ok]
    assert any(c.name.startswith("update2/params/target_critic") for c in checks) and len(checks) > 50

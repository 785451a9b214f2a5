"""Agent properties the fixtures do not cover: gradient routing of every loss term, one update with Polyak from the
pre-step weights, acting, validation, QAM-E, best-of-n, and finite-difference / closed-form checks of the math."""

from __future__ import annotations

import math

import pytest
import torch

from qam_ray.agents import METHOD_NAMES, agent_class, make_hyperparams, registry_hyperparams
from qam_ray.agents.base import sample_draws
from qam_ray.agents.qam import QAMHyperparams
from qam_ray.core import flow
from qam_ray.core.flow import euler_ode, euler_ode_states, lean_adjoint, time_grid
from qam_ray.core.losses import best_of_n, expectile_loss
from qam_ray.core.networks import EnsembleCritic, TanhGaussianEditPolicy, VelocityField, gelu
from qam_ray.core.optim import clip_grad_global_norm_

OBS, A, H, B = 3, 2, 2, 5
SMALL = dict(obs_dim=OBS, action_dim=A, horizon_length=H, actor_hidden_dims=(16, 16), value_hidden_dims=(16, 16),
             num_qs=3, flow_steps=4)
# Each configuration: (agent family's method, extra hyperparameters), and where each loss term's gradient may go.
CASES = {
    "QAM": ("QAM", {"inv_temp": 1.0}), "QAM-F": ("QAM-F", {"inv_temp": 1.0, "fql_alpha": 3.0}),
    "QAM-E": ("QAM-E", {"inv_temp": 1.0, "edit_scale": 0.1}), "FQL": ("FQL", {"alpha": 10.0}),
    "BAM": ("BAM", {"inv_temp": 3.0}), "IFQL": ("IFQL", {"kappa": 0.8, "num_samples": 4}),
}
ROUTES = {
    "qam": {"critic": "critic", "flow": "actor_slow", "adjoint": "actor_fast", "one_step": "one_step_actor",
            "edit": "edit_actor", "alpha": "edit_alpha"},
    "fql": {"critic": "critic", "bc_flow": "actor_bc_flow", "distill": "actor_onestep_flow", "q": "actor_onestep_flow"},
    "bam": {"critic": "critic", "flow": "actor_slow", "bam": "actor_fast"},
    "ifql": {"value": "value", "critic": "critic", "actor": "actor_flow"},
}


def make(case: str, **kw):
    method, extra = CASES[case]
    cls = agent_class(method)
    torch.manual_seed(0)
    hp = cls.Hyperparams(**{**SMALL, **extra, **kw})
    return cls(hp).double()


def batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    valid = torch.ones(B, H, dtype=dtype)
    valid[0, 1] = 0.0  # one chunk crossed an episode end
    return {
        "observations": torch.randn(B, OBS, generator=g, dtype=dtype),
        "actions": torch.rand(B, H, A, generator=g, dtype=dtype) * 2 - 1,
        "rewards": -torch.rand(B, H, generator=g, dtype=dtype),
        "masks": torch.ones(B, H, dtype=dtype),
        "valid": valid,
        "next_observations": torch.randn(B, H, OBS, generator=g, dtype=dtype),
    }


def draws(agent, batch_size=B):
    specs = agent.draw_specs(batch_size)
    return {k: v.double() for k, v in sample_draws(specs, torch.Generator().manual_seed(2), "cpu").items()}


def test_every_method_of_the_registry_builds_with_its_paper_values():
    for method in METHOD_NAMES:
        for domain in ("cube-double-play", "humanoidmaze-medium-navigate"):
            hp = make_hyperparams(method, f"{domain}-singletask-task1-v0", 37, 5)
            assert hp.horizon_length == (1 if "maze" in domain else 5)
            assert agent_class(method).PER_DOMAIN[method].keys() == agent_class("QAM").PER_DOMAIN["QAM"].keys()
    assert registry_hyperparams("FQL", "puzzle-4x4-play-singletask-task1-v0")["alpha"] == 1.0
    assert registry_hyperparams("IFQL", "humanoidmaze-medium-navigate-singletask-task3-v0")["kappa"] == 0.7
    assert registry_hyperparams("BAM", "antmaze-giant-navigate-singletask-task3-v0") == {
        "horizon_length": 1, "discount": 0.995, "rho": 0.5, "inv_temp": 30.0}
    # A generated domain takes its nearest paper domain's values (cube-single → cube-double).
    assert registry_hyperparams("FQL", "cube-single-play-singletask-task2-v0")["alpha"] == 300.0
    # Gradient clipping only where the official agent clips (QAM, BAM).
    clips = {m: make_hyperparams(m, "scene-play-singletask-task1-v0", 40, 5).clip_grad_max_norm for m in METHOD_NAMES}
    expected = {"QAM": 1.0, "QAM-E": 1.0, "QAM-F": 1.0, "FQL": None, "BAM": 1.0, "IFQL": None,
                "ReBRAC": None, "FEdit": None, "DSRL": None, "FBRAC": None, "FAWAC": None}
    assert {m: clips[m] for m in expected} == expected


def test_hyperparams_report_every_problem_with_the_field_name():
    with pytest.raises(ValueError) as err:
        QAMHyperparams(obs_dim=0, action_dim=2, fql_alpha=1.0, edit_scale=0.1, discount=1.5, lr=float("inf"))
    for field in ("obs_dim", "discount", "fql_alpha", "edit_scale", "lr"):
        assert field in str(err.value)
    with pytest.raises(ValueError, match="kappa"):
        agent_class("IFQL").Hyperparams(obs_dim=1, action_dim=1, kappa=1.5)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        make_hyperparams("FQL", "scene-play-singletask-task1-v0", 40, 5, {"inv_temp": 1.0})


@pytest.mark.parametrize("case", CASES)
def test_each_loss_term_reaches_only_its_own_module(case):
    agent = make(case)
    losses = agent.losses(batch(), draws(agent))
    routes = ROUTES[agent.name]
    torch.testing.assert_close(losses.total, sum(losses.terms.values()))
    modules = {name: list(getattr(agent, name).parameters()) for name in set(routes.values()) if hasattr(agent, name)}
    for term, value in losses.terms.items():
        assert math.isfinite(float(value.detach()))
        for module, params in modules.items():
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            reached = any(g is not None and bool(g.abs().max() > 0) for g in grads)
            assert reached == (routes[term] == module), (term, module)
    for target in agent.TARGETS:  # targets never get a gradient
        assert all(not p.requires_grad for p in getattr(agent, target).parameters())


@pytest.mark.parametrize("case", [*CASES, "QAM-tau0", "BAM-tau0"])
def test_action_chunks_and_one_update_with_polyak_from_pre_step_weights(case):
    agent = make(case.split("-tau0")[0], **({"inv_temp": 0.0} if case.endswith("tau0") else {}))
    obs = torch.randn(7, OBS, dtype=torch.float64)
    chunks = agent.sample_actions(obs, torch.Generator().manual_seed(0))
    assert chunks.shape == (7, H, A) and float(chunks.abs().max()) <= 1.0
    optimizers = agent.make_optimizers()
    before = {n: p.detach().clone() for n, p in agent.named_parameters()}
    metrics, _ = agent.update(optimizers, batch(), draws(agent))
    assert all(math.isfinite(float(v)) for v in metrics.values())
    for name, param in agent.named_parameters():
        module = name.split(".")[0]
        if module in agent.TARGETS:  # target' = τ·online_before + (1−τ)·target_before
            online = agent.TARGETS[module] + name[len(module):]
            torch.testing.assert_close(param, agent.hp.tau * before[online] + (1 - agent.hp.tau) * before[name])
        else:
            assert not torch.equal(before[name], param), name


def test_policies_act_with_their_documented_networks():
    obs = torch.randn(4, OBS, dtype=torch.float64)
    z = torch.randn(4, H * A, dtype=torch.float64)
    for case, field in (("QAM", "actor_fast"), ("BAM", "actor_fast")):
        agent = make(case)
        expected = euler_ode(getattr(agent, field), obs, z, 4).clamp(-1, 1)
        torch.testing.assert_close(agent.act(obs, {"z": z}), expected)
        slow = make(case, inv_temp=0.0)  # τ = 0: the behaviour flow is the policy
        torch.testing.assert_close(slow.act(obs, {"z": z}), euler_ode(slow.actor_slow, obs, z, 4).clamp(-1, 1))
        assert slow.acting_modules() == ("actor_slow",)
    fql = make("FQL")
    torch.testing.assert_close(fql.act(obs, {"z": z}), fql.actor_onestep_flow(obs, z).clamp(-1, 1))


def test_ifql_acts_with_the_best_of_n_by_the_ensemble_minimum_for_each_observation():
    agent = make("IFQL")
    obs = torch.randn(3, OBS, dtype=torch.float64)
    noise = torch.randn(3, 4, H * A, dtype=torch.float64)
    batched = agent.act(obs, {"noise": noise})
    for j in range(3):  # one observation at a time, as the official sample_actions does it
        candidates = euler_ode(agent.actor_flow, obs[j].expand(4, OBS), noise[j], 4).clamp(-1, 1)
        score = agent.critic(obs[j].expand(4, OBS), candidates).min(0).values
        torch.testing.assert_close(batched[j], candidates[score.argmax()])


@pytest.mark.parametrize("case", ["FQL", "BAM"])
def test_best_of_n_takes_the_td_action_the_online_critic_ranks_highest(case):
    agent = make(case, best_of_n=3)
    step_batch, step_draws = batch(), draws(agent)
    assert step_draws["target_noise"].shape == (B, 3, H * A)
    next_obs = step_batch["next_observations"][:, -1]
    with torch.no_grad():
        if case == "FQL":
            candidates = agent.actor_onestep_flow(next_obs[:, None], step_draws["target_noise"]).clamp(-1, 1)
        else:
            candidates = euler_ode(agent.actor_fast, next_obs[:, None], step_draws["target_noise"], 4).clamp(-1, 1)
        scores = agent.critic(next_obs[:, None], candidates).mean(0)
    chosen = agent.losses(step_batch, step_draws).intermediates["next_actions"]
    torch.testing.assert_close(chosen, candidates[torch.arange(B), scores.argmax(1)])
    assert best_of_n(torch.tensor([[[0.0], [1.0], [2.0]]]), torch.tensor([[1.0, 3.0, 3.0]])).item() == 1.0  # first tie


def test_bam_sde_gradient_matches_finite_differences():
    """BAM back-propagates through the whole SDE: its gradient w.r.t. an f_θ weight equals a central difference."""
    agent = make("BAM")
    step_batch, step_draws = batch(), draws(agent)
    weight = agent.actor_fast.net.layers[0].weight

    def bam_loss():
        return agent.losses(step_batch, step_draws).terms["bam"]

    (grad,) = torch.autograd.grad(bam_loss(), weight)
    eps = 1e-6
    for index in ((0, 0), (3, 4), (7, 1)):
        with torch.no_grad():
            weight[index] += eps
            up = bam_loss().item()
            weight[index] -= 2 * eps
            down = bam_loss().item()
            weight[index] += eps
        assert grad[index].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


def test_expectile_loss_is_minimised_at_the_expectile():
    """argmin_v mean w·(x − v)² is the κ-expectile: mean over x of κ(x−v)⁺ = (1−κ)(v−x)⁺ (closed form below)."""
    x = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
    kappa = 0.8
    # With v between 1 and 4: κ(4 − v) = (1 − κ)(v + (v − 1)) ⇒ v = (4κ + 1 − κ)/(κ + 2(1 − κ)).
    expected = (4 * kappa + (1 - kappa)) / (kappa + 2 * (1 - kappa))
    v = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([v], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad()
        loss, _ = expectile_loss(x - v, kappa)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert v.item() == pytest.approx(expected, rel=1e-8)


def test_initialisation_follows_the_reference():
    agent = make("QAM")
    # f_θ has its own init (not a copy of f_β); targets start as copies and take no gradients.
    assert not torch.equal(agent.actor_fast.net.layers[0].weight, agent.actor_slow.net.layers[0].weight)
    fresh = agent_class("QAM")(agent.hp)
    for target, online in fresh.TARGETS.items():
        for t, o in zip(getattr(fresh, target).parameters(), getattr(fresh, online).parameters()):
            assert torch.equal(t, o) and not t.requires_grad
    kernel = agent.critic.kernels[0]  # ensemble members are initialised independently; biases are zero
    assert not torch.equal(kernel[0], kernel[1])
    assert all(float(b.detach().abs().max()) == 0 for b in agent.critic.biases)


def test_ensemble_critic_equals_a_loop_over_members():
    torch.manual_seed(0)
    critic = EnsembleCritic(OBS, 4, (8, 8), num_members=3)
    with torch.no_grad():
        for p in list(critic.biases) + list(critic.norm_scales) + list(critic.norm_biases):
            p.normal_()
    obs, act = torch.randn(B, OBS), torch.randn(B, 4)
    expected = []
    for e in range(3):
        x = torch.cat([obs, act], -1)
        for i in range(3):
            x = x @ critic.kernels[i][e] + critic.biases[i][e]
            if i < 2:
                x = torch.nn.functional.layer_norm(gelu(x), (8,), critic.norm_scales[i][e], critic.norm_biases[i][e], 1e-6)
        expected.append(x[:, 0])
    torch.testing.assert_close(critic(obs, act), torch.stack(expected))


def test_lean_adjoint_matches_finite_differences():
    torch.manual_seed(0)
    field = VelocityField(OBS, 4, (8,)).double()
    steps, obs = 3, torch.randn(B, OBS, dtype=torch.float64)
    xs = torch.randn(steps, B, 4, dtype=torch.float64)
    terminal = torch.randn(B, 4, dtype=torch.float64)
    adjoints = lean_adjoint(field, obs, xs, terminal, steps)
    h, times = 1 / steps, time_grid(steps, xs)
    expected, eps = terminal.clone(), 1e-6
    for i in reversed(range(steps)):
        t = times[i] + h
        drift = lambda x: 2 * field(obs, x, t) - x / t  # noqa: E731
        vjp = torch.zeros_like(expected)
        for d in range(4):  # central differences, one input coordinate at a time
            dx = torch.zeros_like(xs[i]); dx[:, d] = eps
            column = (drift(xs[i] + dx) - drift(xs[i] - dx)) / (2 * eps)  # ∂b/∂x_d, (B, D)
            vjp[:, d] = (column * expected).sum(-1)
        expected = expected + h * vjp
        torch.testing.assert_close(adjoints[i], expected, rtol=1e-6, atol=1e-8)


def test_terminal_adjoint_is_the_clipped_critic_gradient(monkeypatch):
    agent = make("QAM")
    obs = torch.randn(B, OBS, dtype=torch.float64)
    x_final = torch.randn(B, 4, dtype=torch.float64) * 1.5  # some coordinates outside [-1, 1]
    captured = {}

    def fake_loss(fine, base, o, x0, noise, steps, terminal_adjoint_fn):
        captured["adj"] = terminal_adjoint_fn(x_final)
        return torch.zeros(()), {"am_adj_terminal": captured["adj"]}

    from qam_ray.agents import qam

    monkeypatch.setattr(qam, "adjoint_matching_loss", fake_loss)
    agent.adjoint_loss(obs, draws(agent))
    eps, expected = 1e-6, torch.zeros_like(x_final)
    q = lambda x: agent.target_critic(obs, x.clamp(-1, 1)).mean(0)  # noqa: E731
    for d in range(4):
        dx = torch.zeros_like(x_final); dx[:, d] = eps
        expected[:, d] = -agent.hp.inv_temp * (q(x_final + dx) - q(x_final - dx)) / (2 * eps)
    torch.testing.assert_close(captured["adj"], expected, rtol=1e-5, atol=1e-7)
    assert bool((captured["adj"][x_final.abs() > 1] == 0).all())


def test_tanh_gaussian_log_density_matches_torch_distributions():
    torch.manual_seed(0)
    policy = TanhGaussianEditPolicy(OBS, 4, (8, 8))
    obs, act, eps = torch.randn(B, OBS), torch.rand(B, 4) * 2 - 1, torch.randn(B, 4)
    edit, log_prob = policy(obs, act, eps)
    h = policy.trunk(torch.cat([obs, act], -1))
    mean, std = policy.mean(h), policy.log_std(h).clamp(-20, 2).exp()
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, std), [torch.distributions.TanhTransform()]
    )
    torch.testing.assert_close(edit, torch.tanh(mean + std * eps))
    torch.testing.assert_close(log_prob, dist.log_prob(edit).sum(-1), rtol=1e-4, atol=1e-4)


def test_euler_states_and_the_sde_step():
    torch.manual_seed(0)
    field = VelocityField(OBS, 4, (8,)).double()
    obs, x0 = torch.randn(B, OBS, dtype=torch.float64), torch.randn(B, 4, dtype=torch.float64)
    states = euler_ode_states(field, obs, x0, 3)
    assert states.shape == (4, B, 4) and torch.equal(states[0], x0)
    torch.testing.assert_close(states[-1], euler_ode(field, obs, x0, 3), rtol=0, atol=0)
    torch.testing.assert_close(states[1], x0 + field(obs, x0, torch.zeros(1, 1, dtype=torch.float64)) / 3)
    t, sigma, noise, v = torch.tensor(0.25), torch.tensor(0.7), torch.randn(B, 4), torch.randn(B, 4)
    x = torch.randn(B, 4)
    h = 1 / 4
    expected = x + h * (2 * v - x / (t + h)) + math.sqrt(h) * sigma * noise
    torch.testing.assert_close(flow.memoryless_sde_step(x, v, t, sigma, noise, 4), expected)


def test_global_norm_clip_matches_optax():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]  # ‖g‖ = 13
    norm = clip_grad_global_norm_(grads, 1.0)
    assert float(norm) == 13.0
    torch.testing.assert_close(grads[0], torch.tensor([3.0, 4.0]) / 13)
    small = [torch.tensor([0.3, 0.4])]  # below the threshold: untouched
    clip_grad_global_norm_(small, 1.0)
    torch.testing.assert_close(small[0], torch.tensor([0.3, 0.4]))


def test_a_parameter_no_loss_reaches_still_gets_a_zero_gradient_as_optax_gives_it():
    """BAM with one flow step has no SDE step, so no loss reaches f_θ: optax still updates it with a zero gradient
    (its Adam moments decay), and the learners' gradient all-reduce needs every gradient to exist."""
    agent = make("BAM", flow_steps=1)
    seen = {}

    def grads_before_the_clip():
        seen.update({name: p.grad for name, p in agent.named_parameters() if p.requires_grad})

    agent.update(agent.make_optimizers(), batch(), draws(agent), on_raw_gradients=grads_before_the_clip)
    assert all(g is not None for g in seen.values())
    fast = [g for name, g in seen.items() if name.startswith("actor_fast.")]
    assert fast and all(float(g.abs().max()) == 0.0 for g in fast)

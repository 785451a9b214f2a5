"""Math-core properties the fixtures do not cover: QAM-E, gradient routing, batched ensemble,
finite-difference checks of the adjoint, the tanh-Gaussian density, acting and validation."""

from __future__ import annotations

import math

import pytest
import torch

from qam_ray.core import qam
from qam_ray.core.flow import lean_adjoint, time_grid
from qam_ray.core.networks import EnsembleCritic, TanhGaussianEditPolicy, VelocityField, gelu

OBS, A, H, B = 3, 2, 2, 5


def make(**kw):
    torch.manual_seed(0)
    kw = {"inv_temp": 1.0, **kw}
    hp = qam.QAMHyperparams(obs_dim=OBS, action_dim=A, horizon_length=H, actor_hidden_dims=(16, 16),
                            value_hidden_dims=(16, 16), num_qs=3, flow_steps=4, **kw)
    return hp, qam.QAMNetworks(hp).double()


def batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return {
        "observations": torch.randn(B, OBS, generator=g, dtype=dtype),
        "actions": torch.rand(B, H, A, generator=g, dtype=dtype) * 2 - 1,
        "rewards": -torch.rand(B, H, generator=g, dtype=dtype),
        "masks": torch.ones(B, H, dtype=dtype),
        "valid": torch.ones(B, H, dtype=dtype),
        "next_observations": torch.randn(B, H, OBS, generator=g, dtype=dtype),
    }


def draws(hp):
    d = qam.sample_draws(hp, B, torch.Generator().manual_seed(2), "cpu")
    for f in d.__dataclass_fields__:
        if getattr(d, f) is not None:
            setattr(d, f, getattr(d, f).double())
    return d


def test_hyperparams_report_every_problem_with_the_field_name():
    with pytest.raises(ValueError) as err:
        qam.QAMHyperparams(obs_dim=0, action_dim=2, fql_alpha=1.0, edit_scale=0.1, discount=1.5)
    text = str(err.value)
    for field in ("obs_dim", "discount", "fql_alpha", "edit_scale"):
        assert field in text


def test_initialisation_follows_the_reference():
    hp, nets = make()
    # f_θ has its own init (not a copy of f_β); targets start as copies and take no gradients.
    assert not torch.equal(nets.actor_fast.net.layers[0].weight, nets.actor_slow.net.layers[0].weight)
    for target_name, online_name in qam.QAMNetworks.TARGET_PAIRS:
        for t, o in zip(getattr(nets, target_name).parameters(), getattr(nets, online_name).parameters()):
            assert torch.equal(t, o) and not t.requires_grad
    # Ensemble members are initialised independently; biases are zero.
    kernel = nets.critic.kernels[0]
    assert not torch.equal(kernel[0], kernel[1])
    assert all(float(b.detach().abs().max()) == 0 for b in nets.critic.biases)


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


def test_terminal_adjoint_is_the_clipped_critic_gradient():
    hp, nets = make()
    obs = torch.randn(B, OBS, dtype=torch.float64)
    x_final = torch.randn(B, 4, dtype=torch.float64) * 1.5  # some coordinates outside [-1, 1]
    captured = {}

    def fake_loss(fine, base, o, x0, noise, steps, terminal_adjoint_fn):
        captured["adj"] = terminal_adjoint_fn(x_final)
        return torch.zeros(()), {"am_adj_terminal": captured["adj"]}

    original = qam.adjoint_matching_loss
    qam.adjoint_matching_loss = fake_loss
    try:
        qam.critic_adjoint_matching_loss(nets, hp, obs, draws(hp), {}, {})
    finally:
        qam.adjoint_matching_loss = original
    eps, expected = 1e-6, torch.zeros_like(x_final)
    q = lambda x: nets.target_critic(obs, x.clamp(-1, 1)).mean(0)  # noqa: E731
    for d in range(4):
        dx = torch.zeros_like(x_final); dx[:, d] = eps
        expected[:, d] = -hp.inv_temp * (q(x_final + dx) - q(x_final - dx)) / (2 * eps)
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


ROUTES = {  # loss term -> the only parameters it may move
    "critic": "critic", "flow": "actor_slow", "adjoint": "actor_fast", "one_step": "one_step_actor",
    "edit": "edit_actor", "alpha": "edit_log_alpha",
}


@pytest.mark.parametrize("variant_kw", [{}, {"fql_alpha": 3.0}, {"edit_scale": 0.1}], ids=["QAM", "QAM-F", "QAM-E"])
def test_each_loss_term_reaches_only_its_own_module(variant_kw):
    hp, nets = make(**variant_kw)
    losses = qam.compute_losses(nets, hp, batch(), draws(hp))
    expected_terms = {"QAM": {"critic", "flow", "adjoint"}, "QAM-F": {"critic", "flow", "adjoint", "one_step"},
                      "QAM-E": {"critic", "flow", "adjoint", "edit", "alpha"}}[hp.variant]
    assert set(losses.terms) == expected_terms
    torch.testing.assert_close(losses.total, sum(losses.terms.values()))
    modules = {name: list(getattr(nets, name).parameters()) if name != "edit_log_alpha" else [nets.edit_log_alpha]
               for name in ROUTES.values() if hasattr(nets, name)}
    for term, value in losses.terms.items():
        assert math.isfinite(float(value.detach()))
        for module, params in modules.items():
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            reached = any(g is not None and bool(g.abs().max() > 0) for g in grads)
            assert reached == (ROUTES[term] == module), (term, module)


@pytest.mark.parametrize("variant_kw", [{}, {"fql_alpha": 3.0}, {"edit_scale": 0.1}, {"inv_temp": 0.0}],
                         ids=["QAM", "QAM-F", "QAM-E", "tau0"])
def test_action_chunks_and_one_update(variant_kw):
    hp, nets = make(**variant_kw)
    obs = torch.randn(7, OBS, dtype=torch.float64)
    chunks = qam.sample_action_chunks(nets, hp, obs, torch.Generator().manual_seed(0))
    assert chunks.shape == (7, H, A) and float(chunks.abs().max()) <= 1.0
    optimizer = qam.make_optimizer(nets, hp)
    before = [p.detach().clone() for p in nets.online_parameters()]
    target_before = [p.clone() for p in nets.target_critic.parameters()]
    metrics, _ = qam.optimization_step(nets, hp, optimizer, batch(), draws(hp))
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert all(not torch.equal(b, p) for b, p in zip(before, nets.online_parameters()))
    # Polyak from the pre-step weights: target' = τ·online_before + (1−τ)·target_before.
    online_critic_before = before[: len(target_before)]
    for t_new, t_old, o_old in zip(nets.target_critic.parameters(), target_before, online_critic_before):
        torch.testing.assert_close(t_new, hp.tau * o_old + (1 - hp.tau) * t_old)


def test_inv_temp_zero_acts_with_the_behaviour_flow():
    hp, nets = make(inv_temp=0.0)
    obs, z = torch.randn(4, OBS, dtype=torch.float64), torch.randn(4, H * A, dtype=torch.float64)
    from qam_ray.core.flow import euler_ode
    torch.testing.assert_close(qam.flow_actions(nets, hp, obs, z), euler_ode(nets.actor_slow, obs, z, 4).clamp(-1, 1))


def test_global_norm_clip_matches_optax():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]  # ‖g‖ = 13
    norm = qam.clip_grad_global_norm_(grads, 1.0)
    assert float(norm) == 13.0
    torch.testing.assert_close(grads[0], torch.tensor([3.0, 4.0]) / 13)
    small = [torch.tensor([0.3, 0.4])]  # below the threshold: untouched
    qam.clip_grad_global_norm_(small, 1.0)
    torch.testing.assert_close(small[0], torch.tensor([0.3, 0.4]))

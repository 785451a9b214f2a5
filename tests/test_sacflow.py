"""SAC Flow (Flow-G, Flow-T; offline-to-online): the official fixtures pass strictly and the checker catches the
format document's plausible mistakes; the rollout's log-probability is the density of the rollout (numerical
integration, independent of the fixtures); the exact and the official tanh Jacobian agree where tanh is not
saturated; gradient norms through the K-step rollout at init; the two training phases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qam_ray import reference_check
from qam_ray.agents import agent_class, make_hyperparams
from qam_ray.agents import sacflow
from qam_ray.agents.base import sample_draws
from qam_ray.agents.sacflow import (DecodedVelocityField, GatedVelocityField, SACFlowAgent, noisy_rollout,
                                    tanh_log_jacobian, tanh_log_jacobian_exact)
from qam_ray.core import optim
from qam_ray.core.networks import VelocityField

FIXTURE_DIR = Path(__file__).parent / "fixtures"
G, T = str(FIXTURE_DIR / "sacflow_g_small.npz"), str(FIXTURE_DIR / "sacflow_t_small.npz")


def failed(path: str) -> set[str]:
    return {c.name for c in reference_check.check_fixture(path) if not c.ok}


# --------------------------------------------------------------------------------------------------
# The official fixtures
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [G, T], ids=["Flow-G", "Flow-T"])
def test_both_public_fixtures_pass_every_check(path):
    checks = reference_check.check_fixture(path)
    assert not [(c.name, c.error, c.tol) for c in checks if not c.ok]
    names = {c.name for c in checks}
    for tag in ("update1/", "update2/", "offline/"):  # the two online updates and the offline `update`
        for key in ("total_loss", "info/alpha/alpha_loss", "target_q", "grad_global_norm", "total_loss_official"):
            assert tag + key in names, tag + key
        assert tag + "grads/temperature.log_alpha" in names and tag + "params/target_critic.kernels.0" in names
    assert {"update1/actor_logp_steps", "offline/bc_flow_loss", "vf/out", "rollout/log_probs", "rollout/sigma",
            "update1/adam_alpha_count", "offline/adam_alpha_count", "init/critic.biases.0"} <= names
    assert ("rollout42/log_probs" in names) == (path == G)  # the official fixed-key rollout (Flow-G only)


def test_checker_catches_a_gate_bias_initialised_to_zero(monkeypatch):
    # Invisible to every update check (the fixture starts from given parameters): only the init check sees it.
    monkeypatch.setattr(GatedVelocityField, "GATE_BIAS_INIT", 0.0)
    assert failed(G) == {"init/actor_onestep_flow.gate_out.bias"}


def test_checker_catches_polyak_from_post_step_weights(monkeypatch):
    def post_step_joint_step(agent, optimizer, batch, draws, on_raw_gradients=None):
        optimizer.zero_grad(set_to_none=True)
        losses = agent.losses(batch, draws)
        losses.total.backward()
        on_raw_gradients()
        optimizer.step()
        optim.polyak_update_(*agent.target_pairs(), agent.hp.tau)  # after the step: wrong
        return losses.metrics, losses.intermediates

    monkeypatch.setattr(sacflow, "joint_step", post_step_joint_step)
    for path in (G, T):
        bad = failed(path)
        assert bad and all("params/target_critic" in name for name in bad), bad


def test_checker_catches_the_official_fixed_noise_and_a_td_rollout_with_sigma_on(monkeypatch):
    rollout = SACFlowAgent.rollout
    # One noise vector at every step (the official PRNGKey(42) behaviour of Flow-G, §13).
    monkeypatch.setattr(SACFlowAgent, "rollout", lambda self, obs, x0, eps, sigma: rollout(
        self, obs, x0, eps[:1].expand_as(eps), sigma))
    assert "update1/actor_log_probs" in failed(G)
    monkeypatch.setattr(SACFlowAgent, "rollout", lambda self, obs, x0, eps, sigma: rollout(
        self, obs, x0, eps, self.hp.online_noise_std))
    for path in (G, T):
        assert "update1/target_q" in failed(path)


def with_config(tmp_path, path: str, **changes) -> str:
    data = dict(np.load(path))
    config = {**json.loads(str(data["config_json"])), **changes}
    data["config_json"] = np.array(json.dumps(config))
    out = tmp_path / Path(path).name
    np.savez(out, **data)
    return str(out)


@pytest.mark.parametrize("changes", [{"q_agg": "min"}, {"inference_noise_std": 0.05}, {"online_noise_std": 0.02},
                                     {"alpha": 10.0}, {"sac_alpha": 0.1}, {"discount": 0.9}, {"tau": 0.01},
                                     {"alpha_lr": 1e-3}, {"target_entropy": -1.0}],
                         ids=lambda c: next(iter(c)))
def test_the_checker_takes_every_setting_from_config_json(tmp_path, changes):
    """Nothing is hard-coded to the public fixtures' values: a config_json that disagrees with the arrays fails."""
    assert failed(with_config(tmp_path, G, **changes))


# --------------------------------------------------------------------------------------------------
# The log-probability is the density of the rollout (D = 1, K = 1, 2; no fixtures)
# --------------------------------------------------------------------------------------------------
def gauss_legendre(low: float, high: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    nodes, weights = np.polynomial.legendre.leggauss(n)
    half = (high - low) / 2
    return torch.tensor(low + half * (nodes + 1)), torch.tensor(half * weights)


def random_gated_field(seed: int) -> GatedVelocityField:
    """A Flow-G field with every weight random (the init's zero gate kernel would make the gate constant), small
    enough that tanh stays unsaturated (|x_K| ≲ 5, where the a-grid resolves the density)."""
    torch.manual_seed(seed)
    field = GatedVelocityField(obs_dim=2, action_dim=1, hidden_dims=(8, 8), gate_hidden_dim=8).double()
    with torch.no_grad():
        for p in field.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return field


def path_log_prob(field, obs, states: list[torch.Tensor], action: torch.Tensor, sigma: float) -> torch.Tensor:
    """log π of the rollout path x_0 … x_{K−1}, x_K = atanh(a), from the agent's own rollout: the noises that
    produce the path are ε_k = (x_{k+1} − m_k)/σ."""
    num_steps, xs = len(states), [*states, torch.atanh(action)]
    eps = torch.stack([(xs[k + 1] - xs[k] - field(obs, xs[k], torch.full_like(xs[k], k / num_steps)) / num_steps)
                       / sigma for k in range(num_steps)])
    return noisy_rollout(field, obs, states[0], eps, sigma, num_steps)["log_probs"]


def marginal_cdf(field, obs, num_steps: int, sigma: float, upper: float, nodes: int) -> float:
    """P(a ≤ upper) = ∫_{−1}^{upper} ∫ exp(log π(x_0 … x_{K−1}, a)) dx_0 … dx_{K−1} da, by Gauss-Legendre."""
    grids = [gauss_legendre(-8.0, 8.0, nodes) for _ in range(num_steps)] + [gauss_legendre(-1.0, upper, 2 * nodes)]
    points = torch.meshgrid(*[g[0] for g in grids], indexing="ij")
    weights = math.prod(torch.meshgrid(*[g[1] for g in grids], indexing="ij"))
    flat = [p.reshape(-1, 1) for p in points]
    with torch.no_grad():
        density = path_log_prob(field, obs, flat[:-1], flat[-1], sigma).exp()
    return float((density * weights.reshape(-1)).sum())


@pytest.mark.parametrize("num_steps", [1, 2])
def test_log_probability_integrates_to_the_rollout_distribution(num_steps):
    field, sigma = random_gated_field(num_steps), 0.5
    obs = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    nodes = 80 if num_steps == 1 else 50
    assert marginal_cdf(field, obs, num_steps, sigma, 1.0, nodes) == pytest.approx(1.0, abs=2e-4)  # a density
    # ... and the density of the rollout: its marginal CDF is that of sampled actions.
    g = torch.Generator().manual_seed(7)
    n = 400_000
    with torch.no_grad():
        actions = noisy_rollout(field, obs, torch.randn(n, 1, generator=g, dtype=torch.float64),
                                torch.randn(num_steps, n, 1, generator=g, dtype=torch.float64), sigma,
                                num_steps)["actions"]
    for upper in (-0.6, 0.1, 0.9):
        sampled = float((actions <= upper).double().mean())
        assert marginal_cdf(field, obs, num_steps, sigma, upper, nodes) == pytest.approx(sampled, abs=4e-3), upper


def test_exact_tanh_jacobian_agrees_with_the_official_form_where_tanh_is_not_saturated():
    x = torch.linspace(-3.0, 3.0, 601, dtype=torch.float64)[:, None]
    one_minus_y2 = 1.0 - torch.tanh(x).square()
    exact, official = tanh_log_jacobian_exact(x), tanh_log_jacobian(x)
    torch.testing.assert_close(exact, one_minus_y2.log().sum(-1), rtol=0, atol=1e-12)
    # log(1 − y² + 1e-6) − log(1 − y²) = log(1 + 1e-6/(1 − y²)) ≤ 1e-6/(1 − y²): about 1e-4 at |x| = 3.
    assert ((official - exact) - (1e-6 / one_minus_y2[:, 0])).abs().max() < 1e-8
    x32 = torch.linspace(-2.0, 2.0, 401)[:, None]  # float32, as the agents compute it
    torch.testing.assert_close(tanh_log_jacobian(x32), tanh_log_jacobian_exact(x32), rtol=0, atol=3e-5)
    # Saturated: tanh rounds to ±1 in float32 and the official form floors at log(1e-6) while the exact one goes on.
    saturated = torch.tensor([[12.0]])
    assert tanh_log_jacobian(saturated) == pytest.approx(math.log(1e-6), rel=1e-6)
    assert tanh_log_jacobian_exact(saturated) == pytest.approx(2 * (math.log(2) - 12), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Gradient norms through the K-step rollout at init (the paper's claim, §2.3 of SEED_METHODS)
# --------------------------------------------------------------------------------------------------
def rollout_gradient_norms(field, obs, chunk_dim: int, num_steps: int) -> tuple[float, float]:
    """(mean_B ‖∂x_K/∂x_0‖₂, ‖∇_θ Σ a·w‖) of the K-step Euler rollout (σ = 0: the recurrence itself; with σ > 0
    more steps would also mean more noise), w a fixed random direction.  The Jacobian comes from one backward pass
    over D copies of the batch, copy d seeded with the unit vector e_d."""
    g = torch.Generator().manual_seed(1)
    batch = obs.shape[0]
    x0 = torch.randn(batch, chunk_dim, generator=g)
    direction = torch.randn(x0.shape, generator=g)
    copies = x0.repeat(chunk_dim, 1).requires_grad_(True)  # (D·B, D)
    no_noise = torch.zeros(num_steps, *copies.shape)
    out = noisy_rollout(field, obs.repeat(chunk_dim, 1), copies, no_noise, 1.0, num_steps)
    unit = torch.eye(chunk_dim).repeat_interleave(batch, 0)
    (jacobian_rows,) = torch.autograd.grad((out["xs"][-1] * unit).sum(), copies, retain_graph=True)
    jacobian = jacobian_rows.reshape(chunk_dim, batch, chunk_dim).transpose(0, 1)  # (B, D, D)
    field.zero_grad()
    (out["actions"][:batch] * direction).sum().backward()
    grad_norm = torch.sqrt(sum(p.grad.square().sum() for p in field.parameters() if p.grad is not None))
    return float(torch.linalg.matrix_norm(jacobian, ord=2).mean()), float(grad_norm)


def test_gradient_norms_through_the_rollout_at_init_over_k():
    torch.manual_seed(0)
    obs_dim, chunk_dim = 9, 6
    fields = {"Flow-G": GatedVelocityField(obs_dim, chunk_dim, (32,) * 4, 32),
              "Flow-T": DecodedVelocityField(obs_dim, chunk_dim, 16, 4, 2),
              "plain MLP": VelocityField(obs_dim, chunk_dim, (32,) * 4)}
    obs = torch.randn(8, obs_dim)
    norms = {name: {k: rollout_gradient_norms(field, obs, chunk_dim, k) for k in (4, 16, 64)}
             for name, field in fields.items()}
    for name, by_k in norms.items():
        print(name, {k: f"‖∂x_K/∂x_0‖ {j:.3f}, ‖∇θ‖ {g:.2f}" for k, (j, g) in by_k.items()})
    for name in ("Flow-G", "Flow-T"):  # bounded in K: within a factor 1.5 from K = 4 to K = 64
        for i in (0, 1):
            values = [by_k[i] for by_k in norms[name].values()]
            assert max(values) / min(values) < 1.5, (name, values)
    # The gate (≈ 0.993 at init) pulls x toward the candidate: a contraction, ‖∂x_K/∂x_0‖ ≈ e^{−z} < 1 at any K.
    assert all(j < 0.6 for j, _ in norms["Flow-G"].values())
    # With Δt = 1/K the plain MLP's path Jacobian is ∏(I + J/K) → exp(∫J dt): at init it neither grows nor
    # vanishes with K either (≈ 1 at xavier init).  The paper's blow-up is a training-time effect, not an init one.
    assert all(0.8 < j < 1.25 for j, _ in norms["plain MLP"].values())


# --------------------------------------------------------------------------------------------------
# Registry, phases and the α optimiser
# --------------------------------------------------------------------------------------------------
def tiny_agent(method: str) -> SACFlowAgent:
    overrides = dict(actor_hidden_dims=(16, 16), value_hidden_dims=(16, 16), gate_hidden_dim=8,
                     transformer_d_model=16, transformer_n_head=2, transformer_n_layers=1)
    hp = make_hyperparams(method, "cube-double-play-singletask-task2-v0", 7, 3, overrides)
    torch.manual_seed(0)
    return agent_class(method)(hp)


def tiny_batch(agent: SACFlowAgent, batch_size: int = 5) -> dict:
    hp, g = agent.hp, torch.Generator().manual_seed(3)
    return {"observations": torch.randn(batch_size, hp.obs_dim, generator=g),
            "actions": torch.rand(batch_size, hp.horizon_length, hp.action_dim, generator=g) * 2 - 1,
            "rewards": -torch.rand(batch_size, hp.horizon_length, generator=g),
            "masks": torch.ones(batch_size, hp.horizon_length), "valid": torch.ones(batch_size, hp.horizon_length),
            "next_observations": torch.randn(batch_size, hp.horizon_length, hp.obs_dim, generator=g)}


@pytest.mark.parametrize("method", ["SAC-Flow-G", "SAC-Flow-T", "SAC-Flow-naive"])
def test_offline_steps_run_update_then_online_update_and_the_online_phase_only_online_update(method):
    agent = tiny_agent(method)
    assert agent.hp.variant == {"SAC-Flow-G": "Flow-G", "SAC-Flow-T": "Flow-T", "SAC-Flow-naive": "naive"}[method]
    assert agent.hp.horizon_length == 5
    assert agent.hp.flow_steps == 4 and agent.hp.alpha == 100.0 and agent.hp.discount == 0.99
    optimizers, batch = agent.make_optimizers(), tiny_batch(agent)
    specs = agent.draw_specs(5)
    assert {"bc_fm_x0", "bc_target_eps", "actor_eps", "target_eps"} <= set(specs)
    metrics, _ = agent.update(optimizers, batch, sample_draws(specs, torch.Generator().manual_seed(0), "cpu"))
    assert metrics["bc_flow_loss"] > 0 and metrics["q_loss"] != 0
    log_alpha = agent.temperature.log_alpha
    # Two network steps and two α steps per offline training step (the α step of `update` has a zero gradient).
    assert int(optimizers["alpha"].state[log_alpha]["step"]) == 2
    assert int(optimizers["adam"].state[agent.critic.kernels[0]]["step"]) == 2
    assert float(log_alpha.detach()) < math.log(0.2)  # the path log-density is positive and the target entropy 0
    agent.begin_online_phase()
    specs = agent.draw_specs(5)
    assert set(specs) == {"target_x0", "target_eps", "actor_x0", "actor_eps"}
    agent.update(optimizers, batch, sample_draws(specs, torch.Generator().manual_seed(1), "cpu"))
    assert int(optimizers["alpha"].state[log_alpha]["step"]) == 3
    actions = agent.sample_actions(batch["observations"], torch.Generator().manual_seed(2))
    assert actions.shape == (5, 5, 3) and actions.abs().max() < 1


def test_acting_draws_fresh_noise_for_every_step():
    agent = tiny_agent("SAC-Flow-G")
    specs = agent.act_draw_specs(4)
    assert specs["eps"] == ("normal", (agent.hp.flow_steps, 4, agent.hp.chunk_dim))
    draws = sample_draws(specs, torch.Generator().manual_seed(0), "cpu")
    assert not torch.equal(draws["eps"][0], draws["eps"][1])


def test_search_space_covers_the_bc_weight_sigma_on_and_initial_alpha():
    optuna = pytest.importorskip("optuna")
    trial = optuna.trial.FixedTrial({"alpha": 30.0, "online_noise_std": 0.1, "sac_alpha": 0.05})
    assert SACFlowAgent.search_space(trial, "SAC-Flow-T") == {"alpha": 30.0, "online_noise_std": 0.1,
                                                               "sac_alpha": 0.05}


def test_finetune_smoke_trains_offline_with_bc_then_online_without(local_ray, tiny_dataset_dir, tmp_path):
    """experiments/finetune.py --preset smoke: the offline phase's steps carry the BC flow-matching loss, the online
    phase's do not (the learner calls begin_online_phase), on one MLflow timeline per method."""
    from tests.test_finetune import finetune, history, trial_runs

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert finetune.main(["--preset", "smoke", "--methods", "SAC-Flow-G", "SAC-Flow-T", "--dataset-dir",
                          tiny_dataset_dir, "--tracking-uri", uri, "--storage-path", str(tmp_path / "results"),
                          "--name", "sacflow"]) == 0
    client, runs = trial_runs(uri, "sacflow")
    assert sorted(r.data.tags["method"] for r in runs) == ["SAC-Flow-G", "SAC-Flow-T"]
    for run in runs:
        assert run.info.status == "FINISHED"
        bc = history(client, run, "train/bc_flow_loss")
        assert [s for s, _ in bc] == [4, 8, 108] and bc[0][1] > 0 and bc[1][1] > 0 and bc[2][1] == 0.0

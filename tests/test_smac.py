"""SMAC has no public code and so no fixture: these closed-form, finite-difference and definition checks pin down its
math instead (issue 14 item 5), plus the gradient routing of every loss term, the Muon / Adam split, the return-to-go
column and the offline → online hand-off to TD3."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qam_ray.agents import agent_class
from qam_ray.agents.base import sample_draws
from qam_ray.agents.smac import SMACAgent, SMACHyperparams
from qam_ray.data.replay import ChunkReplayBuffer, returns_to_go

OBS, A, H, B = 3, 2, 2, 6
SMALL = dict(obs_dim=OBS, action_dim=A, horizon_length=H, actor_hidden_dims=(16, 16), value_hidden_dims=(16, 16),
             scale_hidden_dims=(8,), num_qs=3, score_hidden_dim=8, score_num_blocks=1, time_dim=4)
# Where each loss term's gradient may go (every other module must get none).
ROUTES = {"td": {"critic"}, "sm": {"critic", "scale"}, "score": {"score_model"}, "actor": {"actor"},
          "alpha": {"temperature"}}


def make(cls=SMACAgent, dtype=torch.float64, **kw) -> SMACAgent:
    torch.manual_seed(0)
    return cls(SMACHyperparams(**{**SMALL, **kw})).to(dtype)


def batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    valid = torch.ones(B, H, dtype=dtype)
    valid[0, 1] = 0.0
    return {"observations": torch.randn(B, OBS, generator=g, dtype=dtype),
            "actions": torch.rand(B, H, A, generator=g, dtype=dtype) * 2 - 1,
            "rewards": -torch.rand(B, H, generator=g, dtype=dtype), "masks": torch.ones(B, H, dtype=dtype),
            "valid": valid, "next_observations": torch.randn(B, H, OBS, generator=g, dtype=dtype),
            "returns_to_go": -10 * torch.rand(B, generator=g, dtype=dtype)}


def draws(agent, batch_size=B, seed=2):
    specs = agent.draw_specs(batch_size)
    return {k: v.double() for k, v in sample_draws(specs, torch.Generator().manual_seed(seed), "cpu").items()}


# --------------------------------------------------------------------------------------------------
# A known behaviour policy: π_b(a|s) = N(m(s), diag σ²), its exact score, and ε at "k = 1" = −s_k·score
# --------------------------------------------------------------------------------------------------
SIGMA = torch.tensor([0.4, 0.6], dtype=torch.float64)
S_K = 0.3  # √(1 − ᾱ_1) of the analog: an exact ε-prediction is −s_k·∇ₐ log p


def behaviour_mean(obs):
    return torch.stack((0.5 * obs[..., 0], -0.3 * obs[..., 0]), dim=-1)


def behaviour_score(obs, actions):
    return -(actions - behaviour_mean(obs)) / SIGMA**2


class ExactEps(nn.Module):
    """The score model replaced by the exact ε of π_b (the condition is [s, w]; w is ignored)."""

    def forward(self, condition, actions, t, keep=None, record=None):
        return -S_K * behaviour_score(condition[..., :-1], actions)


class LogDensityCritic(nn.Module):
    """Q(s, a) = α·log π_b(a|s) for every member: the max-ent optimum's critic (up to a function of s)."""

    def __init__(self, alpha: float, members: int = 2):
        super().__init__()
        self.alpha, self.members = alpha, nn.ModuleList(nn.Identity() for _ in range(members))

    def per_member(self, obs, actions, detach_params=False):
        log_density = (-0.5 * ((actions - behaviour_mean(obs)) / SIGMA) ** 2 - SIGMA.log()).sum(-1)
        return self.alpha * log_density


def set_constant_scale(agent, value: float) -> None:
    """α_ψ(s) ≡ value: the last layer's weights 0 and its bias ``value``."""
    last = agent.scale.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(value)


def gaussian_agent(**kw):
    agent = make(obs_dim=1, action_dim=2, horizon_length=1, num_qs=1, value_hidden_dims=(64, 64), **kw)
    agent.score_model = ExactEps()
    return agent


def behaviour_samples(n, seed):
    g = torch.Generator().manual_seed(seed)
    obs = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 - 1
    actions = (behaviour_mean(obs) + SIGMA * torch.randn(n, 2, generator=g, dtype=torch.float64)).clamp(-1, 1)
    return obs, actions, torch.cat((obs, torch.zeros(n, 1, dtype=torch.float64)), -1)


def test_score_matching_is_zero_at_the_true_scale_for_q_equal_to_alpha_log_pi():
    """With Q = α·log π_b, ∇ₐQ = α·score = −(α/s_k)·ε, so L_SM = 0 at α_ψ = −α/s_k and > 0 at any other scale; the
    least-squares α_ψ over a batch is exactly that value."""
    alpha = 0.7
    agent = gaussian_agent()
    agent.critic = LogDensityCritic(alpha)
    obs, actions, condition = behaviour_samples(256, seed=0)
    true_scale = -alpha / S_K
    for scale, zero in ((true_scale, True), (0.5 * true_scale, False), (-true_scale, False), (0.0, False)):
        set_constant_scale(agent, scale)
        loss = agent.score_matching_loss(obs, actions, condition)[0]
        assert (float(loss.detach()) < 1e-20) == zero, (scale, float(loss))
    grads = agent.action_gradients(obs, actions)[0].detach()
    eps = agent.score_model(condition, actions, None)
    assert float((grads * eps).sum() / eps.square().sum()) == pytest.approx(true_scale, rel=1e-12)


def train_score_matching(agent, parameters, lr: float, steps: int, first_seed: int) -> None:
    """Adam on L_SM alone over ``parameters``, a fresh behaviour batch of 256 per step."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    for step in range(steps):
        obs, actions, condition = behaviour_samples(256, seed=first_seed + step)
        loss = agent.score_matching_loss(obs, actions, condition)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_a_critic_trained_with_score_matching_alone_recovers_the_behaviour_score():
    """L_SM alone has the trivial minimum Q = const, α_ψ = 0 (TD fixes the scale in SMAC), so the closed-form check
    holds one side fixed at a time: (1) α_ψ ≡ c frozen, the critic learns ∇ₐQ = c·ε = −c·s_k·score; (2) the critic
    fixed at α·log π_b, α_ψ learns its true scale −α/s_k."""
    agent = gaussian_agent()
    c = -2.0
    set_constant_scale(agent, c)
    train_score_matching(agent, agent.critic.parameters(), lr=3e-3, steps=250, first_seed=10)
    obs, actions, condition = behaviour_samples(512, seed=1)
    grads = agent.action_gradients(obs, actions)[0].detach()
    expected = -c * S_K * behaviour_score(obs, actions)
    assert float((grads - expected).norm() / expected.norm()) < 0.1
    assert float(torch.nn.functional.cosine_similarity(grads, expected, dim=-1).mean()) > 0.99

    alpha = 0.7
    agent = gaussian_agent(scale_hidden_dims=(16,))
    agent.critic = LogDensityCritic(alpha)
    train_score_matching(agent, agent.scale.parameters(), lr=1e-2, steps=300, first_seed=1000)
    obs = torch.linspace(-1, 1, 9, dtype=torch.float64)[:, None]
    torch.testing.assert_close(agent.scale(obs).detach(), torch.full((9, 1), -alpha / S_K, dtype=torch.float64),
                               rtol=0.03, atol=0.0)


def test_the_score_matching_sampler_draws_half_policy_half_uniform_actions():
    agent = make()
    n = 20_000
    obs = torch.randn(n, OBS, dtype=torch.float64)
    step_draws = draws(agent, n)
    mixed = agent.mixed_actions(obs, step_draws)
    from_policy = step_draws["sm_choice"] < 0.5
    fraction = float(from_policy.double().mean())
    assert abs(fraction - 0.5) < 4 * math.sqrt(0.25 / n)  # Bernoulli(½) per row
    with torch.no_grad():
        policy = agent.sample(obs, step_draws["sm_policy_eps"])[0]
    torch.testing.assert_close(mixed[from_policy], policy[from_policy])
    uniform = mixed[~from_policy]
    torch.testing.assert_close(uniform, 2 * step_draws["sm_uniform"][~from_policy] - 1)
    assert float(uniform.abs().max()) <= 1.0
    assert abs(float(uniform.mean())) < 0.02 and abs(float(uniform.var()) - 1 / 3) < 0.02  # U[−1, 1]


def test_action_gradients_per_member_and_the_double_backward_match_finite_differences():
    agent = make()
    obs = torch.randn(4, OBS, dtype=torch.float64)
    actions = torch.rand(4, H * A, dtype=torch.float64) * 2 - 1
    grads = agent.action_gradients(obs, actions)  # (E, B, D)
    assert grads.shape == (3, 4, H * A)
    assert not torch.allclose(grads[0], grads[1])  # independent members, each with its own gradient
    h = 1e-6
    for d in range(H * A):
        shift = torch.zeros_like(actions)
        shift[:, d] = h
        with torch.no_grad():
            fd = (agent.critic(obs, actions + shift) - agent.critic(obs, actions - shift)) / (2 * h)
        torch.testing.assert_close(grads[..., d], fd, rtol=1e-6, atol=1e-9)

    # One double-backward step: ∂L_SM/∂(a critic weight) against central differences of L_SM itself.
    condition = torch.cat((obs, torch.rand(4, 1, dtype=torch.float64)), -1)
    weight = agent.critic.members[1].layers[0].weight

    def sm_loss():
        return agent.score_matching_loss(obs, actions, condition)[0]

    (grad,) = torch.autograd.grad(sm_loss(), weight)
    def shifted_loss(index, delta):  # L_SM itself takes a gradient, so only the shift is done without one
        with torch.no_grad():
            weight[index] += delta
        value = float(sm_loss().detach())
        with torch.no_grad():
            weight[index] -= delta
        return value

    for index in ((0, 0), (5, 2), (11, 6)):
        up, down = shifted_loss(index, h), shifted_loss(index, -h)
        assert float(grad[index]) == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)


def route_violations(agent) -> list[tuple[str, str, bool]]:
    """(term, module, reached) wherever a term's gradient reaches a module it must not, or misses one it must."""
    losses = agent.losses(batch(), draws(agent))
    modules = ("actor", "critic", "scale", "temperature", "score_model")
    bad = []
    for term, value in losses.terms.items():
        for module in modules:
            params = list(getattr(agent, module).parameters())
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            reached = any(g is not None and bool(g.abs().max() > 0) for g in grads)
            if reached != (module in ROUTES[term]):
                bad.append((term, module, reached))
    return bad


def test_each_loss_term_reaches_only_its_own_modules():
    agent = make()
    losses = agent.losses(batch(), draws(agent))
    assert set(losses.terms) == set(ROUTES)
    torch.testing.assert_close(losses.total, sum(losses.terms.values()))
    assert route_violations(agent) == []
    for target in agent.TARGETS:
        assert all(not p.requires_grad for p in getattr(agent, target).parameters())


class ScoreNotDetached(SMACAgent):
    """A plausible mistake: L_SM computed through the score model instead of with its output held constant."""

    def score_matching_loss(self, obs, actions, condition):
        eps_pred = self.score_model(condition, actions, torch.zeros(actions.shape[0], 1, dtype=actions.dtype))
        grads = self.action_gradients(obs, actions)
        return (grads - self.scale(obs) * eps_pred).square().sum(-1).mean(), {}


class ScaleDetached(SMACAgent):
    """Another: α_ψ left out of L_SM's graph (it would never learn its scale)."""

    def score_matching_loss(self, obs, actions, condition):
        with torch.no_grad():
            eps_pred = self.score_model(condition, actions, torch.zeros(actions.shape[0], 1, dtype=actions.dtype))
        grads = self.action_gradients(obs, actions)
        return (grads - self.scale(obs).detach() * eps_pred).square().sum(-1).mean(), {}


@pytest.mark.parametrize("mutant, caught", [(ScoreNotDetached, ("sm", "score_model", True)),
                                            (ScaleDetached, ("sm", "scale", False))])
def test_the_routing_check_catches_a_score_model_or_scale_mistake(mutant, caught):
    assert caught in route_violations(make(mutant))


def test_muon_steps_the_matrices_as_its_definition_and_adam_the_rest():
    """torch.optim.Muon against its definition on a tiny matrix: B ← μB + g, Nesterov g + μB, five quintic
    Newton–Schulz steps X ← aX + (bXXᵀ + c(XXᵀ)²)X from X/‖X‖_F, θ ← θ − 0.2·√max(A, B)·lr·O (in float64 here; torch
    orthogonalises in bfloat16, hence the tolerance)."""
    torch.manual_seed(0)
    for shape in ((3, 5), (5, 3)):
        theta = torch.randn(*shape, dtype=torch.float64)
        param = nn.Parameter(theta.clone())
        lr, mu = 0.01, 0.95
        muon = torch.optim.Muon([param], lr=lr, momentum=mu, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
        buf = torch.zeros_like(theta)
        for _ in range(2):
            g = torch.randn(*shape, dtype=torch.float64)
            param.grad = g.clone()
            muon.step()
            buf = mu * buf + g
            x = g + mu * buf
            x = x.T if shape[0] > shape[1] else x
            x = x / x.norm()
            for _ in range(5):
                gram = x @ x.T
                x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
            x = x.T if shape[0] > shape[1] else x
            theta = theta - 0.2 * math.sqrt(max(shape)) * lr * x
            torch.testing.assert_close(param.detach(), theta, rtol=0, atol=0.05 * 0.2 * math.sqrt(max(shape)) * lr)
        singular = torch.linalg.svdvals(x)  # orthogonalised: every singular value near 1 (the quintic's 0.5–1.5)
        assert float(singular.min()) > 0.5 and float(singular.max()) < 1.5

    agent = make()
    optimizers = agent.make_optimizers()
    networks = [p for m in (agent.actor, agent.critic, agent.scale) for p in m.parameters()]
    muon_params = optimizers["muon"].param_groups[0]["params"]
    adam_params = optimizers["adam"].param_groups[0]["params"]
    assert all(p.ndim == 2 for p in muon_params) and all(p.ndim != 2 for p in adam_params)
    assert {id(p) for p in muon_params} | {id(p) for p in adam_params} == {id(p) for p in networks}
    assert not {id(p) for p in muon_params} & {id(p) for p in adam_params}
    everything = {id(p) for opt in optimizers.values() for g in opt.param_groups for p in g["params"]}
    assert everything == {id(p) for p in agent.online_parameters()}
    ablation = make(optimizer="adam").make_optimizers()
    assert "muon" not in ablation and len(ablation["adam"].param_groups[0]["params"]) == len(networks)


def test_returns_to_go_are_the_discounted_sums_within_each_episode_and_zero_online():
    rewards = torch.tensor([1.0, 2.0, 3.0, -1.0, 0.5, 4.0, 1.0])
    terminals = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # episodes [0, 3), [3, 5), [5, 7) (data end)
    gamma = 0.9
    expected, g = [], 0.0
    for r, d in zip(reversed(rewards.tolist()), reversed(terminals.tolist())):
        g = r + gamma * (1 - d) * g if d == 0 else r
        expected.append(g)
    torch.testing.assert_close(returns_to_go(rewards, terminals, gamma), torch.tensor(expected[::-1]))
    long = torch.rand(3000)
    loop, g = [], 0.0
    for r in reversed(long.tolist()):
        g = r + 0.99 * g
        loop.append(g)
    torch.testing.assert_close(returns_to_go(long, torch.zeros(3000), 0.99), torch.tensor(loop[::-1]))

    arrays = {"observations": torch.randn(7, 2), "next_observations": torch.randn(7, 2), "actions": torch.randn(7, 1),
              "rewards": rewards, "masks": torch.ones(7), "terminals": terminals}
    buffer = ChunkReplayBuffer.from_arrays(arrays, "cpu", capacity=10)
    plain = buffer.gather_chunks(torch.tensor([0, 3]), 2, gamma)
    assert "returns_to_go" not in plain  # other agents' batches are unchanged
    buffer.add_extras(SMACAgent.DATASET_EXTRAS, gamma)
    buffer.add_transitions(**{k: v[:2] for k, v in arrays.items()})  # two online rows
    chunks = buffer.gather_chunks(torch.tensor([0, 3, 5, 7]), 2, gamma)
    torch.testing.assert_close(chunks["returns_to_go"], torch.tensor([expected[6], expected[3], expected[1], 0.0]))
    assert set(buffer.rows(7)) == {"observations", "next_observations", "actions", "rewards", "masks", "terminals"}


def test_acting_is_the_sac_policy_or_td3_exploration():
    obs = torch.randn(5, OBS, dtype=torch.float64)
    eps = torch.randn(5, H * A, dtype=torch.float64)
    sac = make()
    torch.testing.assert_close(sac.act(obs, {"eps": eps}), sac.sample(obs, eps)[0].detach())
    td3 = make(online_learner="td3")
    expected = (torch.tanh(td3.actor.heads(obs)[0]) + 0.1 * eps).clamp(-1, 1).detach()
    torch.testing.assert_close(td3.act(obs, {"eps": eps}), expected)
    assert td3.sample_actions(obs, torch.Generator().manual_seed(0)).shape == (5, H, A)
    with pytest.raises(ValueError, match="online_learner"):
        SMACHyperparams(**SMALL, online_learner="ppo")


@pytest.mark.parametrize("online_learner", ["td3", "sac"])
def test_the_offline_checkpoint_continues_online_with_the_same_weights(online_learner):
    """Offline SMAC updates; a fresh agent (online phase first, then the offline state loaded, as the learner does)
    holds the same weights; online, the score model and α_ψ stay fixed, and with TD3 the actor and the targets
    move on every second update only."""
    offline = make(online_learner=online_learner)
    optimizers = offline.make_optimizers()
    for seed in range(3):
        offline.update(optimizers, batch(), draws(offline, seed=seed))
    online = make(online_learner=online_learner)
    online.begin_online_phase()
    online_optimizers = online.make_optimizers()
    online.load_state_dict(offline.state_dict())
    for name, optimizer in online_optimizers.items():
        optimizer.load_state_dict(optimizers[name].state_dict())
    for (name, p), q in zip(online.named_parameters(), offline.parameters()):
        assert torch.equal(p, q), name
    assert not {"sm_choice", "ddpm_t"} & set(online.draw_specs(B))

    online_batch = {k: v for k, v in batch().items() if k != "returns_to_go"}  # online rows need no w

    def snapshot(module):
        return [p.detach().clone() for p in getattr(online, module).parameters()]

    for step in range(4):
        before = {m: snapshot(m) for m in ("actor", "critic", "target_actor", "target_critic", "score_model", "scale")}
        metrics, _ = online.update(online_optimizers, online_batch, draws(online, seed=10 + step))
        assert all(math.isfinite(float(v)) for v in metrics.values())
        moved = {m: any(not torch.equal(a, b) for a, b in zip(before[m], snapshot(m))) for m in before}
        actor_step = online_learner == "sac" or step % 2 == 0
        assert moved == {"actor": actor_step, "critic": True, "target_actor": actor_step,
                         "target_critic": actor_step, "score_model": False, "scale": False}, step


def test_smac_is_registered_without_a_fixture_and_trains_on_a_buffer():
    assert agent_class("SMAC") is SMACAgent and SMACAgent.FIXTURE_FORMAT is None
    from qam_ray.training import OfflineTrainer

    g = torch.Generator().manual_seed(0)
    n = 40
    arrays = {"observations": torch.randn(n, OBS, generator=g), "next_observations": torch.randn(n, OBS, generator=g),
              "actions": torch.rand(n, A, generator=g) * 2 - 1, "rewards": -torch.rand(n, generator=g),
              "masks": torch.ones(n), "terminals": (torch.arange(n) % 20 == 19).float()}
    hp = SMACHyperparams(**SMALL)
    trainer = OfflineTrainer("SMAC", hp, ChunkReplayBuffer.from_arrays(arrays, "cpu"), batch_size=8)
    metrics = trainer.train(2)
    assert {"td_loss", "sm_loss", "score_loss", "actor_loss", "alpha_loss", "total_loss"} <= set(metrics)


def test_the_search_space_gives_valid_hyperparameters():
    optuna = pytest.importorskip("optuna")
    trial = optuna.trial.FixedTrial({"kappa": 0.1, "lr": 3e-4, "muon_lr": 1e-3, "sac_alpha": 0.1})
    values = SMACAgent.search_space(trial, "SMAC")
    assert set(values) == {"kappa", "lr", "muon_lr", "sac_alpha"}
    SMACHyperparams(**SMALL, **values)

"""SAC Flow from scratch (Zhang et al., ICLR 2026): online-only SAC with a flow policy whose every Euler step is a
Gaussian transition with a **learned**, state-dependent σ, as the official ``Elessar123/SAC-FLOW@3df8b9d``
``from_scratch_code/SAC_flow_{gru,transformer}_jax.py`` (and ``Naive_sac_flow_jax.py``) train it.  No fixture
covers this track; FIXTURE_FORMAT_SACFLOW.md §5 and §14 describe it.  The velocity networks are sacflow.py's.

    rollout   x_{k+1} = x_k + Δt·v_θ(s, x_k, t_k) + std_k ⊙ ε_k,   a = tanh(x_K)
              Flow-G / naive: noise in state space, std_k = σ_φ(s)                          (§14)
              Flow-T:         noise in velocity space, std_k = σ_k·Δt, σ_k from the decoder (§14)
    log π     log N(x_0) + Σ_k Σ_d [−½ε² − ½log 2π − log std_k] − Σ_d log(1 − a² + 1e-6)
              (Flow-T: −log std_k = −log σ_k − log Δt, the term its official code drops, §5 / §13)
    critic    CrossQ: Q(s, a) and Q(s′, a′) in ONE train-mode BatchNorm pass, no target network (τ = 1);
              y = r + γ^H·m·(min_E Q(s′, a′) − α·log π(a′|s′)) held constant; L_Q = ½·Σ_E mean_B (Q − y)²·v
    actor     every ``policy_delay``-th update: L_π = mean_B(α·log π(a_π|s) − min_E Q(s, a_π)), the critic in
              inference mode and constant; L_α = α·(H − H_target) with H = −mean log π, H_target = 0

The official runs use batch 512 and start learning after 50,000 env steps:
``.training(train_batch_size_per_learner=512)`` and ``.online(start_training=50_000)``.

Differences from the official scripts (single-step MuJoCo, §14), all on purpose:
- the velocity networks are the offline-to-online ones (sacflow.py: Flow-G's raw time input and GELU candidate MLP,
  Flow-T's LayerNorm decoder), without the scripts' sinusoidal time embedding and BatchRenorm inside the actor;
- the critic uses BatchNorm, not BatchRenorm (identical until the renorm correction starts at 100k steps);
- Flow-T's log-probability keeps −log σ_k − log Δt (its script drops it, §5);
- on OGBench the policy acts in chunks of the domain's ``horizon_length`` like every method here (γ^H bootstrap);
  ``horizon_length=1`` gives the scripts' per-step SAC.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from qam_ray.agents.base import NORMAL, Agent, AgentHyperparams, Losses, non_negative, positive_int
from qam_ray.agents.sacflow import (DecodedVelocityField, GatedVelocityField, dense, standard_normal_log_density,
                                    tanh_log_jacobian, velocity_policy_errors)
from qam_ray.core.flow import time_grid
from qam_ray.core.losses import chunk_step, td_target
from qam_ray.core.networks import MLP, Temperature, VelocityField
from qam_ray.core.optim import fill_missing_grads, make_adam, optimizer_step
from qam_ray.domains import DOMAIN_NAMES



# --------------------------------------------------------------------------------------------------
# Hyperparameters (§14)
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SACFlowScratchHyperparams(AgentHyperparams):
    """The official from-scratch defaults (§14).  ``lr`` is the actor's Adam rate; ``tau`` and ``rho`` are unused
    (no target network; the ensemble is aggregated by its minimum)."""

    variant: str = "Flow-G"  # velocity network: "Flow-G" (gated), "Flow-T" (decoded) or "naive" (plain MLP)
    num_qs: int = 2  # critic ensemble size E
    flow_steps: int = 4  # K Euler steps
    actor_hidden_dims: tuple[int, ...] = (512,)  # velocity (Flow-G candidate, naive MLP) hidden layers
    value_hidden_dims: tuple[int, ...] = (1024, 1024)  # critic hidden layers (ReLU, BatchNorm)
    gate_hidden_dim: int = 512  # Flow-G: the gate's hidden layer
    sigma_hidden_dims: tuple[int, ...] = (512, 512)  # Flow-G / naive: ReLU MLP of log σ_φ(s)
    log_std_min: float = -5.0  # log σ = min + (max − min)·(tanh(·) + 1)/2
    log_std_max: float = 2.0
    transformer_d_model: int = 96  # Flow-T token width d
    transformer_n_head: int = 4
    transformer_n_layers: int = 2
    lr: float = 3e-4  # actor Adam
    critic_lr: float = 1e-3
    alpha_lr: float = 1e-3
    adam_b1: float = 0.5  # β₁ of all three Adams (β₂ 0.999)
    batch_norm_momentum: float = 0.99  # flax convention: running = m·running + (1 − m)·batch
    batch_norm_eps: float = 1e-3
    sac_alpha: float = 1.0  # initial α (log α = 0; not stated in §14, CleanRL's autotune start)
    target_entropy: float = 0.0  # the official −|A|·0
    policy_delay: int = 3  # actor and α update once per this many critic updates

    def __post_init__(self):
        if isinstance(self.sigma_hidden_dims, list):
            object.__setattr__(self, "sigma_hidden_dims", tuple(self.sigma_hidden_dims))
        super().__post_init__()

    def errors(self) -> list[str | None]:
        errors = super().errors() + velocity_policy_errors(self) + [positive_int(self, "policy_delay")]
        errors += [non_negative(self, name) for name in ("critic_lr", "alpha_lr", "batch_norm_eps")]
        dims = self.sigma_hidden_dims
        if not (isinstance(dims, tuple) and dims and all(isinstance(w, int) and w >= 1 for w in dims)):
            errors.append(f"sigma_hidden_dims={dims!r}: must be a non-empty sequence of positive integers")
        if not (isinstance(self.log_std_min, (int, float)) and isinstance(self.log_std_max, (int, float))
                and self.log_std_min < self.log_std_max):
            errors.append(f"log_std_min={self.log_std_min!r}, log_std_max={self.log_std_max!r}: need min < max")
        for name in ("adam_b1", "batch_norm_momentum"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                errors.append(f"{name}={value!r}: must be in [0, 1)")
        return errors


PER_DOMAIN = {method: {domain: {"variant": variant} for domain in DOMAIN_NAMES}
              for method, variant in (("SAC-Flow-G-scratch", "Flow-G"), ("SAC-Flow-T-scratch", "Flow-T"),
                                      ("SAC-Flow-naive-scratch", "naive"))}


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------
class FlowActor(nn.Module):
    """The velocity network and its learned noise scale.  ``step`` returns v_k and the log std of x_{k+1} given x_k:
    log σ_φ(s) (Flow-G, naive: noise in state space) or log σ_k + log Δt (Flow-T: noise σ_k·ε in velocity space,
    σ_k read from the decoder's output token)."""

    def __init__(self, hp: SACFlowScratchHyperparams):
        super().__init__()
        s, d = hp.obs_dim, hp.chunk_dim
        self.variant, self.log_std_range = hp.variant, (hp.log_std_min, hp.log_std_max)
        if hp.variant == "Flow-G":
            self.velocity = GatedVelocityField(s, d, hp.actor_hidden_dims, hp.gate_hidden_dim)
        elif hp.variant == "naive":
            self.velocity = VelocityField(s, d, hp.actor_hidden_dims)
        else:
            self.velocity = DecodedVelocityField(s, d, hp.transformer_d_model, hp.transformer_n_head,
                                                 hp.transformer_n_layers)
        if hp.variant == "Flow-T":
            self.log_std = dense(hp.transformer_d_model, d)  # head on the decoded token
        else:
            self.log_std = MLP(s, hp.sigma_hidden_dims, d, activation=F.relu)

    def squash_log_std(self, raw: torch.Tensor) -> torch.Tensor:
        low, high = self.log_std_range
        return low + 0.5 * (high - low) * (torch.tanh(raw) + 1.0)

    def step(self, obs, x, t, dt: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.variant == "Flow-T":
            parts = {}
            velocity = self.velocity(obs, x, t, parts)
            return velocity, self.squash_log_std(self.log_std(parts["layer_outputs"][-1])) + math.log(dt)
        return self.velocity(obs, x, t), self.squash_log_std(self.log_std(obs)).expand_as(x)


class BatchNormCritic(nn.Module):
    """CrossQ's critic (§14), E members of BN(input) → [Dense → ReLU → BN]×L → Dense 1 (BatchRenorm in the official
    code, here BatchNorm: the renorm correction only starts after 100k steps).  ``training``: batch statistics, and
    the running ones are updated; otherwise the running statistics.  ``detach_params``: the critic as a constant."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims, num_members: int, momentum: float, eps: float):
        super().__init__()
        widths = [obs_dim + action_dim, *hidden_dims]
        self.momentum, self.eps = 1.0 - momentum, eps  # torch's momentum weighs the new batch
        self.members = nn.ModuleList()
        for _ in range(num_members):
            norms = nn.ModuleList(nn.BatchNorm1d(w, eps=eps, momentum=self.momentum) for w in widths)
            layers = nn.ModuleList([*(dense(i, o) for i, o in zip(widths[:-1], widths[1:])), dense(widths[-1], 1)])
            self.members.append(nn.ModuleDict({"norms": norms, "layers": layers}))

    def forward(self, obs, actions, training: bool, detach_params: bool = False) -> torch.Tensor:
        x = torch.cat((obs, actions), dim=-1)
        param = (lambda p: p.detach()) if detach_params else (lambda p: p)  # noqa: E731
        outputs = []
        for member in self.members:
            h = x
            for i, norm in enumerate(member["norms"]):
                if i:
                    h = F.relu(F.linear(h, param(member["layers"][i - 1].weight), param(member["layers"][i - 1].bias)))
                h = F.batch_norm(h, norm.running_mean, norm.running_var, param(norm.weight), param(norm.bias),
                                 training, self.momentum, self.eps)
            last = member["layers"][-1]
            outputs.append(F.linear(h, param(last.weight), param(last.bias)).squeeze(-1))
        return torch.stack(outputs)


# --------------------------------------------------------------------------------------------------
# The rollout with learned noise and its exact per-step log-probability (§5, §14)
# --------------------------------------------------------------------------------------------------
def learned_noise_rollout(actor: FlowActor, obs, x0, eps, num_steps: int) -> dict[str, torch.Tensor]:
    """x_{k+1} = m_k + std_k ⊙ ε_k with m_k = x_k + Δt·v_k; a = tanh(x_K).  Each step term is log N(x_{k+1}; m_k,
    diag std_k²) = Σ_d [−½ε_{k,d}² − ½log 2π − log std_{k,d}], the log std carrying −log σ (and −log Δt for Flow-T)."""
    dt = 1.0 / num_steps
    xs, log_stds, logp_steps = [x0], [], []
    for k, t in enumerate(time_grid(num_steps, x0)):
        velocity, log_std = actor.step(obs, xs[-1], t, dt)
        xs.append(xs[-1] + dt * velocity + log_std.exp() * eps[k])
        log_stds.append(log_std)
        logp_steps.append(standard_normal_log_density(eps[k]) - log_std.sum(-1))
    logp_prior, logp_steps = standard_normal_log_density(x0), torch.stack(logp_steps)
    logp_tanh = tanh_log_jacobian(xs[-1])
    return dict(xs=torch.stack(xs), log_stds=torch.stack(log_stds), actions=torch.tanh(xs[-1]), logp_prior=logp_prior,
                logp_steps=logp_steps, logp_tanh=logp_tanh, log_probs=logp_prior + logp_steps.sum(0) - logp_tanh)


# --------------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------------
class SACFlowScratchAgent(Agent):
    """``actor`` (velocity + σ), ``critic`` (CrossQ, no target) and ``temperature``; three Adams (β₁ 0.5)."""

    name = "sacflow_scratch"
    Hyperparams = SACFlowScratchHyperparams
    PER_DOMAIN = PER_DOMAIN
    OFFLINE_DATA = False
    LOSS_FUNCTIONS = ("critic_losses", "actor_losses")  # the two steps of `update`

    def __init__(self, hp: SACFlowScratchHyperparams):
        super().__init__(hp)
        self.actor = FlowActor(hp)
        self.critic = BatchNormCritic(hp.obs_dim, hp.chunk_dim, hp.value_hidden_dims, hp.num_qs,
                                      hp.batch_norm_momentum, hp.batch_norm_eps)
        self.temperature = Temperature(hp.sac_alpha)
        # Critic updates so far (a Python count: the delay branches on no tensor); the actor's metrics of its last
        # update are reported on the updates in between, so every update logs the same keys.
        self.critic_updates = 0
        self.actor_metrics: dict[str, torch.Tensor] = {}

    def acting_modules(self) -> tuple[str, ...]:
        return ("actor",)

    @classmethod
    def search_space(cls, trial, method: str) -> dict:
        return {"sac_alpha": trial.suggest_float("sac_alpha", 0.01, 1.0, log=True),
                "lr": trial.suggest_float("lr", 1e-4, 1e-3, log=True),
                "critic_lr": trial.suggest_float("critic_lr", 3e-4, 3e-3, log=True)}

    def make_optimizers(self, betas=None, eps=1e-8) -> dict[str, torch.optim.Optimizer]:
        betas = betas or (self.hp.adam_b1, 0.999)
        return {"actor": make_adam(self.actor.parameters(), self.hp.lr, betas, eps),
                "critic": make_adam(self.critic.parameters(), self.hp.critic_lr, betas, eps),
                "alpha": make_adam(self.temperature.parameters(), self.hp.alpha_lr, betas, eps)}

    # --- draws and acting ---------------------------------------------------------------------------
    def draw_specs(self, batch_size: int) -> dict:
        shape, steps = (batch_size, self.hp.chunk_dim), (self.hp.flow_steps, batch_size, self.hp.chunk_dim)
        return {"target_x0": (NORMAL, shape), "target_eps": (NORMAL, steps),
                "actor_x0": (NORMAL, shape), "actor_eps": (NORMAL, steps)}

    def act_draw_specs(self, batch_size: int) -> dict:
        shape = (batch_size, self.hp.chunk_dim)
        return {"x0": (NORMAL, shape), "eps": (NORMAL, (self.hp.flow_steps, *shape))}

    def rollout(self, obs, x0, eps) -> dict[str, torch.Tensor]:
        return learned_noise_rollout(self.actor, obs, x0, eps, self.hp.flow_steps)

    def act(self, obs, draws, intermediates=None) -> torch.Tensor:
        with torch.no_grad():  # the stochastic policy, as the official scripts act and evaluate
            return self.rollout(obs, draws["x0"], draws["eps"])["actions"]

    # --- losses ---------------------------------------------------------------------------------------
    def critic_losses(self, batch, draws) -> Losses:
        hp, step = self.hp, chunk_step(batch)
        alpha = self.temperature().detach()
        with torch.no_grad():
            target = self.rollout(step.next_obs, draws["target_x0"], draws["target_eps"])
        # CrossQ: (s, a) and (s′, a′) through one train-mode pass, so both halves share the batch statistics.
        qs = self.critic(torch.cat((step.obs, step.next_obs)), torch.cat((step.actions, target["actions"])),
                         training=True)
        critic_q, next_qs = qs.split(step.obs.shape[0], dim=1)
        target_q = td_target(step, next_qs.min(0).values - alpha * target["log_probs"], hp.discount,
                             hp.horizon_length).detach()
        loss = 0.5 * ((critic_q - target_q).square() * step.valid).mean(-1).sum(0)
        metrics = {"critic_loss": loss.detach(), "q_mean": critic_q.detach().mean(),
                   "target_log_prob": target["log_probs"].mean()}
        inter = {"target_q": target_q, "next_log_probs": target["log_probs"], "critic_q": critic_q.detach()}
        return Losses(loss, {"critic": loss}, metrics, inter)

    def actor_losses(self, batch, draws) -> Losses:
        hp, step = self.hp, chunk_step(batch)
        alpha = self.temperature()
        rollout = self.rollout(step.obs, draws["actor_x0"], draws["actor_eps"])
        log_probs = rollout["log_probs"]
        q = self.critic(step.obs, rollout["actions"], training=False, detach_params=True).min(0).values
        actor_loss = (alpha.detach() * log_probs - q).mean()
        entropy = -log_probs.detach().mean()
        # SAC's temperature loss α·(H − H_target), H = −mean log π: α grows while the entropy is below its target.
        alpha_loss = alpha * (entropy - hp.target_entropy)
        metrics = {"actor_loss": actor_loss.detach(), "actor_entropy": entropy, "alpha_loss": alpha_loss.detach(),
                   "alpha_value": alpha.detach(), "log_std_mean": rollout["log_stds"].detach().mean()}
        return Losses(actor_loss + alpha_loss, {"actor": actor_loss, "alpha": alpha_loss}, metrics,
                      {f"actor_{k}": v.detach() for k, v in rollout.items()})

    def losses(self, batch, draws) -> Losses:
        """Both losses of one actor update (the critic's at the pre-step parameters), e.g. for gradient routing."""
        critic, actor = self.critic_losses(batch, draws), self.actor_losses(batch, draws)
        return Losses(critic.total + actor.total, {**critic.terms, **actor.terms}, {**critic.metrics, **actor.metrics},
                      {**critic.intermediates, **actor.intermediates})

    # --- update ---------------------------------------------------------------------------------------
    def update(self, optimizers, batch, draws, on_raw_gradients=None):
        """The critic's step; on every ``policy_delay``-th update then the actor's and α's, from the new critic."""
        critic = self.critic_losses(batch, draws)
        optimizer_step(optimizers["critic"], critic.total, on_raw_gradients)
        inter = dict(critic.intermediates)
        if self.critic_updates % self.hp.policy_delay == 0:
            actor = self.actor_losses(batch, draws)
            # One backward: the actor loss holds α constant and α's loss the log-probabilities.
            for name in ("actor", "alpha"):
                optimizers[name].zero_grad(set_to_none=True)
            actor.total.backward()
            for name in ("actor", "alpha"):
                fill_missing_grads(optimizers[name])
            if on_raw_gradients is not None:
                on_raw_gradients()
            for name in ("actor", "alpha"):
                optimizers[name].step()
            self.actor_metrics = actor.metrics
            inter.update(actor.intermediates)
        self.critic_updates += 1
        total = critic.metrics["critic_loss"] + self.actor_metrics["actor_loss"]
        return {**critic.metrics, **self.actor_metrics, "total_loss": total}, inter

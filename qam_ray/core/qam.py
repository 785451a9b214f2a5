"""QAM: Q-learning with Adjoint Matching (Li & Levine, 2026), as the official agents/qam.py does it.

Readable top to bottom like the reference agent (QAM_SPEC.md §§4-8):

  hyperparameters  →  networks  →  random draws  →  acting  →  losses  →  one optimisation step

Variants: QAM (``fql_alpha = edit_scale = 0``), QAM-E (``edit_scale > 0``: tanh-Gaussian edit policy on
top of the flow, learned entropy temperature) and QAM-F (``fql_alpha > 0``: one-step policy distilled
from the fine-tuned flow).  Pure PyTorch: no Ray here.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from qam_ray.core.flow import adjoint_matching_loss, euler_ode
from qam_ray.core.networks import EnsembleCritic, TanhGaussianEditPolicy, VelocityField

# --------------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QAMHyperparams:
    """Defaults are the official ones (QAM_SPEC.md §10); per-domain values come from the registry."""

    obs_dim: int
    action_dim: int  # per-step action size A; the policy works on D = A·horizon_length
    horizon_length: int = 5
    actor_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    value_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    num_qs: int = 10
    flow_steps: int = 10
    inv_temp: float = 0.3  # τ of π_β·exp(τQ); NOT the Polyak rate
    rho: float = 0.5
    discount: float = 0.99
    tau: float = 0.005  # Polyak rate
    lr: float = 3e-4
    clip_grad_max_norm: float | None = 1.0  # None disables the global-norm clip (QAM-E-NOCLIP)
    fql_alpha: float = 0.0
    edit_scale: float = 0.0
    edit_target_entropy_multiplier: float = 0.5
    value_layer_norm: bool = True

    def __post_init__(self):
        object.__setattr__(self, "actor_hidden_dims", tuple(self.actor_hidden_dims))
        object.__setattr__(self, "value_hidden_dims", tuple(self.value_hidden_dims))
        errors = validate_hyperparams(self)
        if errors:
            raise ValueError("Invalid QAM hyperparameters:\n  - " + "\n  - ".join(errors))

    @property
    def chunk_dim(self) -> int:
        return self.action_dim * self.horizon_length

    @property
    def variant(self) -> str:
        return "QAM-F" if self.fql_alpha > 0 else "QAM-E" if self.edit_scale > 0 else "QAM"


HYPERPARAM_FIELDS = tuple(f.name for f in dataclasses.fields(QAMHyperparams))


def validate_hyperparams(hp: QAMHyperparams) -> list[str]:
    """Every problem at once, each naming the field and the allowed values."""
    errors = []
    for name in ("obs_dim", "action_dim", "horizon_length", "num_qs", "flow_steps"):
        if not (isinstance(getattr(hp, name), int) and getattr(hp, name) >= 1):
            errors.append(f"{name}={getattr(hp, name)!r}: must be an integer >= 1")
    for name in ("actor_hidden_dims", "value_hidden_dims"):
        dims = getattr(hp, name)
        if not dims or not all(isinstance(d, int) and d >= 1 for d in dims):
            errors.append(f"{name}={dims!r}: must be a non-empty sequence of positive integers")
    for name in ("inv_temp", "rho", "fql_alpha", "edit_scale", "lr", "edit_target_entropy_multiplier"):
        if not getattr(hp, name) >= 0:
            errors.append(f"{name}={getattr(hp, name)!r}: must be >= 0")
    if not 0 < hp.discount <= 1:
        errors.append(f"discount={hp.discount!r}: must be in (0, 1]")
    if not 0 < hp.tau <= 1:
        errors.append(f"tau={hp.tau!r} (Polyak rate): must be in (0, 1]; the AM temperature is inv_temp")
    if hp.clip_grad_max_norm is not None and not hp.clip_grad_max_norm > 0:
        errors.append(f"clip_grad_max_norm={hp.clip_grad_max_norm!r}: must be > 0, or None for no clipping")
    if hp.fql_alpha > 0 and hp.edit_scale > 0:
        errors.append(
            f"fql_alpha={hp.fql_alpha} and edit_scale={hp.edit_scale}: QAM-F and QAM-E are exclusive; set one to 0"
        )
    return errors


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------
class QAMNetworks(nn.Module):
    """All QAM modules.  ``actor_fast`` (f_θ) has its own random init, not a copy of f_β;
    the targets start as copies of their online nets.  The official ``target_actor_fast`` is
    never used or updated, so it is not created."""

    def __init__(self, hp: QAMHyperparams):
        super().__init__()
        s, d, actor_dims = hp.obs_dim, hp.chunk_dim, hp.actor_hidden_dims
        self.critic = EnsembleCritic(s, d, hp.value_hidden_dims, hp.num_qs, layer_norm=hp.value_layer_norm)
        self.actor_slow = VelocityField(s, d, actor_dims)  # behaviour flow f_β (flow matching)
        self.actor_fast = VelocityField(s, d, actor_dims)  # fine-tuned flow f_θ (adjoint matching)
        if hp.fql_alpha > 0:
            self.one_step_actor = VelocityField(s, d, actor_dims, time_input=False)
        if hp.edit_scale > 0:
            self.edit_actor = TanhGaussianEditPolicy(s, d, actor_dims)
            self.edit_log_alpha = nn.Parameter(torch.zeros(()))
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.target_actor_slow = copy.deepcopy(self.actor_slow).requires_grad_(False)

    TARGET_PAIRS = (("target_critic", "critic"), ("target_actor_slow", "actor_slow"))

    def online_parameters(self) -> Iterator[nn.Parameter]:
        targets = {name for name, _ in self.TARGET_PAIRS}
        for name, child in self.named_children():
            if name not in targets:
                yield from child.parameters()
        if hasattr(self, "edit_log_alpha"):
            yield self.edit_log_alpha

    def target_parameter_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        targets, onlines = [], []
        for target_name, online_name in self.TARGET_PAIRS:
            targets += list(getattr(self, target_name).parameters())
            onlines += list(getattr(self, online_name).parameters())
        return targets, onlines


# --------------------------------------------------------------------------------------------------
# Random draws: everything one update samples, so the reference fixtures can replay them exactly
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class QAMDraws:
    target_noise: torch.Tensor  # (B, D)    z' of the TD-target action
    fm_x0: torch.Tensor  # (B, D)           flow-matching noise end
    fm_t: torch.Tensor  # (B, 1)            flow-matching time ~ U[0, 1)
    am_x0: torch.Tensor  # (B, D)           start of the adjoint-matching trajectory
    am_noise: torch.Tensor  # (K, B, D)     SDE noises; slice K-1 unused
    policy_z: torch.Tensor | None = None  # (B, D)  QAM-F / QAM-E: noise of the flow action in the policy loss
    target_edit_eps: torch.Tensor | None = None  # (B, D)  QAM-E: edit noise of the TD-target action
    edit_eps: torch.Tensor | None = None  # (B, D)  QAM-E: edit noise in the edit loss


def sample_draws(hp: QAMHyperparams, batch_size: int, generator: torch.Generator, device) -> QAMDraws:
    shape = (batch_size, hp.chunk_dim)

    def normal(*size):
        return torch.randn(size, generator=generator, device=device)

    draws = QAMDraws(
        target_noise=normal(*shape),
        fm_x0=normal(*shape),
        fm_t=torch.rand(batch_size, 1, generator=generator, device=device),
        am_x0=normal(*shape),
        am_noise=normal(hp.flow_steps, *shape),
    )
    if hp.variant != "QAM":
        draws.policy_z = normal(*shape)
    if hp.variant == "QAM-E":
        draws.target_edit_eps, draws.edit_eps = normal(*shape), normal(*shape)
    return draws


# --------------------------------------------------------------------------------------------------
# Acting (evaluation, online collection and the TD-target action all use this)
# --------------------------------------------------------------------------------------------------
def flow_actions(nets: QAMNetworks, hp: QAMHyperparams, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Deterministic Euler ODE from z with f_θ (f_β when inv_temp == 0), clipped to [-1, 1]."""
    field = nets.actor_fast if hp.inv_temp > 0 else nets.actor_slow
    return euler_ode(field, obs, z, hp.flow_steps).clamp(-1.0, 1.0)


def policy_actions(
    nets: QAMNetworks,
    hp: QAMHyperparams,
    obs: torch.Tensor,
    z: torch.Tensor,
    edit_eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The QAM policy's flattened action chunk (B, D) in [-1, 1] (§6.5); no gradients."""
    with torch.no_grad():
        if hp.variant == "QAM-F":
            return nets.one_step_actor(obs, z).clamp(-1.0, 1.0)
        actions = flow_actions(nets, hp, obs, z)
        if hp.variant == "QAM-E":
            edit, _ = nets.edit_actor(obs, actions, edit_eps)
            actions = (actions + hp.edit_scale * edit).clamp(-1.0, 1.0)
        return actions


def sample_action_chunks(
    nets: QAMNetworks, hp: QAMHyperparams, obs: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Draw the policy's noise and return action chunks of shape (B, horizon_length, action_dim)."""
    shape = (obs.shape[0], hp.chunk_dim)
    z = torch.randn(shape, generator=generator, device=obs.device)
    edit_eps = torch.randn(shape, generator=generator, device=obs.device) if hp.variant == "QAM-E" else None
    return policy_actions(nets, hp, obs, z, edit_eps).reshape(obs.shape[0], hp.horizon_length, hp.action_dim)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class QAMLosses:
    total: torch.Tensor  # the one scalar that is differentiated (§8)
    terms: dict[str, torch.Tensor]  # its summands, with their graphs: critic, flow, adjoint (+ one_step | edit, alpha)
    metrics: dict[str, torch.Tensor]  # detached scalars; nothing here synchronises with the device
    intermediates: dict[str, torch.Tensor]  # detached tensors the reference check compares


def compute_losses(
    nets: QAMNetworks, hp: QAMHyperparams, batch: dict[str, torch.Tensor], draws: QAMDraws
) -> QAMLosses:
    """One joint loss over every online module (§8).

    ``batch`` holds chunked samples: observations (B, obs), actions (B, H, A) and
    rewards / masks / valid (B, H), next_observations (B, H, obs); only the last chunk column is used.
    """
    obs = batch["observations"]
    batch_size = obs.shape[0]
    actions = batch["actions"].reshape(batch_size, -1)
    next_obs = batch["next_observations"][:, -1]
    rewards, masks, valid = batch["rewards"][:, -1], batch["masks"][:, -1], batch["valid"][:, -1]
    metrics, inter = {}, {}

    # Critic: chunked TD to the pessimistic ensemble target mean − ρ·std (population std) (§4).
    with torch.no_grad():
        next_actions = policy_actions(nets, hp, next_obs, draws.target_noise, draws.target_edit_eps)
        next_qs = nets.target_critic(next_obs, next_actions)
        next_v = next_qs.mean(0) - hp.rho * next_qs.std(0, correction=0)
        target_q = rewards + hp.discount**hp.horizon_length * masks * next_v
    critic_q = nets.critic(obs, actions)
    # Invalid rows (chunk crossed an episode end) contribute 0 but stay in the E·B denominator.
    critic_loss = ((critic_q - target_q).square() * valid).mean()
    inter.update(next_actions=next_actions, next_qs=next_qs, next_v=next_v, target_q=target_q, critic_q=critic_q)
    q_detached = critic_q.detach()
    metrics.update(critic_loss=critic_loss.detach(), q_mean=q_detached.mean(), q_max=q_detached.max(), q_min=q_detached.min())

    # Behaviour flow f_β: flow matching on the linear path x_t = (1-t)x₀ + t·a (§5).
    t, x0 = draws.fm_t, draws.fm_x0
    fm_xt = (1.0 - t) * x0 + t * actions
    fm_pred = nets.actor_slow(obs, fm_xt, t)
    flow_loss = ((fm_pred - (actions - x0)).square().mean(-1) * valid).mean()
    inter.update(fm_xt=fm_xt, fm_pred=fm_pred.detach())
    metrics["flow_loss"] = flow_loss.detach()

    # Adjoint matching for f_θ against the EMA base f_β (§6).
    terms = {"critic": critic_loss, "flow": flow_loss}
    terms["adjoint"] = critic_adjoint_matching_loss(nets, hp, obs, draws, metrics, inter)
    if hp.variant == "QAM-F":
        terms["one_step"] = one_step_policy_loss(nets, hp, obs, draws.policy_z, metrics, inter)
    elif hp.variant == "QAM-E":
        terms["edit"], terms["alpha"] = edit_policy_loss(nets, hp, obs, draws, metrics)
    total = sum(terms.values())
    metrics["total_loss"] = total.detach()
    return QAMLosses(total, terms, metrics, inter)


def critic_adjoint_matching_loss(nets, hp, obs, draws, metrics, inter) -> torch.Tensor:
    """Adjoint matching of f_θ against the EMA base f_β with terminal adjoint
    ã_K = −τ ∇_x mean_E Q_target(s, clip(x)) at x_K: target critic, ensemble mean, no pessimism;
    coordinates outside [-1, 1] get zero gradient (§6.2)."""

    def terminal_adjoint(x_final: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x_final.detach().requires_grad_(True)
            q = nets.target_critic(obs, x.clamp(-1.0, 1.0)).mean(0).sum()  # sum: per-sample gradients
            (grad_q,) = torch.autograd.grad(q, x)
        return -hp.inv_temp * grad_q

    adj_loss, am_inter = adjoint_matching_loss(
        nets.actor_fast, nets.target_actor_slow, obs, draws.am_x0, draws.am_noise, hp.flow_steps, terminal_adjoint
    )
    abs_adj = am_inter["am_adj_terminal"].abs()
    metrics.update(
        adj_loss=adj_loss.detach(), adj_max=abs_adj.max(), adj_mean=abs_adj.mean(), adj_std=abs_adj.std(correction=0)
    )
    inter.update(am_inter)
    return adj_loss


def one_step_policy_loss(nets, hp, obs, z, metrics, inter) -> torch.Tensor:
    """QAM-F: α·‖μ_ω(s,z) − clip(ODE_θ(z))‖² − mean Q(s, clip(μ_ω)); the critic is a constant here."""
    with torch.no_grad():
        target_actions = flow_actions(nets, hp, obs, z)
    mu = nets.one_step_actor(obs, z)
    distill_loss = (target_actions - mu).square().mean()
    qs = nets.critic(obs, mu.clamp(-1.0, 1.0), detach_params=True)
    q_loss = -qs.mean()
    metrics.update(fql_distill_loss=distill_loss.detach(), fql_q_loss=q_loss.detach())
    inter.update(fql_flow_actions=target_actions, fql_os_actions=mu.detach(), fql_qs=qs.detach())
    return q_loss + hp.fql_alpha * distill_loss


def edit_policy_loss(nets, hp, obs, draws, metrics) -> tuple[torch.Tensor, torch.Tensor]:
    """QAM-E: maximise mean_E Q(s, clip(a_flow + β·e)) with SAC-style entropy tuning of α."""
    with torch.no_grad():
        flow_acts = flow_actions(nets, hp, obs, draws.policy_z)
    edit, log_prob = nets.edit_actor(obs, flow_acts, draws.edit_eps)
    edited = (flow_acts + hp.edit_scale * edit).clamp(-1.0, 1.0)
    q = nets.critic(obs, edited, detach_params=True).mean(0)
    alpha = nets.edit_log_alpha.exp()
    entropy = -log_prob.mean()
    target_entropy = -hp.edit_target_entropy_multiplier * hp.chunk_dim
    edit_loss = -q.mean() + (alpha.detach() * log_prob).mean()
    alpha_loss = alpha * (entropy.detach() - target_entropy)
    metrics.update(edit_loss=edit_loss.detach(), edit_entropy=entropy.detach(), edit_alpha=alpha.detach())
    return edit_loss, alpha_loss


# --------------------------------------------------------------------------------------------------
# One optimisation step: one Adam over all online parameters, global-norm clip, Polyak from the
# pre-step weights (§8).
# --------------------------------------------------------------------------------------------------
def clip_grad_global_norm_(grads: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """optax.clip_by_global_norm: g ← g·max_norm/‖g‖ only when ‖g‖ ≥ max_norm; returns ‖g‖.
    Written with tensor ops only, so it never waits for the device."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, max_norm / torch.clamp(norm, min=max_norm))
    return norm


def polyak_update_(nets: QAMNetworks, tau: float) -> None:
    """target ← τ·online + (1−τ)·target.  Call before ``optimizer.step()`` so both sides are pre-step."""
    targets, onlines = nets.target_parameter_pairs()
    with torch.no_grad():
        torch._foreach_lerp_(targets, onlines, tau)


def make_optimizer(
    nets: QAMNetworks, hp: QAMHyperparams, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
) -> torch.optim.Adam:
    """optax.adam defaults; fused kernels on GPU, foreach on CPU."""
    fused = next(nets.parameters()).is_cuda
    return torch.optim.Adam(nets.online_parameters(), lr=hp.lr, betas=betas, eps=eps, fused=fused or None)


def optimization_step(
    nets: QAMNetworks,
    hp: QAMHyperparams,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    draws: QAMDraws,
    on_raw_gradients: Callable[[], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """loss → grads → clip → Polyak (pre-step) → Adam.  Returns (metrics, intermediates).
    ``on_raw_gradients`` runs after backward and before clipping (the reference check reads them)."""
    optimizer.zero_grad(set_to_none=True)
    losses = compute_losses(nets, hp, batch, draws)
    losses.total.backward()
    metrics = losses.metrics
    if on_raw_gradients is not None:
        on_raw_gradients()
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if hp.clip_grad_max_norm is not None:
        metrics["grad_norm"] = clip_grad_global_norm_(grads, hp.clip_grad_max_norm)
    polyak_update_(nets, hp.tau)
    optimizer.step()
    return metrics, losses.intermediates

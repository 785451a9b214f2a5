"""Losses that several agents share, written as the official code computes them (QAM_SPEC.md §§3-5).

Every agent trains on chunked batches (``ChunkReplayBuffer.sample``): observations (B, obs), actions (B, H, A),
rewards / masks / valid (B, H) and next_observations (B, H, obs).  The TD losses use the **last** chunk column
only: rewards[:, -1] is the discounted sum over the valid part of the chunk, masks[:, -1] stops bootstrapping
after a success, valid[:, -1] = 0 marks a chunk that crossed an episode end.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ChunkStep(NamedTuple):
    """One chunked transition as the losses read it: s, the flattened chunk a (B, H·A), s′, r, m, v."""

    obs: torch.Tensor
    actions: torch.Tensor
    next_obs: torch.Tensor
    rewards: torch.Tensor
    masks: torch.Tensor
    valid: torch.Tensor


def chunk_step(batch: dict[str, torch.Tensor]) -> ChunkStep:
    obs = batch["observations"]
    return ChunkStep(obs, batch["actions"].reshape(obs.shape[0], -1), batch["next_observations"][:, -1],
                     batch["rewards"][:, -1], batch["masks"][:, -1], batch["valid"][:, -1])


def pessimistic(qs: torch.Tensor, rho: float) -> torch.Tensor:
    """Ensemble aggregate mean_E − ρ·std_E over the leading axis, with the population std (ddof 0)."""
    return qs.mean(0) - rho * qs.std(0, correction=0)


def td_target(step: ChunkStep, next_v: torch.Tensor, discount: float, horizon: int) -> torch.Tensor:
    """Chunked TD target y = r + γ^H·m·V(s′): one bootstrap per chunk of H actions."""
    return step.rewards + discount**horizon * step.masks * next_v


def critic_td_loss(critic_q: torch.Tensor, target_q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """mean over all E·B entries of (Q − y)²·v: invalid rows add 0 but stay in the denominator."""
    return ((critic_q - target_q).square() * valid).mean()


def flow_matching_loss(field, obs, actions, x0, t, valid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Behaviour-cloning flow matching on the linear path x_t = (1−t)·x₀ + t·a with target velocity a − x₀:
    mean_B[mean_D (f(s, x_t, t) − (a − x₀))²·v].  Returns (loss, x_t, prediction)."""
    xt = (1.0 - t) * x0 + t * actions
    pred = field(obs, xt, t)
    loss = ((pred - (actions - x0)).square().mean(-1) * valid).mean()
    return loss, xt, pred


def expectile_loss(diff: torch.Tensor, expectile: float, zero_weight_expectile: bool = True,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """IQL's asymmetric square mean(w·u²) with w = κ where u ≥ 0, else 1 − κ.  Returns (loss, w).
    ``zero_weight_expectile=False`` gives u = 0 the weight 1 − κ (the strict u > 0 of the official IDQL)."""
    weight = torch.where(diff >= 0 if zero_weight_expectile else diff > 0, expectile, 1.0 - expectile)
    return (weight * diff.square()).mean(), weight


def best_of_n(candidates: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Per row, the candidate with the highest score (first on ties): (B, n, D), (B, n) → (B, D)."""
    index = scores.argmax(dim=1)
    return candidates.gather(1, index[:, None, None].expand(-1, 1, candidates.shape[-1])).squeeze(1)


def stats(prefix: str, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """{prefix_mean, prefix_max, prefix_min} of a tensor, detached (the official ``*_mean/max/min`` logs)."""
    values = values.detach()
    return {f"{prefix}_mean": values.mean(), f"{prefix}_max": values.max(), f"{prefix}_min": values.min()}


def ddpm_noise_loss(noise_fn, obs, actions, t, noise, alpha_hats, valid, keep=None) -> tuple[torch.Tensor, dict]:
    """DDPM ε-prediction behaviour cloning: x = √ᾱ_t·a + √(1 − ᾱ_t)·ε, L = mean_B[Σ_D (ε̂(s, x, t) − ε)²·v]
    (a sum over action dims).  ``t`` (B,) holds the integer diffusion indices as floats.  Returns (loss, the
    intermediates under the fixtures' ``ddpm_*`` names)."""
    alpha_hat = alpha_hats[t.long()]
    noisy = alpha_hat.sqrt()[:, None] * actions + (1 - alpha_hat).sqrt()[:, None] * noise
    record = {}
    eps_pred = noise_fn(obs, noisy, t[:, None], keep=keep, record=record)
    loss = ((eps_pred - noise).square().sum(-1) * valid).mean()
    inter = {"ddpm_alpha_hat_t": alpha_hat, "ddpm_noisy_actions": noisy, "ddpm_eps_pred": eps_pred.detach(),
             **{f"ddpm_{k}": v.detach() for k, v in record.items()}}
    return loss, inter

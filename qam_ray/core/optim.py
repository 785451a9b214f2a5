"""The optimisation step the official agents share (QAM_SPEC.md §8, utils/flax_utils.py):

    loss → gradients → [global-norm clip] → Polyak from the pre-step weights → one Adam over all online parameters

Written with tensor ops only (no ``.item()``), so a step never waits for the device and can be captured later.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch.profiler import record_function


def clip_grad_global_norm_(grads: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """optax.clip_by_global_norm: g ← g·max_norm/‖g‖ only when ‖g‖ ≥ max_norm; returns ‖g‖."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, max_norm / torch.clamp(norm, min=max_norm))
    return norm


def polyak_update_(targets: list[torch.Tensor], onlines: list[torch.Tensor], tau: float) -> None:
    """target ← τ·online + (1−τ)·target.  Call before ``optimizer.step()`` so both sides are pre-step."""
    if targets:
        with torch.no_grad():
            # Written as optax.incremental_update computes it, not as lerp's target + τ·(online − target): the two
            # round differently, visibly so on large weights (FIXTURE_FORMAT_BASELINES2 §2, ReBRAC's scaled kernel).
            torch._foreach_mul_(targets, 1.0 - tau)
            torch._foreach_add_(targets, torch._foreach_mul(onlines, tau))


FUSED_DEVICES = ("cuda", "cpu")  # where torch has fused Adam/AdamW kernels


def make_adam(params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8) -> torch.optim.Adam:
    """optax.adam's defaults, as one fused kernel per parameter (CPU too: ~4× faster than the per-op loop, which
    read and write every parameter several times: issue 17)."""
    params = list(params)
    fused = bool(params) and params[0].device.type in FUSED_DEVICES
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=fused or None)


def joint_step(agent, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               draws: dict[str, torch.Tensor], on_raw_gradients: Callable[[], None] | None = None,
               polyak: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One update of the single joint loss ``agent.losses(batch, draws).total`` (every official QAM-repo agent).

    ``agent.hp.clip_grad_max_norm`` (None: no clip) and ``agent.hp.tau`` configure it; ``agent.target_pairs()``
    lists the Polyak pairs.  ``on_raw_gradients`` runs after backward and before the clip (the reference check
    reads the raw gradients there, several learners average them there).  ``polyak=False``: the targets stay as
    they are this update (ReBRAC's actor-less update).  Returns (metrics, intermediates).
    """
    optimizer.zero_grad(set_to_none=True)
    losses = agent.losses(batch, draws)
    with record_function("phase:backward"):  # `benchmark.py --profile` phases (a few µs each otherwise)
        losses.total.backward()
    params = fill_missing_grads(optimizer)
    metrics = dict(losses.metrics)
    if on_raw_gradients is not None:
        on_raw_gradients()
    with record_function("phase:clip_polyak"):
        if agent.hp.clip_grad_max_norm is not None:
            metrics["grad_norm"] = clip_grad_global_norm_([p.grad for p in params], agent.hp.clip_grad_max_norm)
        if polyak:
            polyak_update_(*agent.target_pairs(), agent.hp.tau)
    with record_function("phase:adam"):
        optimizer.step()
    return metrics, losses.intermediates


def fill_missing_grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimiser's parameters, each with a gradient: optax updates every parameter, so one no loss reached
    this step gets a zero gradient."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return params


def make_adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """optax.adamw: decoupled weight decay λ·lr·θ on every parameter; fused kernels, as ``make_adam``."""
    params = list(params)
    fused = bool(params) and params[0].device.type in FUSED_DEVICES
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)


def cosine_decay_lr(init_lr: float, count: int, decay_steps: int) -> float:
    """optax.cosine_decay_schedule (α = 0) at ``count``: lr₀·½(1 + cos(π·min(count, D)/D))."""
    return init_lr * 0.5 * (1.0 + math.cos(math.pi * min(count, decay_steps) / decay_steps))


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   on_raw_gradients: Callable[[], None] | None = None) -> None:
    """One optimiser's step on its own loss, for families that step several optimisers in turn (IDQL): backward,
    ``on_raw_gradients``, step; the gradients are then released, so the next optimiser's hook sees only its own."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    fill_missing_grads(optimizer)
    if on_raw_gradients is not None:
        on_raw_gradients()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

"""The optimisation step the official agents share (QAM_SPEC.md §8, utils/flax_utils.py):

    loss → gradients → [global-norm clip] → Polyak from the pre-step weights → one Adam over all online parameters

Written with tensor ops only (no ``.item()``), so a step never waits for the device and can be captured later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch


def clip_grad_global_norm_(grads: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """optax.clip_by_global_norm: g ← g·max_norm/‖g‖ only when ‖g‖ ≥ max_norm; returns ‖g‖."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, max_norm / torch.clamp(norm, min=max_norm))
    return norm


def polyak_update_(targets: list[torch.Tensor], onlines: list[torch.Tensor], tau: float) -> None:
    """target ← τ·online + (1−τ)·target.  Call before ``optimizer.step()`` so both sides are pre-step."""
    if targets:
        with torch.no_grad():
            torch._foreach_lerp_(targets, onlines, tau)


def make_adam(params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8) -> torch.optim.Adam:
    """optax.adam's defaults; fused kernels on GPU, foreach on CPU."""
    params = list(params)
    fused = bool(params) and params[0].is_cuda
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=fused or None)


def joint_step(agent, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               draws: dict[str, torch.Tensor], on_raw_gradients: Callable[[], None] | None = None,
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One update of the single joint loss ``agent.losses(batch, draws).total`` (every official QAM-repo agent).

    ``agent.hp.clip_grad_max_norm`` (None: no clip) and ``agent.hp.tau`` configure it; ``agent.target_pairs()``
    lists the Polyak pairs.  ``on_raw_gradients`` runs after backward and before the clip (the reference check
    reads the raw gradients there, several learners average them there).  Returns (metrics, intermediates).
    """
    optimizer.zero_grad(set_to_none=True)
    losses = agent.losses(batch, draws)
    losses.total.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:  # optax updates every parameter: one no loss reached this step gets a zero gradient
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    metrics = dict(losses.metrics)
    if on_raw_gradients is not None:
        on_raw_gradients()
    if agent.hp.clip_grad_max_norm is not None:
        metrics["grad_norm"] = clip_grad_global_norm_([p.grad for p in params], agent.hp.clip_grad_max_norm)
    polyak_update_(*agent.target_pairs(), agent.hp.tau)
    optimizer.step()
    return metrics, losses.intermediates

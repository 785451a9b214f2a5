"""Captured updates: an agent's loss functions under ``torch.compile`` (issue 17 item 1), one setting for every agent.

    "none"             eager PyTorch (the default until a compiled mode is measured faster on the target device)
    "default"          TorchInductor: the loss and its backward each become a few fused kernels
    "reduce-overhead"  Inductor + CUDA graphs: each compiled graph replays as one launch (on CPU: Inductor only,
                       CUDA graphs do not exist there)
    "max-autotune"     Inductor with autotuned matmul / conv kernels (+ CUDA graphs on a GPU); longest compile

What is compiled is each loss function (forward and, through AOTAutograd, its backward); the optimiser step, the
global-norm clip and Polyak averaging stay eager, since they are already a handful of multi-tensor kernels
(foreach on CPU, fused Adam on CUDA) and hold Python-side state (IDQL's schedule count, ReBRAC's update counter)
that would make a captured step recompile.  The updates are written capture-ready: randomness arrives as
pre-drawn tensors (``sample_draws``), batch shapes are fixed, no ``.item()`` inside; so ``dynamic=False``.
Pure PyTorch: nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs on a GPU


def compile_mode_error(mode) -> str | None:
    """The validation message for a bad ``compile`` setting (None: it is one of COMPILE_MODES)."""
    if mode in COMPILE_MODES:
        return None
    return f"compile={mode!r}: must be one of {', '.join(map(repr, COMPILE_MODES))} (torch.compile modes; 'none': eager)"


def compiled_losses(losses_fn: Callable, mode: str, cuda_graphs: bool) -> Callable:
    """``losses_fn`` (returning a ``Losses``) under ``torch.compile(mode=mode)``.

    ``cuda_graphs`` (a CUDA_GRAPH_MODES mode on a GPU): a graph's outputs live in static memory that its next replay overwrites, so the detached
    metrics and intermediates are copied out (a few small tensors); ``total`` and ``terms`` are consumed by the
    backward pass that follows at once.
    """
    compiled = torch.compile(losses_fn, mode=mode, dynamic=False)
    if not cuda_graphs:
        return compiled

    @functools.wraps(losses_fn)
    def losses_with_owned_outputs(*args, **kwargs):
        out = compiled(*args, **kwargs)
        return dataclasses.replace(out, metrics={k: v.clone() for k, v in out.metrics.items()},
                                   intermediates={k: v.clone() for k, v in out.intermediates.items()})
    return losses_with_owned_outputs


def cuda_graph_steps(update_fn: Callable) -> Callable:
    """``update_fn`` that first tells CUDA-graph trees a new training step begins, so one update's graphs may
    reuse the previous update's memory (``torch.compiler.cudagraph_mark_step_begin``; a no-op without graphs)."""

    @functools.wraps(update_fn)
    def update(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return update_fn(*args, **kwargs)
    return update


def disable_tf32() -> None:
    """fp32 matmuls and convolutions in full precision on CUDA (the reference checks' tolerances assume fp32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

"""What every agent is made of, so the data, RLlib and orchestration layers are written once for all of them.

An agent file (``qam_ray/agents/<family>.py``) reads top to bottom like its official ``agents/*.py``:

  hyperparameters (a dataclass of the official ``get_config()`` defaults, every field commented)
  → per-domain values of the official reproduce script
  → networks (an ``Agent`` subclass: a ``torch.nn.Module`` holding every module under its official name)
  → random draws (``draw_specs``: every random tensor one update uses, drawn up front as tensors)
  → acting (``act``)  → losses (``losses``)  → update (the shared joint step unless overridden)

Pure PyTorch: nothing here imports Ray, gymnasium, ogbench or MLflow.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn

from qam_ray.core.compile import CUDA_GRAPH_MODES, compiled_losses, cuda_graph_steps
from qam_ray.core.optim import joint_step, make_adam

# --------------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------------
# The QAM paper's common settings (QAM_SPEC.md §10, identical for every baseline of its reproduce script).
PAPER_HIDDEN = (512, 512, 512, 512)


@dataclasses.dataclass(frozen=True)
class AgentHyperparams:
    """Settings every agent of the QAM repository has.  Per-domain values (chunk length, γ, ρ) come from
    ``qam_ray.domains``; each agent subclass adds its own fields with the official defaults."""

    obs_dim: int
    action_dim: int  # per-step action size A; policies and critics work on the chunk of D = A·horizon_length
    horizon_length: int = 5  # action chunk length H (`--horizon_length`; 1 on the maze domains)
    actor_hidden_dims: tuple[int, ...] = PAPER_HIDDEN  # actor MLPs, GELU, no LayerNorm
    value_hidden_dims: tuple[int, ...] = PAPER_HIDDEN  # critic / value MLPs, GELU + LayerNorm
    num_qs: int = 10  # critic ensemble size E
    flow_steps: int = 10  # Euler steps K of every flow sampler
    rho: float = 0.5  # pessimism ρ: ensemble aggregate mean − ρ·std
    discount: float = 0.99  # γ; the chunked TD target bootstraps with γ^H
    tau: float = 0.005  # Polyak rate of the target networks (not a temperature)
    lr: float = 3e-4  # Adam learning rate
    clip_grad_max_norm: float | None = None  # global-norm gradient clip; None = plain Adam
    value_layer_norm: bool = True  # LayerNorm after each hidden activation of critic / value nets

    def __post_init__(self):
        for name in ("actor_hidden_dims", "value_hidden_dims"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        errors = [e for e in self.errors() if e]
        if errors:
            raise ValueError(f"Invalid {type(self).__name__}:\n  - " + "\n  - ".join(errors))

    def errors(self) -> list[str | None]:
        """Every problem at once, each naming the field and the allowed values (None: that check passed);
        subclasses add theirs to ``super().errors()``."""
        errors = [positive_int(self, name) for name in
                  ("obs_dim", "action_dim", "horizon_length", "num_qs", "flow_steps")]
        for name in ("actor_hidden_dims", "value_hidden_dims"):
            dims = getattr(self, name)
            if not (isinstance(dims, tuple) and dims and all(_is_int(d) and d >= 1 for d in dims)):
                errors.append(f"{name}={dims!r}: must be a non-empty sequence of positive integers")
        errors += [non_negative(self, name) for name in ("rho", "lr")]
        errors.append(in_interval(self, "discount", 0.0, 1.0, low_open=True))
        errors.append(in_interval(self, "tau", 0.0, 1.0, low_open=True,
                                  hint="the Polyak rate; a policy temperature is a separate field"))
        clip = self.clip_grad_max_norm
        if clip is not None and not (_is_real(clip) and 0 < clip < math.inf):
            errors.append(f"clip_grad_max_norm={clip!r}: must be a finite number > 0, or None for no clipping")
        if not isinstance(self.value_layer_norm, bool):
            errors.append(f"value_layer_norm={self.value_layer_norm!r}: must be True or False")
        return errors

    @property
    def chunk_dim(self) -> int:
        return self.action_dim * self.horizon_length


def per_domain_values(method: str, field: str, values: dict[str, float]) -> dict[str, dict[str, dict]]:
    """A ``PER_DOMAIN`` table for a method with one per-domain hyperparameter: {method: {domain: {field: value}}}."""
    return {method: {domain: {field: float(value)} for domain, value in values.items()}}


def field_names(hyperparams_class: type[AgentHyperparams]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(hyperparams_class))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(hp, name: str) -> str | None:
    value = getattr(hp, name)
    return None if _is_int(value) and value >= 1 else f"{name}={value!r}: must be an integer >= 1"


def non_negative(hp, name: str) -> str | None:
    value = getattr(hp, name)
    return None if _is_real(value) and 0 <= value < math.inf else f"{name}={value!r}: must be a finite number >= 0"


def in_interval(hp, name: str, low: float, high: float, low_open: bool = False, hint: str = "") -> str | None:
    value = getattr(hp, name)
    ok = _is_real(value) and (low < value if low_open else low <= value) and value <= high
    bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    return None if ok else f"{name}={value!r}: must be in {bounds}" + (f" ({hint})" if hint else "")


# --------------------------------------------------------------------------------------------------
# Random draws
# --------------------------------------------------------------------------------------------------
NORMAL, UNIFORM = "normal", "uniform"
# name → (N(0,1) | U[0,1) | an int n: integers uniform on {0, …, n−1} stored as floats, shape), drawn in this order
DrawSpecs = dict[str, tuple[str | int, tuple[int, ...]]]


def sample_draws(specs: DrawSpecs, generator: torch.Generator, device) -> dict[str, torch.Tensor]:
    """Draw every tensor of ``specs`` from one generator, in order: one update's randomness as tensors, so a
    fixture can replace it and a captured graph can take it as input."""
    sample = {NORMAL: torch.randn, UNIFORM: torch.rand}

    def draw(kind, shape):
        if isinstance(kind, int):  # e.g. a diffusion index; float, as the fixtures store it
            return torch.randint(kind, shape, generator=generator, device=device).to(torch.get_default_dtype())
        return sample[kind](shape, generator=generator, device=device)
    return {name: draw(kind, shape) for name, (kind, shape) in specs.items()}


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Losses:
    total: torch.Tensor  # the one scalar that is differentiated
    terms: dict[str, torch.Tensor]  # its summands, with their graphs (tests check where each one's gradient goes)
    metrics: dict[str, torch.Tensor]  # detached scalars, logged; nothing here synchronises with the device
    intermediates: dict[str, torch.Tensor]  # detached tensors under the fixtures' names (the reference check)


# --------------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------------
# Official flags every fixture of the QAM repository's agents fixes (FIXTURE_FORMAT*.md §1).
QAM_REPO_FIXED_FLAGS = {
    "action_chunking": True, "activation": "gelu_tanh_approximation", "layer_norm_eps": 1e-6, "std_ddof": 0,
    "actor_layer_norm": False, "adam_eps_root": 0.0, "weight_decay": 0.0, "step2_uses_same_batch": True,
}


class Agent(nn.Module):
    """Networks + draws + acting + losses of one method family.

    Subclasses set the class attributes and implement ``draw_specs``, ``act_draw_specs``, ``act`` and ``losses``.
    Module attributes carry the official module names (``critic``, ``target_critic``, ``actor_bc_flow`` …), so
    the reference check maps fixture parameters without a table.
    """

    name: ClassVar[str]  # the agent family: the `agent` tag in MLflow and the `agent` field of its fixtures
    Hyperparams: ClassVar[type[AgentHyperparams]]
    # Method label → {paper domain → hyperparameter values} of the official reproduce script (QAM_SPEC §10).
    PER_DOMAIN: ClassVar[dict[str, dict[str, dict]]]
    # Target module → the online module Polyak-averaged into it; targets start as copies and get no gradient.
    TARGETS: ClassVar[dict[str, str]] = {}
    # Fixture-format facts: the format document of the family's fixtures (its tolerances), official flags our port
    # implements at one value only, modules the official tree holds that are never used (and so not built here),
    # official metric names that are copies of ours.
    FIXTURE_FORMAT: ClassVar[str | None] = None
    FIXTURE_FIXED_FLAGS: ClassVar[dict[str, object]] = {}
    FIXTURE_UNUSED_MODULES: ClassVar[tuple[str, ...]] = ()
    FIXTURE_METRIC_ALIASES: ClassVar[dict[str, str]] = {}
    # Metrics we log that the official code does not (IDQL's total_loss, the progress metric every agent logs).
    FIXTURE_UNOFFICIAL_METRICS: ClassVar[tuple[str, ...]] = ()
    # config_json lists whose entry i the reference check passes to update i as a keyword of ``update``.
    FIXTURE_PER_UPDATE: ClassVar[tuple[str, ...]] = ()
    # The official agent names of the family's fixtures (their config_json `agent`) where they differ from ``name``.
    FIXTURE_AGENTS: ClassVar[tuple[str, ...]] = ()
    # Hyperparameter field → the config_json key that holds it, where the official name differs from ours.
    FIXTURE_CONFIG_NAMES: ClassVar[dict[str, str]] = {}
    # Keywords of ``draw_specs`` and ``update`` for the fixture's two updates (a family with several update kinds).
    FIXTURE_UPDATE_KWARGS: ClassVar[dict[str, object]] = {}
    # Fixture prefix of a further single update from the initial parameters → its ``draw_specs``/``update`` keywords.
    FIXTURE_EXTRA_UPDATES: ClassVar[dict[str, dict[str, object]]] = {}
    # Fixture prefix of a standalone computation on the initial parameters → the agent method that reproduces it:
    # ``method(read)`` reads its inputs with ``read(key)`` and returns every other array under the prefix by name.
    FIXTURE_PROBES: ClassVar[dict[str, str]] = {}
    # Modules whose gradients the official logs leave out of the global norm and grad/* (their own optimiser).
    FIXTURE_NORM_EXCLUDED_MODULES: ClassVar[tuple[str, ...]] = ()
    # False: the method learns online only, from an empty replay buffer (no offline dataset, no offline phase).
    OFFLINE_DATA: ClassVar[bool] = True
    # Per-row dataset columns the losses read besides the transitions (``qam_ray.data.replay.EXTRA_COLUMNS``, e.g.
    # SMAC's "returns_to_go"): computed over the offline rows when the buffer is built, 0 on online rows, sampled
    # at each chunk's start.  Other agents' batches hold the transitions only.
    DATASET_EXTRAS: ClassVar[tuple[str, ...]] = ()
    # The methods that compute losses from (batch, draws), which ``compile_losses`` runs under torch.compile: every
    # tensor computation of an update except the optimiser steps (a family whose ``update`` calls several lists each).
    LOSS_FUNCTIONS: ClassVar[tuple[str, ...]] = ("losses",)

    def __init__(self, hp: AgentHyperparams):
        super().__init__()
        self.hp = hp

    def make_targets(self) -> None:
        """Create every target module as a frozen copy of its online module (call at the end of __init__)."""
        for target, online in self.TARGETS.items():
            setattr(self, target, copy.deepcopy(getattr(self, online)).requires_grad_(False))

    # --- parameters -------------------------------------------------------------------------------
    def online_parameters(self) -> Iterator[nn.Parameter]:
        """Every trainable parameter, targets excluded, in a fixed order."""
        return (p for name, p in self.named_parameters() if name.split(".")[0] not in self.TARGETS)

    def target_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        targets, onlines = [], []
        for target, online in self.TARGETS.items():
            targets += list(getattr(self, target).parameters())
            onlines += list(getattr(self, online).parameters())
        return targets, onlines

    def acting_modules(self) -> tuple[str, ...]:
        """The top-level modules ``act`` uses; EnvRunners hold only these."""
        raise NotImplementedError

    def begin_online_phase(self) -> None:
        """Called once on the learner when the online phase starts, for a family that trains differently online
        (SAC Flow drops its offline BC update); by default both phases run the same update."""

    # --- draws, acting, losses ---------------------------------------------------------------------
    def draw_specs(self, batch_size: int) -> DrawSpecs:
        raise NotImplementedError

    def act_draw_specs(self, batch_size: int) -> DrawSpecs:
        raise NotImplementedError

    def act(self, obs: torch.Tensor, draws: dict[str, torch.Tensor],
            intermediates: dict | None = None) -> torch.Tensor:
        """The policy's flattened action chunks (B, D) in [-1, 1], without gradients.  ``intermediates``, when
        given, receives the acting path's tensors under the fixtures' ``act/`` names."""
        raise NotImplementedError

    def losses(self, batch: dict[str, torch.Tensor], draws: dict[str, torch.Tensor]) -> Losses:
        raise NotImplementedError

    # --- optimisation ------------------------------------------------------------------------------
    def make_optimizers(self, betas: tuple[float, float] = (0.9, 0.999),
                        eps: float = 1e-8) -> dict[str, torch.optim.Optimizer]:
        """The agent's optimisers by name; by default one Adam over every online parameter (the QAM repository's
        single optax chain).  A family with several (IDQL's actor, value and critic) returns each under its name;
        the learner registers and checkpoints every one."""
        return {"adam": make_adam(self.online_parameters(), self.hp.lr, betas, eps)}

    def update(self, optimizers: dict[str, torch.optim.Optimizer], batch: dict[str, torch.Tensor],
               draws: dict[str, torch.Tensor], on_raw_gradients=None):
        """One gradient step; returns (metrics, intermediates).  The joint step unless a family overrides it.
        ``on_raw_gradients`` runs after every backward pass, before clipping and stepping."""
        return joint_step(self, optimizers["adam"], batch, draws, on_raw_gradients)

    def compile_losses(self, mode: str) -> None:
        """Run every ``LOSS_FUNCTIONS`` method (forward and backward) under ``torch.compile(mode=mode)`` from now on;
        "none" keeps eager.  Call after moving the agent to its device (``qam_ray.core.compile`` says what each mode
        does and why the optimiser steps stay eager)."""
        if mode == "none":
            return
        cuda_graphs = mode in CUDA_GRAPH_MODES and next(self.parameters()).is_cuda
        for name in self.LOSS_FUNCTIONS:
            setattr(self, name, compiled_losses(getattr(self, name), mode, cuda_graphs))
        if cuda_graphs:
            self.update = cuda_graph_steps(self.update)

    @classmethod
    def search_space(cls, trial, method: str) -> dict:
        """Optuna define-by-run space of the ``search`` sweep preset for ``method``."""
        raise NotImplementedError

    def sample_actions(self, obs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draw the acting noise and return action chunks (B, horizon_length, action_dim)."""
        draws = sample_draws(self.act_draw_specs(obs.shape[0]), generator, obs.device)
        return self.act(obs, draws).reshape(obs.shape[0], self.hp.horizon_length, self.hp.action_dim)

"""Plain offline QAM training (no Ray): hyperparameters from the domain registry, a device-resident
chunk buffer, N updates per call with metrics reduced once per call.

The RLlib Learner runs the same ``optimization_step``; this module is also the ``plain`` benchmark.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from collections.abc import Callable

import torch

from qam_ray.core.qam import (
    HYPERPARAM_FIELDS,
    QAMHyperparams,
    QAMNetworks,
    make_optimizer,
    optimization_step,
    sample_draws,
)
from qam_ray.data.replay import ChunkReplayBuffer
from qam_ray.domains import VARIANTS, domain_of_env, variant_hparams

class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/inf; stop instead of training on garbage."""


def run_updates(
    nets: QAMNetworks,
    hp: QAMHyperparams,
    optimizer: torch.optim.Optimizer,
    buffer: ChunkReplayBuffer,
    generator: torch.Generator,
    num_steps: int,
    batch_size: int,
    first_step: int = 0,
    on_raw_gradients: Callable[[], None] | None = None,
) -> dict[str, float]:
    """``num_steps`` QAM updates on chunks sampled on the buffer's device; returns each metric's mean over them.

    Metrics stay on the device until the end (one host sync per call).  A NaN/inf metric raises
    NonFiniteLossError naming the metrics and the gradient steps [first_step, first_step + num_steps).
    """
    sums: dict[str, torch.Tensor] = {}
    for _ in range(num_steps):
        batch = buffer.sample(batch_size, hp.horizon_length, hp.discount, generator)
        draws = sample_draws(hp, batch_size, generator, buffer.device)
        metrics, _ = optimization_step(nets, hp, optimizer, batch, draws, on_raw_gradients)
        for key, value in metrics.items():
            sums[key] = sums[key] + value if key in sums else value.clone()
    names = list(sums)
    means = dict(zip(names, (torch.stack([sums[k] for k in names]) / num_steps).tolist()))
    bad = {k: v for k, v in means.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(
            f"non-finite training metrics {bad} in gradient steps [{first_step}, {first_step + num_steps}): "
            f"check the dataset for extreme rewards/observations, or lower lr (now {hp.lr}) / inv_temp "
            f"(now {hp.inv_temp})."
        )
    return means


def parse_overrides(pairs: list[str]) -> dict:
    """``["inv_temp=3.0", "actor_hidden_dims=(256,256)"]`` → dict; values are Python literals (CLI ``--set``)."""
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set inv_temp=3.0")
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"--set {pair!r}: {text!r} is not a Python literal (e.g. 3.0, (256,256), None)") from None
    return overrides


def registry_hyperparams(env_name: str, variant: str) -> dict:
    """The per-domain QAMHyperparams values of the registry for ``env_name`` and ``variant``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")
    domain = domain_of_env(env_name)
    return dict(horizon_length=domain.horizon_length, discount=domain.discount, rho=domain.rho,
                **variant_hparams(domain, variant))


def hyperparams_for_env(
    env_name: str, variant: str, obs_dim: int, action_dim: int, overrides: dict | None = None
) -> QAMHyperparams:
    """The paper's per-domain settings for ``env_name`` and ``variant``, then ``overrides`` on top."""
    values = dict(obs_dim=obs_dim, action_dim=action_dim, **registry_hyperparams(env_name, variant))
    unknown = set(overrides or {}) - set(HYPERPARAM_FIELDS)
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)}; known: {sorted(HYPERPARAM_FIELDS)}")
    values.update(overrides or {})
    return QAMHyperparams(**values)


class OfflineTrainer:
    """QAM networks + optimizer + buffer + one device-side random generator, seeded once."""

    def __init__(self, hp: QAMHyperparams, buffer: ChunkReplayBuffer, batch_size: int = 256, seed: int = 0):
        self.hp, self.buffer, self.batch_size = hp, buffer, batch_size
        self.device = buffer.device
        torch.manual_seed(seed)  # network initialisation
        self.nets = QAMNetworks(hp).to(self.device)
        self.optimizer = make_optimizer(self.nets, hp)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.step = 0

    def train(self, num_steps: int) -> dict[str, float]:
        """``num_steps`` updates; returns each metric's mean over them (one host sync per call)."""
        means = run_updates(self.nets, self.hp, self.optimizer, self.buffer, self.generator, num_steps,
                            self.batch_size, first_step=self.step)
        self.step += num_steps
        return means

    def state_dict(self) -> dict:
        return {
            "nets": self.nets.state_dict(), "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(), "step": self.step, "hp": dataclasses.asdict(self.hp),
        }

    def load_state_dict(self, state: dict) -> None:
        self.nets.load_state_dict(state["nets"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step = state["step"]

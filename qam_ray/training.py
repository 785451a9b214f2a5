"""Plain offline QAM training (no Ray): hyperparameters from the domain registry, a device-resident
chunk buffer, N updates per call with metrics reduced once per call.

The RLlib Learner runs the same ``optimization_step``; this module is also the ``plain`` benchmark.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from qam_ray.core.qam import (
    QAMHyperparams,
    QAMNetworks,
    make_optimizer,
    optimization_step,
    sample_action_chunks,
    sample_draws,
)
from qam_ray.data.replay import ChunkReplayBuffer
from qam_ray.domains import VARIANTS, domain_of_env, variant_hparams

HYPERPARAM_FIELDS = {f.name for f in dataclasses.fields(QAMHyperparams)}


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/inf; stop instead of training on garbage."""


def hyperparams_for_env(
    env_name: str, variant: str, obs_dim: int, action_dim: int, overrides: dict | None = None
) -> QAMHyperparams:
    """The paper's per-domain settings for ``env_name`` and ``variant``, then ``overrides`` on top."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")
    domain = domain_of_env(env_name)
    values = dict(
        obs_dim=obs_dim, action_dim=action_dim, horizon_length=domain.horizon_length,
        discount=domain.discount, rho=domain.rho, **variant_hparams(domain, variant),
    )
    unknown = set(overrides or {}) - HYPERPARAM_FIELDS
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
        sums: dict[str, torch.Tensor] = {}
        hp = self.hp
        for _ in range(num_steps):
            batch = self.buffer.sample(self.batch_size, hp.horizon_length, hp.discount, self.generator)
            draws = sample_draws(hp, self.batch_size, self.generator, self.device)
            metrics, _ = optimization_step(self.nets, hp, self.optimizer, batch, draws)
            for key, value in metrics.items():
                sums[key] = sums[key] + value if key in sums else value.clone()
        first = self.step
        self.step += num_steps
        names = list(sums)
        means = dict(zip(names, (torch.stack([sums[k] for k in names]) / num_steps).tolist()))
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteLossError(
                f"non-finite training metrics {bad} in gradient steps [{first}, {self.step}): "
                f"{ {k: means[k] for k in bad} }. Check the dataset for extreme rewards/observations, or lower "
                f"lr (now {hp.lr}) / inv_temp (now {hp.inv_temp})."
            )
        return means

    def act(self, observations: np.ndarray) -> np.ndarray:
        """Action chunks (B, H, A) for a batch of observations (B, obs_dim); evaluation mode."""
        obs = torch.as_tensor(np.asarray(observations, dtype=np.float32), device=self.device)
        return sample_action_chunks(self.nets, self.hp, obs, self.generator).cpu().numpy()

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

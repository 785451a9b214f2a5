"""Plain offline training of any registered method (no Ray): hyperparameters from the registry, a device-resident
chunk buffer, N updates per call with metrics reduced once per call.

The RLlib learner runs the same ``run_updates``; this module is also the benchmark's ``plain`` path, so it imports
only torch and numpy (through the agents and the buffer).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from qam_ray.agents import agent_class, make_hyperparams
from qam_ray.agents.base import Agent, AgentHyperparams, sample_draws
from qam_ray.data.replay import ChunkReplayBuffer


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/inf; stop instead of training on garbage."""


def run_updates(agent: Agent, optimizers: dict[str, torch.optim.Optimizer], buffer: ChunkReplayBuffer,
                generator: torch.Generator, num_steps: int, batch_size: int, first_step: int = 0,
                on_raw_gradients: Callable[[], None] | None = None, shards=None) -> dict[str, float]:
    """``num_steps`` updates on chunks sampled on the buffer's device; returns each metric's mean over them.

    Metrics stay on the device until the end (one host sync per call).  A NaN/inf metric raises
    NonFiniteLossError naming the metrics and the gradient steps [first_step, first_step + num_steps).
    ``shards`` (a ``qam_ray.data.shards.ShardStream``) swaps the next 100M shard into the buffer at each of its
    boundaries; the seconds the swaps held training up are added as ``data/shard_swap_stall_s``.
    """
    if shards is None:
        return _updates(agent, optimizers, buffer, generator, num_steps, batch_size, first_step, on_raw_gradients)
    totals, done, stall = {}, 0, 0.0
    while done < num_steps:
        step = first_step + done
        count = min(num_steps - done, shards.steps_to_swap(step))
        for key, mean in _updates(agent, optimizers, buffer, generator, count, batch_size, step,
                                  on_raw_gradients).items():
            totals[key] = totals.get(key, 0.0) + mean * count
        done += count
        if (first_step + done) % shards.interval == 0:
            stall += shards.swap(buffer, first_step + done)
    return {**{key: total / num_steps for key, total in totals.items()}, "data/shard_swap_stall_s": stall,
            "data/shard": float(shards.shard_at(first_step + num_steps))}


def _updates(agent: Agent, optimizers: dict[str, torch.optim.Optimizer], buffer: ChunkReplayBuffer,
             generator: torch.Generator, num_steps: int, batch_size: int, first_step: int,
             on_raw_gradients: Callable[[], None] | None) -> dict[str, float]:
    hp = agent.hp
    specs = agent.draw_specs(batch_size)
    sums: dict[str, torch.Tensor] = {}
    for _ in range(num_steps):
        batch = buffer.sample(batch_size, hp.horizon_length, hp.discount, generator)
        draws = sample_draws(specs, generator, buffer.device)
        metrics, _ = agent.update(optimizers, batch, draws, on_raw_gradients)
        for key, value in metrics.items():
            sums[key] = sums[key] + value if key in sums else value.clone()
    names = list(sums)
    means = dict(zip(names, (torch.stack([sums[k] for k in names]) / num_steps).tolist()))
    bad = {k: v for k, v in means.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(
            f"non-finite training metrics {bad} in gradient steps [{first_step}, {first_step + num_steps}): "
            f"check the dataset for extreme rewards/observations, or lower lr (now {hp.lr}) or the method's "
            "policy-improvement weight.")
    return means


class OfflineTrainer:
    """An agent + its optimisers + a buffer + one device-side random generator, seeded once."""

    def __init__(self, method: str, hp: AgentHyperparams, buffer: ChunkReplayBuffer, batch_size: int = 256,
                 seed: int = 0, shards=None, compile: str = "none"):
        """``compile``: a ``qam_ray.core.compile.COMPILE_MODES`` mode for the agent's losses ("none": eager)."""
        self.method, self.hp, self.buffer, self.batch_size, self.shards = method, hp, buffer, batch_size, shards
        torch.manual_seed(seed)  # network initialisation
        self.agent = agent_class(method)(hp).to(buffer.device)
        buffer.add_extras(type(self.agent).DATASET_EXTRAS, hp.discount)
        self.optimizers = self.agent.make_optimizers()
        self.agent.compile_losses(compile)
        self.generator = torch.Generator(device=buffer.device).manual_seed(seed)
        self.step = 0

    @classmethod
    def for_env(cls, method: str, env_name: str, buffer: ChunkReplayBuffer, overrides: dict | None = None,
                **kwargs) -> OfflineTrainer:
        """The paper's settings of ``method`` on ``env_name`` (sizes from the buffer), then ``overrides``."""
        hp = make_hyperparams(method, env_name, buffer.obs_dim, buffer.action_dim, overrides)
        return cls(method, hp, buffer, **kwargs)

    def train(self, num_steps: int) -> dict[str, float]:
        """``num_steps`` updates; returns each metric's mean over them (one host sync per call)."""
        means = run_updates(self.agent, self.optimizers, self.buffer, self.generator, num_steps, self.batch_size,
                            first_step=self.step, shards=self.shards)
        self.step += num_steps
        return means

    def state_dict(self) -> dict:
        return {"agent": self.agent.state_dict(),
                "optimizers": {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()},
                "generator": self.generator.get_state(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.agent.load_state_dict(state["agent"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        self.generator.set_state(state["generator"])
        self.step = state["step"]

"""ReBRAC: TD3+BC with a deterministic tanh actor, as the official ``agents/rebrac.py`` of the QAM repository computes
it.  Fixture document: FIXTURE_FORMAT_BASELINES2.md §6 (``rebrac_small``).

A deterministic actor π(s) = tanh(mean_net(actor_net(s))) on the flattened chunk, a LayerNorm critic ensemble:

    L = L_Q − mean_B(λ·pess Q(s, π(s))) + mean_B(α_actor·Σ_D (π(s) − a)²·v),   λ = 1 / mean_B |pess Q(s, π(s))|

with the TD action of the **target** actor plus clipped smoothing noise, clipped.  Plain Adam, no gradient clip.

Official defect reproduced (§6 "Quirks to copy"): the class defines ``update`` twice and the second, with
``full_update=False`` by default, wins, so a plain update **never** Polyak-averages the targets: they stay at
their initial copies for the whole run.  ``update(..., full_update=...)`` is the per-update switch the fixtures
exercise; ``target_update_period`` (0 = the official behaviour) offers the ReBRAC paper's intent, delayed target
updates every ``actor_freq`` = 2 steps.  The actor is trained on every update either way, as in the official code.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from qam_ray.agents.base import (NORMAL, QAM_REPO_FIXED_FLAGS, Agent, AgentHyperparams, Losses, non_negative,
                                 positive_int)
from qam_ray.core.losses import chunk_step, critic_td_loss, pessimistic, stats, td_target
from qam_ray.core.networks import MLP, EnsembleCritic, xavier_uniform_
from qam_ray.core.optim import joint_step


# --------------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ReBRACHyperparams(AgentHyperparams):
    """The QAM paper's common settings (QAM_SPEC §10) and ReBRAC's own fields; α_actor and the smoothing noise per
    domain from PER_DOMAIN."""

    alpha_actor: float = 0.0  # BC weight of the actor; the official default 0 switches BC off (paper: per domain)
    actor_noise: float = 0.2  # σ_n of the TD action's smoothing noise (paper: per domain, often 0)
    actor_noise_clip: float = 0.5  # c_n: the smoothing noise is clamped to [−c_n, c_n]
    actor_fc_scale: float = 0.01  # variance scale of the actor's output-layer init (small first actions)
    # Polyak of both targets on every k-th update; 0 = the official code (a plain update never moves them, see the
    # module docstring); 2 = the ReBRAC paper's delayed target updates (its actor_freq).
    target_update_period: int = 0

    def errors(self) -> list[str]:
        errors = super().errors() + [non_negative(self, name) for name in
                                     ("alpha_actor", "actor_noise", "actor_noise_clip", "actor_fc_scale")]
        if self.target_update_period != 0:
            errors.append(positive_int(self, "target_update_period"))
        return errors


# experiments/reproduce.py (QAM_SPEC §10): ReBRAC α_actor / actor_noise per domain.
_PAPER_VALUES = {
    "puzzle-3x3-play": (0.1, 0.0), "scene-play": (0.03, 0.0), "cube-double-play": (0.01, 0.0),
    "antmaze-large-navigate": (0.01, 0.0), "humanoidmaze-medium-navigate": (0.01, 0.0),
    "cube-triple-play": (0.01, 0.2), "cube-quadruple-play": (0.01, 0.2), "puzzle-4x4-play": (0.01, 0.2),
    "antmaze-giant-navigate": (0.01, 0.0), "humanoidmaze-large-navigate": (0.01, 0.1),
}
PER_DOMAIN = {"ReBRAC": {d: dict(alpha_actor=a, actor_noise=n) for d, (a, n) in _PAPER_VALUES.items()}}


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------
class DeterministicTanhActor(nn.Module):
    """π(s) = tanh(mean_net(actor_net(s))): GELU after **every** trunk layer, a linear mean head (the mode of the
    official tanh-Gaussian whose fixed std is never used).  Children carry the official names."""

    FLAX_NAMES = {"actor_net": "actor_net", "mean_net": "mean_net"}  # official sub-modules, as named here

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims, output_scale: float):
        super().__init__()
        self.actor_net = MLP(obs_dim, hidden_dims, out_dim=None)
        self.mean_net = nn.Linear(hidden_dims[-1], action_dim)
        xavier_uniform_(self.mean_net.weight, hidden_dims[-1], action_dim)
        with torch.no_grad():  # variance scaling by output_scale (fan-avg, uniform): the xavier bound × √scale
            self.mean_net.weight.mul_(math.sqrt(output_scale))
        nn.init.zeros_(self.mean_net.bias)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-tanh mean, action)."""
        mean = self.mean_net(self.actor_net(obs))
        return mean, torch.tanh(mean)


class ReBRACAgent(Agent):
    name = "rebrac"
    Hyperparams = ReBRACHyperparams
    PER_DOMAIN = PER_DOMAIN
    TARGETS = {"target_critic": "critic", "target_actor": "actor"}
    FIXTURE_FORMAT = "baselines2"
    FIXTURE_FIXED_FLAGS = QAM_REPO_FIXED_FLAGS | {"polyak_only_when_full_update": True}
    FIXTURE_PER_UPDATE = ("full_update",)
    FIXTURE_METRIC_ALIASES = {"info/actor/total_loss": "actor_total_loss"}

    def __init__(self, hp: ReBRACHyperparams):
        super().__init__(hp)
        s, d = hp.obs_dim, hp.chunk_dim
        self.critic = EnsembleCritic(s, d, hp.value_hidden_dims, hp.num_qs, layer_norm=hp.value_layer_norm)
        self.actor = DeterministicTanhActor(s, d, hp.actor_hidden_dims, hp.actor_fc_scale)
        self.make_targets()
        # Host-side count for target_update_period (no device sync).  Not in the checkpoint: a resumed run with a
        # period > 1 restarts the phase of its delayed target updates.
        self.num_updates = 0

    def acting_modules(self) -> tuple[str, ...]:
        return ("actor",)

    @classmethod
    def search_space(cls, trial, method: str) -> dict:
        return {"alpha_actor": trial.suggest_float("alpha_actor", 1e-3, 1.0, log=True),
                "actor_noise": trial.suggest_float("actor_noise", 0.0, 0.4),
                "rho": trial.suggest_float("rho", 0.0, 1.0)}

    # ----------------------------------------------------------------------------------------------
    # Random draws: only the TD action's smoothing noise; acting is deterministic
    # ----------------------------------------------------------------------------------------------
    def draw_specs(self, batch_size: int) -> dict:
        return {"target_noise": (NORMAL, (batch_size, self.hp.chunk_dim))}

    def act_draw_specs(self, batch_size: int) -> dict:
        return {}

    # ----------------------------------------------------------------------------------------------
    # Acting: the deterministic tanh action, online too (no exploration noise; acting is not in the fixtures, §12)
    # ----------------------------------------------------------------------------------------------
    def act(self, obs, draws, intermediates=None) -> torch.Tensor:
        with torch.no_grad():
            return self.actor(obs)[1]

    # ----------------------------------------------------------------------------------------------
    # Losses (FIXTURE_FORMAT_BASELINES2.md §6, steps 1-4)
    # ----------------------------------------------------------------------------------------------
    def losses(self, batch, draws) -> Losses:
        hp, step = self.hp, chunk_step(batch)
        obs, actions = step.obs, step.actions

        # Step 1: target actor + clamped smoothing noise, clipped; target critic, mean − ρ·std (no min).
        with torch.no_grad():
            next_actions_mode = self.target_actor(step.next_obs)[1]
            target_noise_scaled = (hp.actor_noise * draws["target_noise"]).clamp(-hp.actor_noise_clip,
                                                                                  hp.actor_noise_clip)
            next_actions_presum = next_actions_mode + target_noise_scaled
            next_actions = next_actions_presum.clamp(-1.0, 1.0)
            next_qs = self.target_critic(step.next_obs, next_actions)
            next_v = pessimistic(next_qs, hp.rho)
            target_q = td_target(step, next_v, hp.discount, hp.horizon_length)
        critic_q = self.critic(obs, actions)
        critic_loss = critic_td_loss(critic_q, target_q, step.valid)

        # Step 3: Q term with the pessimistic value (with ρ) of the online critic held constant, normalised by a
        # constant λ, no valid mask; BC summed over the D chunk entries, with the valid mask.
        actor_mean, actor_actions = self.actor(obs)
        pi_qs = self.critic(obs, actor_actions, detach_params=True)
        pi_v = pessimistic(pi_qs, hp.rho)
        lam = 1.0 / pi_v.detach().abs().mean()
        actor_q_loss = -(lam * pi_v).mean()
        bc_mse = (actor_actions - actions).square().sum(-1) * step.valid
        bc_loss = (hp.alpha_actor * bc_mse).mean()
        actor_total_loss = actor_q_loss + bc_loss

        total = critic_loss + actor_total_loss
        metrics = {"critic_loss": critic_loss.detach(), **stats("q", critic_q),
                   "actor_total_loss": actor_total_loss.detach(), "actor_loss": actor_q_loss.detach(),
                   "bc_loss": bc_loss.detach(), "mse": bc_mse.detach().mean(),
                   # The official log's std of the tanh-Gaussian, fixed to 1 and meaningless (§6).
                   "action_std": torch.ones((), device=obs.device), "total_loss": total.detach()}
        inter = {"next_actions_mode": next_actions_mode, "target_noise_scaled": target_noise_scaled,
                 "next_actions_presum": next_actions_presum, "next_actions": next_actions, "next_qs": next_qs,
                 "next_v": next_v, "target_q": target_q, "critic_q": critic_q.detach(),
                 "actor_mean": actor_mean.detach(), "actor_actions": actor_actions.detach(),
                 "pi_qs": pi_qs.detach(), "pi_v": pi_v.detach(), "lam": lam, "bc_mse": bc_mse.detach()}
        return Losses(total, {"critic": critic_loss, "actor_q": actor_q_loss, "bc": bc_loss}, metrics, inter)

    # ----------------------------------------------------------------------------------------------
    # Update: the joint step, Polyak only on full updates (§6 step 5)
    # ----------------------------------------------------------------------------------------------
    def update(self, optimizers, batch, draws, on_raw_gradients=None, full_update: bool | None = None):
        """``full_update`` given: the official per-update switch.  None: ``target_update_period`` decides (0, the
        official default, never applies Polyak)."""
        self.num_updates += 1
        if full_update is None:
            period = self.hp.target_update_period
            full_update = period > 0 and self.num_updates % period == 0
        return joint_step(self, optimizers["adam"], batch, draws, on_raw_gradients, polyak=full_update)

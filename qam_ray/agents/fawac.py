"""FAWAC: advantage-weighted flow matching, as the official ``agents/fawac.py`` of the QAM repository computes it.
Fixture document: FIXTURE_FORMAT_BASELINES2.md §10 (``fawac_small``).

AWAC with a flow policy: a state value V(s) regresses every target-critic member at the dataset chunk, and the
flow f matches the dataset chunks with per-sample weights w = min(exp(β·(mean_E Q(s, a) − V(s))), 100):

    L = L_Q + mean_{E,B}(Q_target,e(s, a) − V(s))²·v + mean_B[mean_D(f(s, x_t, t) − (a − x₀))²·w·v]

The policy is the flow's clipped Euler sample; the TD target uses it too (no best-of-n).  Plain Adam, no
gradient clipping.
"""

from __future__ import annotations

import dataclasses

import torch

from qam_ray.agents.base import (NORMAL, QAM_REPO_FIXED_FLAGS, UNIFORM, Agent, AgentHyperparams, Losses, non_negative,
                                 per_domain_values)
from qam_ray.core.flow import euler_ode, euler_ode_states
from qam_ray.core.losses import chunk_step, critic_td_loss, pessimistic, stats, td_target
from qam_ray.core.networks import EnsembleCritic, ValueNet, VelocityField


# --------------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FAWACHyperparams(AgentHyperparams):
    """The QAM paper's common settings (QAM_SPEC §10) and FAWAC's own defaults; β per domain from PER_DOMAIN."""

    inv_temp: float = 10.0  # β of the weight exp(β·A) (official default 10; the paper uses 0.8 or 6.4)
    awr_weight_cap: float = 100.0  # the weight's upper clip (official, not normalised)
    # The official config has best_of_n, but the agent ignores it (FIXTURE_FORMAT_BASELINES2 §10): not a field here.

    def errors(self) -> list[str]:
        return super().errors() + [non_negative(self, "inv_temp"), non_negative(self, "awr_weight_cap")]


# experiments/reproduce.py (QAM_SPEC §10): FAWAC τ (= inv_temp β) per domain.
PER_DOMAIN = per_domain_values("FAWAC", "inv_temp", {
    "puzzle-3x3-play": 0.8, "scene-play": 6.4, "cube-double-play": 0.8, "antmaze-large-navigate": 6.4,
    "humanoidmaze-medium-navigate": 6.4, "cube-triple-play": 0.8, "cube-quadruple-play": 0.8,
    "puzzle-4x4-play": 0.8, "antmaze-giant-navigate": 0.8, "humanoidmaze-large-navigate": 0.8,
})


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------
class FAWACAgent(Agent):
    name = "fawac"
    Hyperparams = FAWACHyperparams
    PER_DOMAIN = PER_DOMAIN
    TARGETS = {"target_critic": "critic"}
    FIXTURE_FORMAT = "baselines2"
    FIXTURE_FIXED_FLAGS = QAM_REPO_FIXED_FLAGS | {"value_num_ensembles": 1}

    def __init__(self, hp: FAWACHyperparams):
        super().__init__(hp)
        s, d = hp.obs_dim, hp.chunk_dim
        self.critic = EnsembleCritic(s, d, hp.value_hidden_dims, hp.num_qs, layer_norm=hp.value_layer_norm)
        self.value = ValueNet(s, hp.value_hidden_dims, layer_norm=hp.value_layer_norm)  # V(s), one member
        self.actor = VelocityField(s, d, hp.actor_hidden_dims)  # the flow policy f
        self.make_targets()

    def acting_modules(self) -> tuple[str, ...]:
        return ("actor",)

    @classmethod
    def search_space(cls, trial, method: str) -> dict:
        return {"inv_temp": trial.suggest_float("inv_temp", 0.1, 30.0, log=True),
                "rho": trial.suggest_float("rho", 0.0, 1.0)}

    # ----------------------------------------------------------------------------------------------
    # Random draws
    # ----------------------------------------------------------------------------------------------
    def draw_specs(self, batch_size: int) -> dict:
        shape = (batch_size, self.hp.chunk_dim)
        return {"target_noise": (NORMAL, shape), "fm_x0": (NORMAL, shape), "fm_t": (UNIFORM, (batch_size, 1))}

    def act_draw_specs(self, batch_size: int) -> dict:
        return {"z": (NORMAL, (batch_size, self.hp.chunk_dim))}

    # ----------------------------------------------------------------------------------------------
    # Acting: the flow's Euler sample, clipped (acting is not in the fixtures, FIXTURE_FORMAT_BASELINES2 §12)
    # ----------------------------------------------------------------------------------------------
    def act(self, obs, draws, intermediates=None) -> torch.Tensor:
        with torch.no_grad():
            return euler_ode(self.actor, obs, draws["z"], self.hp.flow_steps).clamp(-1.0, 1.0)

    # ----------------------------------------------------------------------------------------------
    # Losses (FIXTURE_FORMAT_BASELINES2.md §10, steps 1-5)
    # ----------------------------------------------------------------------------------------------
    def losses(self, batch, draws) -> Losses:
        hp, step = self.hp, chunk_step(batch)
        obs, actions = step.obs, step.actions

        # Step 1: TD action = the online flow's clipped sample at s′ (the official second clip is a no-op).
        with torch.no_grad():
            next_flow_xs = euler_ode_states(self.actor, step.next_obs, draws["target_noise"], hp.flow_steps)
            next_actions = next_flow_xs[-1].clamp(-1.0, 1.0)
            next_qs = self.target_critic(step.next_obs, next_actions)
            next_v = pessimistic(next_qs, hp.rho)
            target_q = td_target(step, next_v, hp.discount, hp.horizon_length)
        critic_q = self.critic(obs, actions)
        critic_loss = critic_td_loss(critic_q, target_q, step.valid)

        # Step 3: V regresses each target-critic member separately at the dataset chunk (so it learns their mean,
        # with no ρ), with the valid mask; plain squares, not an expectile.
        with torch.no_grad():
            value_qs = self.target_critic(obs, actions)
        v_pred = self.value(obs)
        value_loss = critic_td_loss(value_qs, v_pred, step.valid)

        # Step 4: flow matching weighted by the capped exp(β·A), A = online-critic mean − V, both constants.
        x0, t = draws["fm_x0"], draws["fm_t"]
        fm_xt = (1.0 - t) * x0 + t * actions
        fm_pred = self.actor(obs, fm_xt, t)
        with torch.no_grad():
            awr_q = self.critic(obs, actions).mean(0)
            awr_v = self.value(obs)
            awr_weight = torch.exp(hp.inv_temp * (awr_q - awr_v)).clamp(max=hp.awr_weight_cap)
        actor_loss = ((fm_pred - (actions - x0)).square().mean(-1) * awr_weight * step.valid).mean()

        total = critic_loss + value_loss + actor_loss
        metrics = {"critic_loss": critic_loss.detach(), **stats("q", critic_q), "value_loss": value_loss.detach(),
                   "actor_loss": actor_loss.detach(), "total_loss": total.detach()}
        inter = {"next_flow_xs": next_flow_xs, "next_actions": next_actions, "next_qs": next_qs, "next_v": next_v,
                 "target_q": target_q, "critic_q": critic_q.detach(), "value_qs": value_qs,
                 "v_pred": v_pred.detach(), "fm_xt": fm_xt, "fm_pred": fm_pred.detach(), "awr_q": awr_q,
                 "awr_v": awr_v, "awr_weight": awr_weight}
        return Losses(total, {"critic": critic_loss, "value": value_loss, "actor": actor_loss}, metrics, inter)

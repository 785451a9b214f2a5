"""FQL: flow Q-learning with action chunking (QC's ACFQL), as the official ``agents/fql.py`` of the QAM repository
computes it.  Fixture document: FIXTURE_FORMAT_BASELINES.md §6 (``fql_small``).

A behaviour flow f_β learns the data by flow matching; a one-step policy μ_ω(s, z) is distilled from f_β's ODE
sample of the same noise and pushed up the critic:

    L = L_Q + L_FM(f_β) + α·‖μ_ω(s, z) − clip(ODE_β(z))‖² − mean_E Q(s, clip(μ_ω(s, z)))

The policy is μ_ω (clipped); the TD target uses it too.  Plain Adam, no gradient clipping, no Q normalisation.
"""

from __future__ import annotations

import dataclasses

import torch

from qam_ray.agents.base import (NORMAL, QAM_REPO_FIXED_FLAGS, UNIFORM, Agent, AgentHyperparams, Losses, non_negative,
                                 per_domain_values, positive_int)
from qam_ray.core.flow import euler_ode_states
from qam_ray.core.losses import (best_of_n, chunk_step, critic_td_loss, flow_matching_loss, pessimistic, stats,
                                 td_target)
from qam_ray.core.networks import EnsembleCritic, VelocityField


# --------------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FQLHyperparams(AgentHyperparams):
    """The QAM paper's common settings (QAM_SPEC §10) and FQL's own defaults; α per domain from PER_DOMAIN."""

    alpha: float = 100.0  # α: weight of the distillation loss (official default 100; the paper uses 1–300)
    best_of_n: int = 1  # n candidates for the TD-target action, scored by the online critic's mean (paper: 1)

    def errors(self) -> list[str]:
        return super().errors() + [non_negative(self, "alpha"), positive_int(self, "best_of_n")]


# experiments/reproduce.py (QAM_SPEC §10): FQL α per domain.
PER_DOMAIN = per_domain_values("FQL", "alpha", {
    "puzzle-3x3-play": 300, "scene-play": 300, "cube-double-play": 300, "antmaze-large-navigate": 3,
    "humanoidmaze-medium-navigate": 30, "cube-triple-play": 30, "cube-quadruple-play": 100, "puzzle-4x4-play": 1,
    "antmaze-giant-navigate": 3, "humanoidmaze-large-navigate": 30,
})


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------
class FQLAgent(Agent):
    name = "fql"
    Hyperparams = FQLHyperparams
    PER_DOMAIN = PER_DOMAIN
    TARGETS = {"target_critic": "critic"}
    FIXTURE_FORMAT = "baselines"
    FIXTURE_FIXED_FLAGS = QAM_REPO_FIXED_FLAGS

    def __init__(self, hp: FQLHyperparams):
        super().__init__(hp)
        s, d = hp.obs_dim, hp.chunk_dim
        self.critic = EnsembleCritic(s, d, hp.value_hidden_dims, hp.num_qs, layer_norm=hp.value_layer_norm)
        self.actor_bc_flow = VelocityField(s, d, hp.actor_hidden_dims)  # f_β(s, x, t)
        self.actor_onestep_flow = VelocityField(s, d, hp.actor_hidden_dims, time_input=False)  # μ_ω(s, z)
        self.make_targets()

    def acting_modules(self) -> tuple[str, ...]:
        return ("actor_onestep_flow",)

    @classmethod
    def search_space(cls, trial, method: str) -> dict:
        return {"alpha": trial.suggest_float("alpha", 1.0, 1000.0, log=True),
                "rho": trial.suggest_float("rho", 0.0, 1.0)}

    # ----------------------------------------------------------------------------------------------
    # Random draws
    # ----------------------------------------------------------------------------------------------
    def draw_specs(self, batch_size: int) -> dict:
        shape = (batch_size, self.hp.chunk_dim)
        return {
            "target_noise": (NORMAL, (batch_size, self.hp.best_of_n, self.hp.chunk_dim)),  # z′ of the TD action
            "fm_x0": (NORMAL, shape),
            "fm_t": (UNIFORM, (batch_size, 1)),
            "onestep_z": (NORMAL, shape),  # z of both the distillation target and μ_ω
        }

    def act_draw_specs(self, batch_size: int) -> dict:
        return {"z": (NORMAL, (batch_size, self.hp.chunk_dim))}

    # ----------------------------------------------------------------------------------------------
    # Acting
    # ----------------------------------------------------------------------------------------------
    def act(self, obs, draws, intermediates=None) -> torch.Tensor:
        with torch.no_grad():
            return self.actor_onestep_flow(obs, draws["z"]).clamp(-1.0, 1.0)

    def next_actions(self, next_obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """TD-target action: best of n candidates clip(μ_ω(s′, z′)) by the online critic's ensemble mean."""
        candidates = self.actor_onestep_flow(next_obs[:, None], noise).clamp(-1.0, 1.0)  # (B, n, D)
        if candidates.shape[1] == 1:
            return candidates[:, 0]
        return best_of_n(candidates, self.critic(next_obs[:, None], candidates).mean(0))

    # ----------------------------------------------------------------------------------------------
    # Losses (FIXTURE_FORMAT_BASELINES.md §6, steps 1-6)
    # ----------------------------------------------------------------------------------------------
    def losses(self, batch, draws) -> Losses:
        hp, step = self.hp, chunk_step(batch)
        obs, actions = step.obs, step.actions

        with torch.no_grad():
            next_actions = self.next_actions(step.next_obs, draws["target_noise"])
            next_qs = self.target_critic(step.next_obs, next_actions)
            next_v = pessimistic(next_qs, hp.rho)
            target_q = td_target(step, next_v, hp.discount, hp.horizon_length)
        critic_q = self.critic(obs, actions)
        critic_loss = critic_td_loss(critic_q, target_q, step.valid)

        bc_flow_loss, fm_xt, fm_pred = flow_matching_loss(self.actor_bc_flow, obs, actions, draws["fm_x0"],
                                                          draws["fm_t"], step.valid)

        # Distillation onto the online f_β's clipped ODE sample of the same noise (a constant), no valid mask.
        z = draws["onestep_z"]
        with torch.no_grad():
            distill_flow_xs = euler_ode_states(self.actor_bc_flow, obs, z, hp.flow_steps)
            distill_target = distill_flow_xs[-1].clamp(-1.0, 1.0)
        onestep_actions = self.actor_onestep_flow(obs, z)
        distill_loss = (onestep_actions - distill_target).square().mean()

        # Q loss through clip(μ_ω) with the online critic's parameters held constant.
        pi_qs = self.critic(obs, onestep_actions.clamp(-1.0, 1.0), detach_params=True)
        q_loss = -pi_qs.mean()

        actor_loss = bc_flow_loss + hp.alpha * distill_loss + q_loss
        total = critic_loss + actor_loss
        metrics = {"critic_loss": critic_loss.detach(), **stats("q", critic_q), "actor_loss": actor_loss.detach(),
                   "bc_flow_loss": bc_flow_loss.detach(), "distill_loss": distill_loss.detach(),
                   "q_loss": q_loss.detach(), "total_loss": total.detach()}
        inter = {"next_actions": next_actions, "next_qs": next_qs, "next_v": next_v, "target_q": target_q,
                 "critic_q": critic_q.detach(), "fm_xt": fm_xt, "fm_pred": fm_pred.detach(),
                 "distill_flow_xs": distill_flow_xs, "distill_target": distill_target,
                 "onestep_actions": onestep_actions.detach(), "pi_qs": pi_qs.detach(), "q_loss": q_loss.detach()}
        terms = {"critic": critic_loss, "bc_flow": bc_flow_loss, "distill": hp.alpha * distill_loss, "q": q_loss}
        return Losses(total, terms, metrics, inter)

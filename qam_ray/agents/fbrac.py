"""FBRAC: flow behaviour-regularised actor-critic, as the official ``agents/fbrac.py`` of the QAM repository computes
it.  Fixture document: FIXTURE_FORMAT_BASELINES2.md §9 (``fbrac_small``).

One flow f is both the behaviour model and the policy: it is trained by flow matching and by the critic's value of
its own clipped Euler sample, back-propagated through every sampler step (BPTT):

    L = L_Q + L_FM(f) − mean_E Q(s, clip(ODE_f(z))) / α

α divides the Q term (large α = more behaviour cloning).  The TD target uses the same flow, best of n candidates
by the online critic's mean.  Plain Adam, no gradient clipping.
"""

from __future__ import annotations

import dataclasses

import torch

from qam_ray.agents.base import (NORMAL, QAM_REPO_FIXED_FLAGS, UNIFORM, Agent, AgentHyperparams, Losses,
                                 per_domain_values, positive_int)
from qam_ray.core.flow import euler_ode, euler_ode_states
from qam_ray.core.losses import (best_of_n, chunk_step, critic_td_loss, flow_matching_loss, pessimistic, stats,
                                 td_target)
from qam_ray.core.networks import EnsembleCritic, VelocityField


# --------------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FBRACHyperparams(AgentHyperparams):
    """The QAM paper's common settings (QAM_SPEC §10) and FBRAC's own defaults; α per domain from PER_DOMAIN."""

    alpha: float = 100.0  # α: the Q term is divided by it (official default 100; the paper uses 0.03–100)
    best_of_n: int = 1  # n candidates for the TD-target action, scored by the online critic's mean (paper: 1)

    def errors(self) -> list[str]:
        errors = super().errors() + [positive_int(self, "best_of_n")]
        if not (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha > 0):
            errors.append(f"alpha={self.alpha!r}: must be a number > 0 (the Q term is divided by it)")
        return errors


# experiments/reproduce.py (QAM_SPEC §10): FBRAC α per domain.
PER_DOMAIN = per_domain_values("FBRAC", "alpha", {
    "puzzle-3x3-play": 0.03, "scene-play": 100, "cube-double-play": 0.1, "antmaze-large-navigate": 0.1,
    "humanoidmaze-medium-navigate": 30, "cube-triple-play": 0.03, "cube-quadruple-play": 1.0,
    "puzzle-4x4-play": 0.3, "antmaze-giant-navigate": 0.1, "humanoidmaze-large-navigate": 10,
})


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------
class FBRACAgent(Agent):
    name = "fbrac"
    Hyperparams = FBRACHyperparams
    PER_DOMAIN = PER_DOMAIN
    TARGETS = {"target_critic": "critic"}
    FIXTURE_FORMAT = "baselines2"
    FIXTURE_FIXED_FLAGS = QAM_REPO_FIXED_FLAGS

    def __init__(self, hp: FBRACHyperparams):
        super().__init__(hp)
        s, d = hp.obs_dim, hp.chunk_dim
        self.critic = EnsembleCritic(s, d, hp.value_hidden_dims, hp.num_qs, layer_norm=hp.value_layer_norm)
        self.actor_flow = VelocityField(s, d, hp.actor_hidden_dims)  # f: behaviour model and policy
        self.make_targets()

    def acting_modules(self) -> tuple[str, ...]:
        return ("actor_flow",)

    @classmethod
    def search_space(cls, trial, method: str) -> dict:
        return {"alpha": trial.suggest_float("alpha", 0.01, 300.0, log=True),
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
            "bptt_z": (NORMAL, shape),  # start of the back-propagated sampler
        }

    def act_draw_specs(self, batch_size: int) -> dict:
        return {"z": (NORMAL, (batch_size, self.hp.chunk_dim))}

    # ----------------------------------------------------------------------------------------------
    # Acting: the flow's Euler sample, clipped (acting is not in the fixtures, FIXTURE_FORMAT_BASELINES2 §12)
    # ----------------------------------------------------------------------------------------------
    def act(self, obs, draws, intermediates=None) -> torch.Tensor:
        with torch.no_grad():
            return euler_ode(self.actor_flow, obs, draws["z"], self.hp.flow_steps).clamp(-1.0, 1.0)

    # ----------------------------------------------------------------------------------------------
    # Losses (FIXTURE_FORMAT_BASELINES2.md §9, steps 1-5)
    # ----------------------------------------------------------------------------------------------
    def losses(self, batch, draws) -> Losses:
        hp, step = self.hp, chunk_step(batch)
        obs, actions = step.obs, step.actions

        # Step 1: TD action = best of n clipped samples of the online flow (not a target policy), scored by the
        # online critic's plain mean; valued by the target critic's mean − ρ·std.
        with torch.no_grad():
            next_obs = step.next_obs[:, None]  # (B, 1, obs) against the n candidates
            next_flow_xs = euler_ode_states(self.actor_flow, next_obs, draws["target_noise"], hp.flow_steps)
            next_candidates = next_flow_xs[-1].clamp(-1.0, 1.0)
            next_candidate_q = self.critic(next_obs, next_candidates).mean(0)
            next_actions = best_of_n(next_candidates, next_candidate_q)
            next_qs = self.target_critic(step.next_obs, next_actions)
            next_v = pessimistic(next_qs, hp.rho)
            target_q = td_target(step, next_v, hp.discount, hp.horizon_length)
        critic_q = self.critic(obs, actions)
        critic_loss = critic_td_loss(critic_q, target_q, step.valid)

        bc_flow_loss, fm_xt, fm_pred = flow_matching_loss(self.actor_flow, obs, actions, draws["fm_x0"],
                                                          draws["fm_t"], step.valid)

        # Step 4: the sampler with gradient through every state and every step's field; the clip passes no
        # gradient outside [-1, 1]; the critic is a constant, plain ensemble mean, no valid mask.
        bptt_flow_xs = euler_ode_states(self.actor_flow, obs, draws["bptt_z"], hp.flow_steps)
        bptt_actions = bptt_flow_xs[-1].clamp(-1.0, 1.0)
        pi_qs = self.critic(obs, bptt_actions, detach_params=True)
        q_loss = -pi_qs.mean()

        actor_loss = bc_flow_loss + q_loss / hp.alpha
        total = critic_loss + actor_loss
        metrics = {"critic_loss": critic_loss.detach(), **stats("q", critic_q), "actor_loss": actor_loss.detach(),
                   "bc_flow_loss": bc_flow_loss.detach(), "q_loss": q_loss.detach(), "total_loss": total.detach()}
        inter = {"next_flow_xs": next_flow_xs, "next_candidates": next_candidates,
                 "next_candidate_q": next_candidate_q, "next_actions": next_actions, "next_qs": next_qs,
                 "next_v": next_v, "target_q": target_q, "critic_q": critic_q.detach(), "fm_xt": fm_xt,
                 "fm_pred": fm_pred.detach(), "bptt_flow_xs": bptt_flow_xs.detach(),
                 "bptt_actions": bptt_actions.detach(), "pi_qs": pi_qs.detach(), "q_loss": q_loss.detach()}
        terms = {"critic": critic_loss, "bc_flow": bc_flow_loss, "q": q_loss / hp.alpha}
        return Losses(total, terms, metrics, inter)

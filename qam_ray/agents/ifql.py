"""IFQL: implicit flow Q-learning, as the official ``agents/ifql.py`` of the QAM repository computes it.
Fixture document: FIXTURE_FORMAT_BASELINES.md §8 (``ifql_small``, including the acting path §8.6).

IQL with a flow behaviour policy: an expectile value V_ψ(s) regresses the pessimistic target-critic value of
the *dataset* chunk, the critic regresses r + γ^H·m·V_ψ(s′), and the flow f_β is plain behaviour cloning.
The policy is implicit: draw N chunks from f_β and take the one the online critic's ensemble **minimum** ranks
highest.  Plain Adam, no gradient clipping.
"""

from __future__ import annotations

import dataclasses

import torch

from qam_ray.agents.base import (NORMAL, QAM_REPO_FIXED_FLAGS, UNIFORM, Agent, AgentHyperparams, Losses, in_interval,
                                 per_domain_values, positive_int)
from qam_ray.core.flow import euler_ode, euler_ode_states
from qam_ray.core.losses import (best_of_n, chunk_step, critic_td_loss, expectile_loss, flow_matching_loss,
                                 pessimistic, stats, td_target)
from qam_ray.core.networks import EnsembleCritic, ValueNet, VelocityField


# --------------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class IFQLHyperparams(AgentHyperparams):
    """The QAM paper's common settings (QAM_SPEC §10) and IFQL's own defaults; κ per domain from PER_DOMAIN."""

    kappa: float = 0.9  # κ: expectile of the value regression (official default 0.9; the paper uses 0.7–0.95)
    num_samples: int = 32  # N: flow samples ranked at acting time (official default 32)

    def errors(self) -> list[str]:
        return super().errors() + [positive_int(self, "num_samples"), in_interval(self, "kappa", 0.0, 1.0)]


# experiments/reproduce.py (QAM_SPEC §10): IFQL κ per domain.
PER_DOMAIN = per_domain_values("IFQL", "kappa", {
    "puzzle-3x3-play": 0.95, "scene-play": 0.9, "cube-double-play": 0.9, "antmaze-large-navigate": 0.9,
    "humanoidmaze-medium-navigate": 0.7, "cube-triple-play": 0.95, "cube-quadruple-play": 0.95,
    "puzzle-4x4-play": 0.9, "antmaze-giant-navigate": 0.8, "humanoidmaze-large-navigate": 0.8,
})


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------
class IFQLAgent(Agent):
    name = "ifql"
    Hyperparams = IFQLHyperparams
    PER_DOMAIN = PER_DOMAIN
    TARGETS = {"target_critic": "critic"}
    FIXTURE_FORMAT = "baselines"
    FIXTURE_FIXED_FLAGS = QAM_REPO_FIXED_FLAGS | {"value_num_ensembles": 1}

    def __init__(self, hp: IFQLHyperparams):
        super().__init__(hp)
        s, d = hp.obs_dim, hp.chunk_dim
        self.critic = EnsembleCritic(s, d, hp.value_hidden_dims, hp.num_qs, layer_norm=hp.value_layer_norm)
        self.value = ValueNet(s, hp.value_hidden_dims, layer_norm=hp.value_layer_norm)
        self.actor_flow = VelocityField(s, d, hp.actor_hidden_dims)  # f_β, the policy's proposal
        self.make_targets()

    def acting_modules(self) -> tuple[str, ...]:
        return ("actor_flow", "critic")

    @classmethod
    def search_space(cls, trial, method: str) -> dict:
        return {"kappa": trial.suggest_float("kappa", 0.6, 0.99),
                "rho": trial.suggest_float("rho", 0.0, 1.0),
                "num_samples": trial.suggest_categorical("num_samples", [8, 16, 32, 64])}

    # ----------------------------------------------------------------------------------------------
    # Random draws: the update draws only the flow-matching pair; acting draws N noises per observation
    # ----------------------------------------------------------------------------------------------
    def draw_specs(self, batch_size: int) -> dict:
        return {"fm_x0": (NORMAL, (batch_size, self.hp.chunk_dim)), "fm_t": (UNIFORM, (batch_size, 1))}

    def act_draw_specs(self, batch_size: int) -> dict:
        return {"noise": (NORMAL, (batch_size, self.hp.num_samples, self.hp.chunk_dim))}

    # ----------------------------------------------------------------------------------------------
    # Acting: best of N flow samples by the online critic's ensemble minimum, for a batch of observations
    # ----------------------------------------------------------------------------------------------
    def act(self, obs, draws, intermediates=None) -> torch.Tensor:
        # The official sample_actions works on one unbatched observation only (FIXTURE_FORMAT_BASELINES §12);
        # this is the same computation for every row of a batch at once.
        with torch.no_grad():
            if intermediates is None:
                candidates = euler_ode(self.actor_flow, obs[:, None], draws["noise"], self.hp.flow_steps)
            else:
                flow_xs = euler_ode_states(self.actor_flow, obs[:, None], draws["noise"], self.hp.flow_steps)
                candidates = flow_xs[-1]  # states (K+1, B, N, D)
            candidates = candidates.clamp(-1.0, 1.0)
            candidate_qs = self.critic(obs[:, None], candidates)  # (E, B, N)
            score = candidate_qs.min(0).values  # the minimum, not the pessimistic mean − ρ·std of training
            actions = best_of_n(candidates, score).clamp(-1.0, 1.0)
        if intermediates is not None:  # in the fixture's per-observation layout
            intermediates.update({
                "act/flow_xs": flow_xs.transpose(0, 1), "act/candidates": candidates,
                "act/candidate_qs": candidate_qs.transpose(0, 1), "act/candidate_q_min": score,
                "act/chosen_index": score.argmax(1).float(), "act/actions": actions})
        return actions

    # ----------------------------------------------------------------------------------------------
    # Losses (FIXTURE_FORMAT_BASELINES.md §8, steps 1-4)
    # ----------------------------------------------------------------------------------------------
    def losses(self, batch, draws) -> Losses:
        hp, step = self.hp, chunk_step(batch)
        obs, actions = step.obs, step.actions

        # Expectile value: the target critic at the dataset chunk, pessimistic aggregate; no valid mask.
        with torch.no_grad():
            value_qs = self.target_critic(obs, actions)
            value_target = pessimistic(value_qs, hp.rho)
        v_pred = self.value(obs)
        value_adv = value_target - v_pred
        value_loss, value_weight = expectile_loss(value_adv, hp.kappa)

        # Critic to r + γ^H·m·V(s′) with the online value net (IFQL has no target value net).
        with torch.no_grad():
            next_v = self.value(step.next_obs)
            target_q = td_target(step, next_v, hp.discount, hp.horizon_length)
        critic_q = self.critic(obs, actions)
        critic_loss = critic_td_loss(critic_q, target_q, step.valid)

        actor_loss, fm_xt, fm_pred = flow_matching_loss(self.actor_flow, obs, actions, draws["fm_x0"], draws["fm_t"],
                                                        step.valid)

        total = value_loss + critic_loss + actor_loss
        # The official critic/q_* statistics describe the TD target, not the critic's output.
        metrics = {"value_loss": value_loss.detach(), **stats("v", v_pred), "critic_loss": critic_loss.detach(),
                   **stats("q", target_q), "actor_loss": actor_loss.detach(), "total_loss": total.detach()}
        inter = {"value_qs": value_qs, "value_target": value_target, "v_pred": v_pred.detach(),
                 "value_adv": value_adv.detach(), "value_weight": value_weight, "next_v": next_v,
                 "target_q": target_q, "critic_q": critic_q.detach(), "fm_xt": fm_xt, "fm_pred": fm_pred.detach()}
        return Losses(total, {"value": value_loss, "critic": critic_loss, "actor": actor_loss}, metrics, inter)

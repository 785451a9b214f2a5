"""FEdit: EXPO-style "flow + edit" policy, as the official ``agents/fedit.py`` of the QAM repository computes it.
Fixture document: FIXTURE_FORMAT_BASELINES2.md §7 (``fedit_small``).

A behaviour flow f_β (flow matching only) proposes a chunk; a tanh-Gaussian edit policy π_e(e | s, a_flow) with a
learned temperature α (SAC-style) adds a scaled correction:

    a = clip(clip(ODE_β(z)) + κ_e·e),   L = L_Q + L_FM(f_β) − mean_E Q(s, a) + mean_B(α·log π_e) + α·(H − H̄)

The TD target takes the best of n such chunks by the online critic's mean.  Plain Adam, no gradient clipping.
"""

from __future__ import annotations

import dataclasses

import torch

from qam_ray.agents.base import (NORMAL, QAM_REPO_FIXED_FLAGS, UNIFORM, Agent, AgentHyperparams, Losses, non_negative,
                                 per_domain_values, positive_int)
from qam_ray.core.flow import euler_ode, euler_ode_states
from qam_ray.core.losses import (best_of_n, chunk_step, critic_td_loss, flow_matching_loss, pessimistic, stats,
                                 td_target)
from qam_ray.core.networks import (EnsembleCritic, TanhGaussianEditPolicy, Temperature, VelocityField,
                                   tanh_gaussian_sample)


# --------------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FEditHyperparams(AgentHyperparams):
    """The QAM paper's common settings (QAM_SPEC §10) and FEdit's own defaults; κ_e per domain from PER_DOMAIN."""

    # κ_e: scale of the edit added to the flow action.  The official default 0 makes the edit policy irrelevant to
    # every action while it is still trained (§7 "Quirks not to copy"); the paper's per-domain values replace it.
    edit_scale: float = 0.0
    best_of_n: int = 1  # n TD-target candidates, scored by the online critic's mean (paper: 1)
    edit_target_entropy_multiplier: float = 0.5  # target entropy H̄ = −multiplier·D (D the full chunk dim)
    alpha_init: float = 1.0  # initial temperature α (log α = 0)

    def errors(self) -> list[str]:
        errors = super().errors() + [non_negative(self, name) for name in
                                     ("edit_scale", "edit_target_entropy_multiplier")]
        errors.append(positive_int(self, "best_of_n"))
        if not (isinstance(self.alpha_init, (int, float)) and self.alpha_init > 0):
            errors.append(f"alpha_init={self.alpha_init!r}: must be a number > 0 (α = exp(log α))")
        return errors

    @property
    def target_entropy(self) -> float:
        return -self.edit_target_entropy_multiplier * self.chunk_dim


# experiments/reproduce.py (QAM_SPEC §10): FEdit β (= edit_scale) per domain.
PER_DOMAIN = per_domain_values("FEdit", "edit_scale", {
    "puzzle-3x3-play": 0.2, "scene-play": 0.2, "cube-double-play": 0.2, "antmaze-large-navigate": 0.2,
    "humanoidmaze-medium-navigate": 0.5, "cube-triple-play": 0.3, "cube-quadruple-play": 0.4,
    "puzzle-4x4-play": 0.8, "antmaze-giant-navigate": 0.3, "humanoidmaze-large-navigate": 0.1,
})


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------
class FEditAgent(Agent):
    name = "fedit"
    Hyperparams = FEditHyperparams
    PER_DOMAIN = PER_DOMAIN
    TARGETS = {"target_critic": "critic"}
    FIXTURE_FORMAT = "baselines2"
    FIXTURE_FIXED_FLAGS = QAM_REPO_FIXED_FLAGS | {
        "edit_log_std_min": TanhGaussianEditPolicy.LOG_STD_MIN, "edit_log_std_max": TanhGaussianEditPolicy.LOG_STD_MAX}

    def __init__(self, hp: FEditHyperparams):
        super().__init__(hp)
        s, d = hp.obs_dim, hp.chunk_dim
        self.critic = EnsembleCritic(s, d, hp.value_hidden_dims, hp.num_qs, layer_norm=hp.value_layer_norm)
        self.actor_bc_flow = VelocityField(s, d, hp.actor_hidden_dims)  # f_β
        self.edit_actor = TanhGaussianEditPolicy(s, d, hp.actor_hidden_dims)  # π_e(e | s, clipped flow action)
        self.alpha = Temperature(hp.alpha_init)
        self.make_targets()

    def acting_modules(self) -> tuple[str, ...]:
        return ("actor_bc_flow", "edit_actor")

    @classmethod
    def search_space(cls, trial, method: str) -> dict:
        return {"edit_scale": trial.suggest_float("edit_scale", 0.05, 0.9, log=True),
                "rho": trial.suggest_float("rho", 0.0, 1.0)}

    # ----------------------------------------------------------------------------------------------
    # Random draws (the official edit noises are drawn inside TFP's sampler: the fixtures store them)
    # ----------------------------------------------------------------------------------------------
    def draw_specs(self, batch_size: int) -> dict:
        hp, shape = self.hp, (batch_size, self.hp.chunk_dim)
        candidates = (batch_size, hp.best_of_n, hp.chunk_dim)
        return {
            "target_noise": (NORMAL, candidates),  # z′ of the TD candidates
            "target_edit_eps": (NORMAL, candidates),  # their edit noise
            "fm_x0": (NORMAL, shape),
            "fm_t": (UNIFORM, (batch_size, 1)),
            "flow_z": (NORMAL, shape),  # flow action of the edit loss
            "edit_eps": (NORMAL, shape),  # edit noise of the edit loss
        }

    def act_draw_specs(self, batch_size: int) -> dict:
        shape = (batch_size, self.hp.chunk_dim)
        return {"z": (NORMAL, shape), "edit_eps": (NORMAL, shape)}

    # ----------------------------------------------------------------------------------------------
    # Acting: the clipped flow action, edited and clipped again (the TD target's path with one candidate; the
    # fixtures do not cover acting, FIXTURE_FORMAT_BASELINES2 §12)
    # ----------------------------------------------------------------------------------------------
    def edited(self, obs, flow_actions, eps) -> dict[str, torch.Tensor]:
        """The edit of the clipped flow actions and the edited chunk, with the edit's pieces under §7's names."""
        mean, log_std = self.edit_actor.heads(obs, flow_actions)
        pre_tanh, edit, log_prob = tanh_gaussian_sample(mean, log_std, eps)
        actions = (flow_actions + self.hp.edit_scale * edit).clamp(-1.0, 1.0)
        return dict(mean=mean, std=log_std.exp(), pre_tanh=pre_tanh, edit=edit, log_prob=log_prob, actions=actions)

    def act(self, obs, draws, intermediates=None) -> torch.Tensor:
        with torch.no_grad():
            flow_actions = euler_ode(self.actor_bc_flow, obs, draws["z"], self.hp.flow_steps).clamp(-1.0, 1.0)
            return self.edited(obs, flow_actions, draws["edit_eps"])["actions"]

    # ----------------------------------------------------------------------------------------------
    # Losses (FIXTURE_FORMAT_BASELINES2.md §7, steps 1-5)
    # ----------------------------------------------------------------------------------------------
    def losses(self, batch, draws) -> Losses:
        hp, step = self.hp, chunk_step(batch)
        obs, actions = step.obs, step.actions

        # Step 1: n edited candidates of the online flow and edit actor; best by the online critic's plain mean,
        # valued by the target critic's mean − ρ·std.
        with torch.no_grad():
            next_obs = step.next_obs[:, None]  # (B, 1, obs) against the n candidates
            next_flow_xs = euler_ode_states(self.actor_bc_flow, next_obs, draws["target_noise"], hp.flow_steps)
            next_flow_actions = next_flow_xs[-1].clamp(-1.0, 1.0)
            next_edit = self.edited(next_obs, next_flow_actions, draws["target_edit_eps"])
            next_candidates = next_edit["actions"]
            next_candidate_q = self.critic(next_obs, next_candidates).mean(0)
            next_actions = best_of_n(next_candidates, next_candidate_q)
            next_qs = self.target_critic(step.next_obs, next_actions)
            next_v = pessimistic(next_qs, hp.rho)
            target_q = td_target(step, next_v, hp.discount, hp.horizon_length)
        critic_q = self.critic(obs, actions)
        critic_loss = critic_td_loss(critic_q, target_q, step.valid)

        bc_flow_loss, fm_xt, fm_pred = flow_matching_loss(self.actor_bc_flow, obs, actions, draws["fm_x0"],
                                                          draws["fm_t"], step.valid)

        # Step 4: the edit policy on a constant clipped flow action (no gradient into the flow), reparameterised;
        # the critic is a constant, plain ensemble mean, no valid mask.
        with torch.no_grad():
            flow_xs = euler_ode_states(self.actor_bc_flow, obs, draws["flow_z"], hp.flow_steps)
            flow_actions = flow_xs[-1].clamp(-1.0, 1.0)
        edit = self.edited(obs, flow_actions, draws["edit_eps"])
        pi_qs = self.critic(obs, edit["actions"], detach_params=True)
        edit_q_loss = -pi_qs.mean()
        # Entropy term with α constant; the temperature loss multiplies α itself (not log α) by a constant gap.
        alpha = self.alpha()
        edit_entropy_loss = (edit["log_prob"] * alpha.detach()).mean()
        edit_entropy = -edit["log_prob"].detach().mean()
        edit_alpha_loss = alpha * (edit_entropy - hp.target_entropy)

        actor_loss = bc_flow_loss + edit_q_loss + edit_entropy_loss + edit_alpha_loss
        total = critic_loss + actor_loss
        metrics = {"critic_loss": critic_loss.detach(), **stats("q", critic_q), "actor_loss": actor_loss.detach(),
                   "bc_flow_loss": bc_flow_loss.detach(), "edit_q_loss": edit_q_loss.detach(),
                   "edit_entropy_loss": edit_entropy_loss.detach(), "edit_alpha_loss": edit_alpha_loss.detach(),
                   "edit_entropy": edit_entropy, "alpha": alpha.detach(), "total_loss": total.detach()}
        inter = {"next_flow_xs": next_flow_xs, "next_flow_actions": next_flow_actions,
                 "next_edit_mean": next_edit["mean"], "next_edit_std": next_edit["std"],
                 "next_edit": next_edit["edit"], "next_candidates": next_candidates,
                 "next_candidate_q": next_candidate_q, "next_actions": next_actions, "next_qs": next_qs,
                 "next_v": next_v, "target_q": target_q, "critic_q": critic_q.detach(), "fm_xt": fm_xt,
                 "fm_pred": fm_pred.detach(), "flow_xs": flow_xs, "flow_actions": flow_actions,
                 **{f"edit_{k}": edit[k].detach() for k in ("mean", "std", "pre_tanh")}, "edit": edit["edit"].detach(),
                 "edit_log_probs": edit["log_prob"].detach(), "edited_actions": edit["actions"].detach(),
                 "pi_qs": pi_qs.detach(), "alpha": alpha.detach()}
        terms = {"critic": critic_loss, "bc_flow": bc_flow_loss, "edit": edit_q_loss + edit_entropy_loss,
                 "alpha": edit_alpha_loss}
        return Losses(total, terms, metrics, inter)

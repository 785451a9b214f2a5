"""DSRL: diffusion steering in latent-noise space, as the official ``agents/dsrl.py`` of the QAM repository computes
it.  Fixture document: FIXTURE_FORMAT_BASELINES2.md §8 (``dsrl_small``).

SAC in the flow's noise space.  A tanh-Gaussian latent policy π(w | s) picks the initial noise w = κ_n·tanh(u) of a
behaviour flow; the latent map G(s, w) = clip(ODE(w)) runs the Polyak-averaged **target** flow.  A latent critic
Q_z(s, w) is distilled from the action critic, Q_z,e(s, z) ≈ Q_e(s, G(s, z)) for z ~ N(0, 1), and the latent policy
maximises it with a learned temperature α:

    L = L_Q + mean_{E,B}(Q_z(s, z) − Q(s, G(s, z)))² + L_FM(f_β) + mean_B(α·log π − mean_E Q_z(s, w)) + α·(H − H̄)

Plain Adam, no gradient clipping; Polyak of the critic and of the flow on every update.

Official behaviour kept (§8): the latent critic is trained on plain N(0, 1) noise but queried by the actor at
κ_n·tanh(u), so it is fitted on one input distribution and maximised on another.
``distill_at_policy_latents=True`` (off by default) distils it at the latent policy's own latents instead.
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
class DSRLHyperparams(AgentHyperparams):
    """The QAM paper's common settings (QAM_SPEC §10) and DSRL's own defaults; κ_n per domain from PER_DOMAIN."""

    noise_scale: float = 1.0  # κ_n: the latent policy's tanh output is scaled by it (official default 1)
    best_of_n: int = 1  # n TD-target latents, their actions scored by the online critic's mean (paper: 1)
    target_entropy_multiplier: float = 0.5  # target entropy H̄ = −multiplier·D
    use_target_latent: bool = True  # the latent map runs the target flow (official default); False: the online one
    alpha_init: float = 1.0  # initial temperature α (log α = 0)
    # False (official): the latent critic is distilled at z ~ N(0, 1); True: at the latent policy's own (constant)
    # latents κ_n·tanh(u), where the actor queries it.
    distill_at_policy_latents: bool = False

    def errors(self) -> list[str]:
        errors = super().errors() + [non_negative(self, name) for name in ("noise_scale", "target_entropy_multiplier")]
        errors.append(positive_int(self, "best_of_n"))
        for name in ("use_target_latent", "distill_at_policy_latents"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{name}={getattr(self, name)!r}: must be True or False")
        if not (isinstance(self.alpha_init, (int, float)) and self.alpha_init > 0):
            errors.append(f"alpha_init={self.alpha_init!r}: must be a number > 0 (α = exp(log α))")
        return errors

    @property
    def target_entropy(self) -> float:
        return -self.target_entropy_multiplier * self.chunk_dim


# experiments/reproduce.py (QAM_SPEC §10): DSRL noise scale κ_n per domain.
PER_DOMAIN = per_domain_values("DSRL", "noise_scale", {
    "puzzle-3x3-play": 1.0, "scene-play": 0.4, "cube-double-play": 1.0, "antmaze-large-navigate": 0.8,
    "humanoidmaze-medium-navigate": 0.6, "cube-triple-play": 1.4, "cube-quadruple-play": 1.4,
    "puzzle-4x4-play": 1.0, "antmaze-giant-navigate": 1.2, "humanoidmaze-large-navigate": 0.8,
})


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------
class DSRLAgent(Agent):
    name = "dsrl"
    Hyperparams = DSRLHyperparams
    PER_DOMAIN = PER_DOMAIN
    TARGETS = {"target_critic": "critic", "target_actor_bc_flow": "actor_bc_flow"}
    FIXTURE_FORMAT = "baselines2"
    FIXTURE_FIXED_FLAGS = QAM_REPO_FIXED_FLAGS | {
        "latent_log_std_min": TanhGaussianEditPolicy.LOG_STD_MIN,
        "latent_log_std_max": TanhGaussianEditPolicy.LOG_STD_MAX}
    FIXTURE_METRIC_ALIASES = {"info/critic/total_loss": "critic_total_loss",
                              "info/actor/total_loss": "actor_total_loss"}

    def __init__(self, hp: DSRLHyperparams):
        super().__init__(hp)
        s, d = hp.obs_dim, hp.chunk_dim
        self.critic = EnsembleCritic(s, d, hp.value_hidden_dims, hp.num_qs, layer_norm=hp.value_layer_norm)
        self.z_critic = EnsembleCritic(s, d, hp.value_hidden_dims, hp.num_qs, layer_norm=hp.value_layer_norm)
        self.actor_bc_flow = VelocityField(s, d, hp.actor_hidden_dims)  # f_β (flow matching only)
        self.actor = TanhGaussianEditPolicy(s, d, hp.actor_hidden_dims, condition_on_action=False)  # π(w | s)
        self.alpha = Temperature(hp.alpha_init)
        self.make_targets()

    def acting_modules(self) -> tuple[str, ...]:
        return ("actor", self.latent_flow_name)

    @property
    def latent_flow_name(self) -> str:
        return "target_actor_bc_flow" if self.hp.use_target_latent else "actor_bc_flow"

    @classmethod
    def search_space(cls, trial, method: str) -> dict:
        return {"noise_scale": trial.suggest_float("noise_scale", 0.2, 2.0),
                "rho": trial.suggest_float("rho", 0.0, 1.0)}

    # ----------------------------------------------------------------------------------------------
    # Random draws (the official latent noises are drawn inside TFP's sampler: the fixtures store them)
    # ----------------------------------------------------------------------------------------------
    def draw_specs(self, batch_size: int) -> dict:
        hp, shape = self.hp, (batch_size, self.hp.chunk_dim)
        return {
            "target_latent_eps": (NORMAL, (batch_size, hp.best_of_n, hp.chunk_dim)),  # the TD latents' noise
            "z_noise": (NORMAL, shape),  # the distillation's latent (not scaled by κ_n)
            "fm_x0": (NORMAL, shape),
            "fm_t": (UNIFORM, (batch_size, 1)),
            "latent_eps": (NORMAL, shape),  # the actor loss's latent noise
        }

    def act_draw_specs(self, batch_size: int) -> dict:
        return {"latent_eps": (NORMAL, (batch_size, self.hp.chunk_dim))}

    # ----------------------------------------------------------------------------------------------
    # Acting: a latent from the policy, through the latent map G (the same map the critics are trained on; the
    # fixtures do not cover acting, FIXTURE_FORMAT_BASELINES2 §12)
    # ----------------------------------------------------------------------------------------------
    def latent(self, obs, eps) -> dict[str, torch.Tensor]:
        """The latent policy's sample w = κ_n·tanh(u) and its pieces under §8's names (the official clip of tanh(u)
        to [−1, 1] before scaling is a no-op and left out)."""
        mean, log_std = self.actor.heads(obs)
        pre_tanh, latent, log_prob = tanh_gaussian_sample(mean, log_std, eps)
        return dict(mean=mean, std=log_std.exp(), pre_tanh=pre_tanh, latent=latent, log_prob=log_prob,
                    scaled=latent * self.hp.noise_scale)

    def latent_map_states(self, obs, latent) -> torch.Tensor:
        """Euler states (K+1, …) of the latent map's flow from ``latent``; G(s, w) = clip(states[-1])."""
        return euler_ode_states(getattr(self, self.latent_flow_name), obs, latent, self.hp.flow_steps)

    def act(self, obs, draws, intermediates=None) -> torch.Tensor:
        with torch.no_grad():
            latent = self.latent(obs, draws["latent_eps"])["scaled"]
            flow = getattr(self, self.latent_flow_name)
            return euler_ode(flow, obs, latent, self.hp.flow_steps).clamp(-1.0, 1.0)

    # ----------------------------------------------------------------------------------------------
    # Losses (FIXTURE_FORMAT_BASELINES2.md §8, steps 1-6)
    # ----------------------------------------------------------------------------------------------
    def losses(self, batch, draws) -> Losses:
        hp, step = self.hp, chunk_step(batch)
        obs, actions = step.obs, step.actions

        # Step 1: n latents of the online latent policy at s′, through G; best by the online critic's plain mean,
        # valued by the target critic's mean − ρ·std.  The official second clip of the chosen action is a no-op.
        with torch.no_grad():
            next_obs = step.next_obs[:, None].expand(-1, hp.best_of_n, -1)
            next_latent = self.latent(next_obs, draws["target_latent_eps"])
            next_flow_xs = self.latent_map_states(next_obs, next_latent["scaled"])
            next_candidates = next_flow_xs[-1].clamp(-1.0, 1.0)
            next_candidate_q = self.critic(next_obs, next_candidates).mean(0)
            next_actions = best_of_n(next_candidates, next_candidate_q)
            next_qs = self.target_critic(step.next_obs, next_actions)
            next_v = pessimistic(next_qs, hp.rho)
            target_q = td_target(step, next_v, hp.discount, hp.horizon_length)
        critic_q = self.critic(obs, actions)
        critic_loss = critic_td_loss(critic_q, target_q, step.valid)

        # Step 5's latent sample first: the optional distillation at policy latents uses it (constant there).
        latent = self.latent(obs, draws["latent_eps"])

        # Step 3: member e of Q_z regresses member e of the online critic at G(s, z); no valid mask.
        with torch.no_grad():
            z = latent["scaled"].detach() if hp.distill_at_policy_latents else draws["z_noise"]
            distill_flow_xs = self.latent_map_states(obs, z)
            distill_actions = distill_flow_xs[-1].clamp(-1.0, 1.0)
            distill_target_qs = self.critic(obs, distill_actions)
        z_qs = self.z_critic(obs, z)
        distill_loss = (z_qs - distill_target_qs).square().mean()

        flow_loss, fm_xt, fm_pred = flow_matching_loss(self.actor_bc_flow, obs, actions, draws["fm_x0"],
                                                       draws["fm_t"], step.valid)

        # Step 5: maximise the latent critic (a constant, plain ensemble mean, no ρ) with α constant; the
        # temperature loss multiplies α itself by a constant entropy gap.
        pi_zqs = self.z_critic(obs, latent["scaled"], detach_params=True)
        q = pi_zqs.mean(0)
        alpha = self.alpha()
        actor_loss = (latent["log_prob"] * alpha.detach() - q).mean()
        entropy = -latent["log_prob"].detach().mean()
        alpha_loss = alpha * (entropy - hp.target_entropy)

        critic_total_loss = critic_loss + distill_loss
        actor_total_loss = flow_loss + actor_loss + alpha_loss
        total = critic_total_loss + actor_total_loss
        metrics = {"critic_total_loss": critic_total_loss.detach(), "critic_loss": critic_loss.detach(),
                   "distill_loss": distill_loss.detach(), **stats("q", critic_q),
                   "actor_total_loss": actor_total_loss.detach(), "flow_loss": flow_loss.detach(),
                   "actor_loss": actor_loss.detach(), "alpha_loss": alpha_loss.detach(), "alpha": alpha.detach(),
                   "entropy": entropy, "action_std": latent["std"].detach().mean(), "q": q.detach().mean(),
                   "total_loss": total.detach()}
        inter = {"next_latent_mean": next_latent["mean"], "next_latent_std": next_latent["std"],
                 "next_latent": next_latent["scaled"], "next_flow_xs": next_flow_xs,
                 "next_candidates": next_candidates, "next_candidate_q": next_candidate_q,
                 "next_actions": next_actions, "next_qs": next_qs, "next_v": next_v, "target_q": target_q,
                 "critic_q": critic_q.detach(), "distill_flow_xs": distill_flow_xs,
                 "distill_actions": distill_actions, "distill_target_qs": distill_target_qs,
                 "z_qs": z_qs.detach(), "fm_xt": fm_xt, "fm_pred": fm_pred.detach(),
                 **{f"latent_{k}": latent[k].detach() for k in ("mean", "std", "pre_tanh")},
                 "latent": latent["latent"].detach(), "latent_log_probs": latent["log_prob"].detach(),
                 "latent_scaled": latent["scaled"].detach(), "pi_zqs": pi_zqs.detach(), "alpha": alpha.detach()}
        terms = {"critic": critic_loss, "distill": distill_loss, "flow": flow_loss, "actor": actor_loss,
                 "alpha": alpha_loss}
        return Losses(total, terms, metrics, inter)

"""BAM: "basic adjoint matching", as the official ``agents/bam.py`` of the QAM repository computes it.
Fixture document: FIXTURE_FORMAT_BASELINES.md §7 (``bam_small``).

The stochastic-optimal-control baseline QAM improves on: the fine-tuned flow f_θ is trained by back-propagating
through the whole memoryless SDE (no lean adjoint), with a control cost against the EMA behaviour flow f_β:

    bam_loss = −τ·mean_B[pess(Q(s, x_K))] + mean_B Σ_{i<K−1} 2/σ_i²·‖f_θ(x_i, t_i) − f_β(x_i, t_i)‖²

with the online critic held constant on the unclipped x_K, the pessimistic ensemble aggregate, and a final
deterministic ODE step of f_β.  The policy is f_θ's deterministic ODE sample (f_β's when τ = 0).  One joint loss,
one Adam, global-norm clip 1.0, Polyak of the critic and f_β from the pre-step weights.
"""

from __future__ import annotations

import dataclasses

import torch

from qam_ray.agents.base import (NORMAL, QAM_REPO_FIXED_FLAGS, UNIFORM, Agent, AgentHyperparams, Losses, non_negative,
                                 per_domain_values, positive_int)
from qam_ray.core.flow import euler_ode, euler_ode_states, memoryless_sde_step, memoryless_sigmas, time_grid
from qam_ray.core.losses import (best_of_n, chunk_step, critic_td_loss, flow_matching_loss, pessimistic, stats,
                                 td_target)
from qam_ray.core.networks import EnsembleCritic, VelocityField


# --------------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BAMHyperparams(AgentHyperparams):
    """The QAM paper's common settings (QAM_SPEC §10) and BAM's own defaults; τ per domain from PER_DOMAIN."""

    clip_grad_max_norm: float | None = 1.0  # global-norm clip, as QAM
    inv_temp: float = 0.3  # τ: weight of the Q term (official default 0.3; the paper uses 10 or 30)
    best_of_n: int = 1  # n candidates for the TD-target action, scored by the online critic's mean (paper: 1)

    def errors(self) -> list[str]:
        return super().errors() + [non_negative(self, "inv_temp"), positive_int(self, "best_of_n")]


# experiments/reproduce.py (QAM_SPEC §10): BAM τ per domain.
PER_DOMAIN = per_domain_values("BAM", "inv_temp", {
    "puzzle-3x3-play": 10, "scene-play": 10, "cube-double-play": 10, "antmaze-large-navigate": 30,
    "humanoidmaze-medium-navigate": 10, "cube-triple-play": 30, "cube-quadruple-play": 10, "puzzle-4x4-play": 30,
    "antmaze-giant-navigate": 30, "humanoidmaze-large-navigate": 30,
})


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------
class BAMAgent(Agent):
    """The official tree also holds a ``target_actor_fast`` that is never used or updated: not built here."""

    name = "bam"
    Hyperparams = BAMHyperparams
    PER_DOMAIN = PER_DOMAIN
    TARGETS = {"target_critic": "critic", "target_actor_slow": "actor_slow"}
    FIXTURE_FORMAT = "baselines"
    FIXTURE_FIXED_FLAGS = QAM_REPO_FIXED_FLAGS | {"target_actor": True, "residual": False}
    FIXTURE_UNUSED_MODULES = ("target_actor_fast",)

    def __init__(self, hp: BAMHyperparams):
        super().__init__(hp)
        s, d, actor_dims = hp.obs_dim, hp.chunk_dim, hp.actor_hidden_dims
        self.critic = EnsembleCritic(s, d, hp.value_hidden_dims, hp.num_qs, layer_norm=hp.value_layer_norm)
        self.actor_slow = VelocityField(s, d, actor_dims)  # behaviour flow f_β (flow matching)
        self.actor_fast = VelocityField(s, d, actor_dims)  # fine-tuned flow f_θ: the policy
        self.make_targets()

    def acting_modules(self) -> tuple[str, ...]:
        return ("actor_fast" if self.hp.inv_temp > 0 else "actor_slow",)

    @classmethod
    def search_space(cls, trial, method: str) -> dict:
        return {"inv_temp": trial.suggest_float("inv_temp", 1.0, 100.0, log=True),
                "rho": trial.suggest_float("rho", 0.0, 1.0)}

    # ----------------------------------------------------------------------------------------------
    # Random draws
    # ----------------------------------------------------------------------------------------------
    def draw_specs(self, batch_size: int) -> dict:
        hp, shape = self.hp, (batch_size, self.hp.chunk_dim)
        return {
            "target_noise": (NORMAL, (batch_size, hp.best_of_n, hp.chunk_dim)),  # z′ of the TD-target action
            "fm_x0": (NORMAL, shape),
            "fm_t": (UNIFORM, (batch_size, 1)),
            "sde_x0": (NORMAL, shape),  # x_0 of the SDE
            "sde_noise": (NORMAL, (hp.flow_steps, *shape)),  # ε_0 … ε_{K−2}; slice K−1 unused
        }

    def act_draw_specs(self, batch_size: int) -> dict:
        return {"z": (NORMAL, (batch_size, self.hp.chunk_dim))}

    # ----------------------------------------------------------------------------------------------
    # Acting: the deterministic Euler ODE of the policy flow (also the TD-target sampler)
    # ----------------------------------------------------------------------------------------------
    def policy_field(self):
        # The official policy falls back to f_β when τ = 0 (FIXTURE_FORMAT_BASELINES §11), as QAM's does.
        return self.actor_fast if self.hp.inv_temp > 0 else self.actor_slow

    def act(self, obs, draws, intermediates=None) -> torch.Tensor:
        with torch.no_grad():
            return euler_ode(self.policy_field(), obs, draws["z"], self.hp.flow_steps).clamp(-1.0, 1.0)

    # ----------------------------------------------------------------------------------------------
    # Losses (FIXTURE_FORMAT_BASELINES.md §7, steps 1-6)
    # ----------------------------------------------------------------------------------------------
    def losses(self, batch, draws) -> Losses:
        hp, step = self.hp, chunk_step(batch)
        obs, actions = step.obs, step.actions

        with torch.no_grad():
            next_flow_xs = euler_ode_states(self.policy_field(), step.next_obs[:, None], draws["target_noise"],
                                            hp.flow_steps)  # (K+1, B, n, D)
            candidates = next_flow_xs[-1].clamp(-1.0, 1.0)
            if candidates.shape[1] == 1:
                next_actions = candidates[:, 0]
            else:
                next_actions = best_of_n(candidates, self.critic(step.next_obs[:, None], candidates).mean(0))
            next_qs = self.target_critic(step.next_obs, next_actions)
            next_v = pessimistic(next_qs, hp.rho)
            target_q = td_target(step, next_v, hp.discount, hp.horizon_length)
        critic_q = self.critic(obs, actions)
        critic_loss = critic_td_loss(critic_q, target_q, step.valid)

        flow_loss, fm_xt, fm_pred = flow_matching_loss(self.actor_slow, obs, actions, draws["fm_x0"], draws["fm_t"],
                                                       step.valid)

        sde, bc_loss = self.sde_with_control_cost(obs, draws["sde_x0"], draws["sde_noise"])
        # Q term: the online critic with its parameters constant, on the *unclipped* x_K, pessimistic aggregate;
        # its gradient reaches f_θ through every SDE step.
        pi_qs = self.critic(obs, sde["sde_x_final"], detach_params=True)
        pi_v = pessimistic(pi_qs, hp.rho)
        pi_q = pi_v.mean()
        bam_loss = -hp.inv_temp * pi_q + bc_loss

        total = critic_loss + flow_loss + bam_loss
        metrics = {"critic_loss": critic_loss.detach(), **stats("q", critic_q), "flow_loss": flow_loss.detach(),
                   "bam_loss": bam_loss.detach(), "bc_loss": bc_loss.detach(), "total_loss": total.detach()}
        inter = {"next_flow_xs": next_flow_xs, "next_actions": next_actions, "next_qs": next_qs, "next_v": next_v,
                 "target_q": target_q, "critic_q": critic_q.detach(), "fm_xt": fm_xt, "fm_pred": fm_pred.detach(),
                 **{key: value.detach() for key, value in sde.items()}, "bc_loss": bc_loss.detach(),
                 "pi_qs": pi_qs.detach(), "pi_v": pi_v.detach(), "pi_q": pi_q.detach()}
        return Losses(total, {"critic": critic_loss, "flow": flow_loss, "bam": bam_loss}, metrics, inter)

    def sde_with_control_cost(self, obs, x0, noise) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The memoryless SDE of f_θ from x_0 *with* gradient through every step, and its control cost.

        Steps 0…K−2: c_i = 2/σ_i²·Σ_D (f_θ − f_β)²(x_i, t_i), then x_{i+1} = x_i + h(2 f_θ − x_i/(t_i+h)) + √h σ_i ε_i.
        Step K−1: x_K = x_{K−1} + h·f_β(x_{K−1}, t_{K−1}) (no cost).  f_β is the EMA ``target_actor_slow``, whose
        parameters get no gradient while its input x does.  The cost is a sum over steps, no h, no valid mask.
        """
        num_steps = self.hp.flow_steps
        times = time_grid(num_steps, x0)
        sigmas = memoryless_sigmas(times, num_steps)
        x, xs, fine, base, costs = x0, [x0], [], [], []
        for i in range(num_steps - 1):
            v_fine = self.actor_fast(obs, x, times[i])
            v_base = self.target_actor_slow(obs, x, times[i])
            costs.append((v_fine - v_base).square().sum(-1) * (2.0 / sigmas[i, 0].square()))
            fine.append(v_fine)
            base.append(v_base)
            x = memoryless_sde_step(x, v_fine, times[i], sigmas[i], noise[i], num_steps)
            xs.append(x)
        base.append(self.target_actor_slow(obs, x, times[-1]))
        x_final = x + base[-1] / num_steps
        batch_shape = (x0.shape[0],)
        bc_terms = torch.stack(costs) if costs else x0.new_zeros((0, *batch_shape))
        sde = {"sde_xs": torch.stack(xs), "sde_ts": times.expand(-1, *batch_shape, 1),
               "sde_sigmas": sigmas.expand(-1, *batch_shape, 1),
               "sde_vf_fine": torch.stack(fine) if fine else x0.new_zeros((0, *x0.shape)),
               "sde_vf_base": torch.stack(base), "sde_bc_terms": bc_terms, "sde_x_final": x_final}
        return sde, bc_terms.sum(0).mean()

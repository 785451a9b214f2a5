"""QAM: Q-learning with Adjoint Matching (Li & Levine, 2026), as the official ``agents/qam.py`` computes it.

Fixture document: FIXTURE_FORMAT.md (``qam_small``: QAM, ``qamf_alt``: QAM-F).  Variants:
- QAM (``fql_alpha = edit_scale = 0``): the fine-tuned flow f_θ is the policy;
- QAM-E (``edit_scale > 0``): a tanh-Gaussian edit policy on top of f_θ's action, learned entropy temperature;
- QAM-F (``fql_alpha > 0``): a one-step policy distilled from f_θ.

Per update: critic to the chunked TD target mean − ρ·std of the target ensemble at a′ = clip(ODE_θ(z′)); flow
matching of the behaviour flow f_β; adjoint matching of f_θ against the EMA base f_β with the terminal adjoint
−τ·∇ mean_E Q_target(s, clip(x_K)); one joint loss, one Adam, global-norm clip 1.0, Polyak from pre-step weights.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.profiler import record_function

from qam_ray.agents.base import NORMAL, QAM_REPO_FIXED_FLAGS, UNIFORM, Agent, AgentHyperparams, Losses, non_negative
from qam_ray.core.flow import adjoint_matching_loss, euler_ode, vector_jacobian_product
from qam_ray.core.losses import (chunk_step, critic_td_loss, flow_matching_loss, pessimistic, stats,
                                 td_target)
from qam_ray.core.networks import EnsembleCritic, TanhGaussianEditPolicy, Temperature, VelocityField


# --------------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QAMHyperparams(AgentHyperparams):
    """Official ``get_config()`` defaults (QAM_SPEC.md §10); per-domain values come from PER_DOMAIN."""

    clip_grad_max_norm: float | None = 1.0  # global-norm clip (None: QAM-E-NOCLIP of the sensitivity study)
    inv_temp: float = 0.3  # τ of π* ∝ π_β·exp(τQ) (adjoint-matching inverse temperature); NOT the Polyak rate
    fql_alpha: float = 0.0  # QAM-F: weight α of the one-step policy's distillation loss (0 = off)
    edit_scale: float = 0.0  # QAM-E: scale β of the edit added to the flow action (0 = off)
    edit_target_entropy_multiplier: float = 0.5  # QAM-E: target entropy −0.5·D of the edit policy

    def errors(self) -> list[str]:
        errors = super().errors() + [non_negative(self, name) for name in
                                     ("inv_temp", "fql_alpha", "edit_scale", "edit_target_entropy_multiplier")]
        if self.fql_alpha > 0 and self.edit_scale > 0:
            errors.append(f"fql_alpha={self.fql_alpha} and edit_scale={self.edit_scale}: QAM-F and QAM-E are "
                          "exclusive; set one to 0")
        return errors

    @property
    def variant(self) -> str:
        """What the values switch on (a QAM-E/QAM-F label with a zero add-on weight computes plain QAM)."""
        return "QAM-F" if self.fql_alpha > 0 else "QAM-E" if self.edit_scale > 0 else "QAM"


# Per-domain values of experiments/reproduce.py (QAM_SPEC §10): QAM τ; QAM-E τ / β_edit; QAM-F τ / α.  Some QAM-E and
# QAM-F entries have a zero add-on weight and so compute QAM: that is what the official scripts run, kept as is.
_PAPER_VALUES = {  # domain: (QAM τ, (QAM-E τ, β), (QAM-F τ, α))
    "puzzle-3x3-play": (3, (1, 0.1), (3, 0)),
    "scene-play": (1, (1, 0.0), (1, 300)),
    "cube-double-play": (1, (1, 0), (1, 0)),
    "antmaze-large-navigate": (10, (1, 0.1), (3, 30)),
    "humanoidmaze-medium-navigate": (3, (3, 0.1), (1, 30)),
    "cube-triple-play": (3, (3, 0.1), (10, 300)),
    "cube-quadruple-play": (1, (3, 0.1), (0.3, 30)),
    "puzzle-4x4-play": (30, (0.1, 0.9), (3, 3)),
    "antmaze-giant-navigate": (3, (10, 0.1), (3, 30)),
    "humanoidmaze-large-navigate": (3, (3, 0.1), (0.3, 30)),
}
PER_DOMAIN = {
    "QAM": {d: dict(inv_temp=float(q), edit_scale=0.0, fql_alpha=0.0) for d, (q, _, _) in _PAPER_VALUES.items()},
    "QAM-E": {d: dict(inv_temp=float(t), edit_scale=float(b), fql_alpha=0.0) for d, (_, (t, b), _) in _PAPER_VALUES.items()},
    "QAM-F": {d: dict(inv_temp=float(t), edit_scale=0.0, fql_alpha=float(a)) for d, (_, _, (t, a)) in _PAPER_VALUES.items()},
}


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------
class QAMAgent(Agent):
    """``actor_fast`` (f_θ) has its own random init, not a copy of f_β.  The official ``target_actor_fast`` is
    never used or updated, so it is not built."""

    name = "qam"
    Hyperparams = QAMHyperparams
    PER_DOMAIN = PER_DOMAIN
    TARGETS = {"target_critic": "critic", "target_actor_slow": "actor_slow"}
    FIXTURE_FORMAT = "qam"
    FIXTURE_FIXED_FLAGS = QAM_REPO_FIXED_FLAGS | {
        "best_of_n": 1, "target_actor": True, "residual": False, "clip_adj": True, "use_target_grad": True,
        "edit_scale": 0.0}
    FIXTURE_UNUSED_MODULES = ("target_actor_fast",)
    FIXTURE_METRIC_ALIASES = {"fast_loss": "adj_loss"}

    def __init__(self, hp: QAMHyperparams):
        super().__init__(hp)
        s, d, actor_dims = hp.obs_dim, hp.chunk_dim, hp.actor_hidden_dims
        self.critic = EnsembleCritic(s, d, hp.value_hidden_dims, hp.num_qs, layer_norm=hp.value_layer_norm)
        self.actor_slow = VelocityField(s, d, actor_dims)  # behaviour flow f_β (flow matching)
        self.actor_fast = VelocityField(s, d, actor_dims)  # fine-tuned flow f_θ (adjoint matching)
        if hp.variant == "QAM-F":
            self.one_step_actor = VelocityField(s, d, actor_dims, time_input=False)
        if hp.variant == "QAM-E":
            self.edit_actor = TanhGaussianEditPolicy(s, d, actor_dims)
            self.edit_alpha = Temperature(1.0)  # the edit policy's entropy temperature, log α = 0 at init
        self.make_targets()

    def acting_modules(self) -> tuple[str, ...]:
        flow = "actor_fast" if self.hp.inv_temp > 0 else "actor_slow"
        return {"QAM": (flow,), "QAM-F": ("one_step_actor",), "QAM-E": (flow, "edit_actor")}[self.hp.variant]

    @classmethod
    def search_space(cls, trial, method: str) -> dict:
        """τ on a log scale, the ensemble pessimism ρ, and the variant's own knob."""
        values = {"inv_temp": trial.suggest_float("inv_temp", 0.03, 100.0, log=True),
                  "rho": trial.suggest_float("rho", 0.0, 1.0)}
        if method == "QAM-E":
            values["edit_scale"] = trial.suggest_float("edit_scale", 0.02, 0.9, log=True)
        if method == "QAM-F":
            values["fql_alpha"] = trial.suggest_float("fql_alpha", 1.0, 1000.0, log=True)
        return values

    # ----------------------------------------------------------------------------------------------
    # Random draws: everything one update samples (FIXTURE_FORMAT.md §4 names)
    # ----------------------------------------------------------------------------------------------
    def draw_specs(self, batch_size: int) -> dict:
        hp, shape = self.hp, (batch_size, self.hp.chunk_dim)
        specs = {
            "target_noise": (NORMAL, (batch_size, 1, hp.chunk_dim)),  # z′ of the TD-target action (best-of-n = 1)
            "fm_x0": (NORMAL, shape),  # flow-matching noise end
            "fm_t": (UNIFORM, (batch_size, 1)),  # flow-matching time ~ U[0, 1)
            "am_x0": (NORMAL, shape),  # start of the adjoint-matching trajectory
            "am_noise": (NORMAL, (hp.flow_steps, *shape)),  # SDE noises; slice K−1 unused
        }
        if hp.variant == "QAM-F":
            specs["fql_z"] = (NORMAL, shape)  # noise of the one-step policy's loss
        if hp.variant == "QAM-E":
            specs["edit_z"] = (NORMAL, shape)  # noise of the flow action in the edit loss
            specs["target_edit_eps"] = (NORMAL, shape)  # edit noise of the TD-target action
            specs["edit_eps"] = (NORMAL, shape)  # edit noise in the edit loss
        return specs

    def act_draw_specs(self, batch_size: int) -> dict:
        specs = {"z": (NORMAL, (batch_size, self.hp.chunk_dim))}
        if self.hp.variant == "QAM-E":
            specs["edit_eps"] = (NORMAL, (batch_size, self.hp.chunk_dim))
        return specs

    # ----------------------------------------------------------------------------------------------
    # Acting (evaluation, online collection and the TD-target action)
    # ----------------------------------------------------------------------------------------------
    def flow_actions(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Deterministic Euler ODE from z with f_θ (f_β when inv_temp == 0), clipped to [-1, 1]."""
        field = self.actor_fast if self.hp.inv_temp > 0 else self.actor_slow
        return euler_ode(field, obs, z, self.hp.flow_steps).clamp(-1.0, 1.0)

    def act(self, obs, draws, intermediates=None) -> torch.Tensor:
        with torch.no_grad():
            if self.hp.variant == "QAM-F":
                return self.one_step_actor(obs, draws["z"]).clamp(-1.0, 1.0)
            actions = self.flow_actions(obs, draws["z"])
            if self.hp.variant == "QAM-E":
                edit, _ = self.edit_actor(obs, actions, draws["edit_eps"])
                actions = (actions + self.hp.edit_scale * edit).clamp(-1.0, 1.0)
            return actions

    # ----------------------------------------------------------------------------------------------
    # Losses
    # ----------------------------------------------------------------------------------------------
    def losses(self, batch, draws) -> Losses:
        """One joint loss over every online module (FIXTURE_FORMAT.md §4, steps 1-9)."""
        hp, step = self.hp, chunk_step(batch)
        obs, actions = step.obs, step.actions
        metrics, inter = {}, {}

        # Critic: chunked TD to the pessimistic target-ensemble value at the policy's next action.
        # ``phase:`` labels name the update's phases for `benchmark.py --profile` (a few µs each otherwise).
        with torch.no_grad(), record_function("phase:td_target"):
            target_draws = {"z": draws["target_noise"][:, 0], "edit_eps": draws.get("target_edit_eps")}
            next_actions = self.act(step.next_obs, target_draws)
            next_qs = self.target_critic(step.next_obs, next_actions)
            next_v = pessimistic(next_qs, hp.rho)
            target_q = td_target(step, next_v, hp.discount, hp.horizon_length)
        with record_function("phase:critic_loss"):
            critic_q = self.critic(obs, actions)
            critic_loss = critic_td_loss(critic_q, target_q, step.valid)
        inter.update(next_actions=next_actions, next_qs=next_qs, next_v=next_v, target_q=target_q,
                     critic_q=critic_q.detach())
        metrics.update(critic_loss=critic_loss.detach(), **stats("q", critic_q))

        # Behaviour flow f_β: flow matching on the linear path.
        with record_function("phase:flow_matching"):
            flow_loss, fm_xt, fm_pred = flow_matching_loss(self.actor_slow, obs, actions, draws["fm_x0"],
                                                           draws["fm_t"], step.valid)
        inter.update(fm_xt=fm_xt, fm_pred=fm_pred.detach())
        metrics["flow_loss"] = flow_loss.detach()

        terms = {"critic": critic_loss, "flow": flow_loss}
        terms["adjoint"], adjoint_metrics, adjoint_inter = self.adjoint_loss(obs, draws)
        metrics.update(adjoint_metrics)
        inter.update(adjoint_inter)
        if hp.variant == "QAM-F":
            terms["one_step"], one_step_metrics, one_step_inter = self.one_step_policy_loss(obs, draws["fql_z"])
            metrics.update(one_step_metrics)
            inter.update(one_step_inter)
        elif hp.variant == "QAM-E":
            terms["edit"], terms["alpha"], edit_metrics = self.edit_policy_loss(obs, draws)
            metrics.update(edit_metrics)
        total = sum(terms.values())
        metrics["total_loss"] = total.detach()
        return Losses(total, terms, metrics, inter)

    def adjoint_loss(self, obs, draws) -> tuple[torch.Tensor, dict, dict]:
        """Adjoint matching of f_θ against the EMA base f_β with terminal adjoint ã_K = −τ ∇_x mean_E
        Q_target(s, clip(x)) at x_K: target critic, ensemble mean, no pessimism; coordinates outside [-1, 1] get
        zero gradient."""

        def terminal_adjoint(x_final: torch.Tensor) -> torch.Tensor:
            def q_sum(x):  # sum: per-sample gradients
                return self.target_critic(obs, x.clamp(-1.0, 1.0)).mean(0).sum()

            grad_q = vector_jacobian_product(q_sum, x_final, torch.ones((), device=x_final.device))
            return -self.hp.inv_temp * grad_q

        adj_loss, am_inter = adjoint_matching_loss(self.actor_fast, self.target_actor_slow, obs, draws["am_x0"],
                                                   draws["am_noise"], self.hp.flow_steps, terminal_adjoint)
        abs_adj = am_inter["am_adj_terminal"].abs()
        metrics = dict(adj_loss=adj_loss.detach(), adj_max=abs_adj.max(), adj_mean=abs_adj.mean(),
                       adj_std=abs_adj.std(correction=0))
        return adj_loss, metrics, am_inter

    def one_step_policy_loss(self, obs, z) -> tuple[torch.Tensor, dict, dict]:
        """QAM-F: α·‖μ_ω(s,z) − clip(ODE_θ(z))‖² − mean Q(s, clip(μ_ω)); the critic is a constant here."""
        with torch.no_grad():
            target_actions = self.flow_actions(obs, z)
        mu = self.one_step_actor(obs, z)
        distill_loss = (target_actions - mu).square().mean()
        qs = self.critic(obs, mu.clamp(-1.0, 1.0), detach_params=True)
        q_loss = -qs.mean()
        metrics = dict(fql_distill_loss=distill_loss.detach(), fql_q_loss=q_loss.detach())
        inter = dict(fql_flow_actions=target_actions, fql_os_actions=mu.detach(), fql_qs=qs.detach())
        return q_loss + self.hp.fql_alpha * distill_loss, metrics, inter

    def edit_policy_loss(self, obs, draws) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """QAM-E: maximise mean_E Q(s, clip(a_flow + β·e)) with SAC-style entropy tuning of α."""
        with torch.no_grad():
            flow_acts = self.flow_actions(obs, draws["edit_z"])
        edit, log_prob = self.edit_actor(obs, flow_acts, draws["edit_eps"])
        edited = (flow_acts + self.hp.edit_scale * edit).clamp(-1.0, 1.0)
        q = self.critic(obs, edited, detach_params=True).mean(0)
        alpha = self.edit_alpha()
        entropy = -log_prob.mean()
        target_entropy = -self.hp.edit_target_entropy_multiplier * self.hp.chunk_dim
        edit_loss = -q.mean() + (alpha.detach() * log_prob).mean()
        alpha_loss = alpha * (entropy.detach() - target_entropy)
        metrics = dict(edit_loss=edit_loss.detach(), edit_entropy=entropy.detach(), edit_alpha=alpha.detach())
        return edit_loss, alpha_loss, metrics

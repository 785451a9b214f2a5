"""SMAC: score-matched actor-critics for offline-to-online transfer (de Lara & Shkurti, arXiv 2602.17632, ICML 2026),
written from the paper as SEED_METHODS.md §3 and §6 "2. SMAC" describe it (no official code is public, so there is
no fixture; the closed-form checks of tests/test_smac.py verify the math instead).

For max-entropy RL the optimal policy's score is the critic's action-gradient, ∇ₐ log π*(a|s) = ∇ₐQ*(s, a)/α.
SMAC trains SAC offline and regularises its critic so that ∇ₐQ matches the **dataset's** score, estimated by a
return-conditioned (RvS) diffusion model ε_ω(s, a, w, k) queried at the lowest noise step k = 1:

    score model  L_ω  = mean_B[Σ_D (ε_ω(s, √ᾱ_k·a + √(1−ᾱ_k)·ε, w, k) − ε)²·v]     (IDQL's DDPM loss and network)
    critic       L_Q  = L_TD + κ·L_SM
                 L_TD = mean_{E·B} (Q_e(s, a_D) − y)²·v,  y = r + γ^H·m·(min_E Q̄_e(s′, a′) − α·log π(a′|s′))
                 L_SM = mean_{B,E} ‖∇ₐQ_e(s, a) − α_ψ(s)·sg[ε_ω(s, a, w, 1)]‖²,   a ∼ B = ½·π(·|s) + ½·U[−1, 1]^D
    actor        L_π  = mean_B(α·log π(a_π|s) − min_E Q_e(s, a_π))                (plain SAC, the critic constant)
    temperature  L_α  = α·(H − H̄),  H = −mean_B log π(a_π|s)

An ε-prediction is −√(1−ᾱ_1)·score, so α_ψ(s), an unconstrained real-valued MLP output, absorbs both the sign and
the scale (−α·/√(1−ᾱ_1) at the optimum).  ∇ₐQ_e is taken per ensemble member with ``create_graph=True`` (a double
backward).  Muon (``torch.optim.Muon``) steps every 2-D weight matrix of the actor, critic and α_ψ and Adam the rest,
as the paper does (``optimizer="adam"``: Adam everywhere, the paper's ablation); the score model and the
temperature have their own Adams.

Online (``begin_online_phase``) the same weights and optimiser states continue as plain SAC (default) or TD3
(``online_learner="td3"``): L_SM and the score model's update stop.  TD3 reads the deterministic policy tanh(μ(s))
and its Polyak-averaged ``target_actor``, kept in both phases so the hand-off re-initialises nothing.

Like every agent here, the actor and critic act on the domain's flattened action chunk (D = A·H) and the TD target
bootstraps with γ^H; the return-to-go w is the dataset row's discounted return within its episode,
G_t = Σ_{j≥t} γ^{j−t}·r_j (per environment step), normalised to w = (1 − γ)·G_t (the reward scale: no dataset
statistics to carry in checkpoints).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.func import functional_call

from qam_ray.agents.base import (NORMAL, UNIFORM, Agent, AgentHyperparams, Losses, in_interval, non_negative,
                                 per_domain_values, positive_int)
from qam_ray.core.flow import vp_schedule
from qam_ray.core.losses import chunk_step, critic_td_loss, ddpm_noise_loss, td_target
from qam_ray.core.networks import MLP, NoiseNetwork, TanhGaussianEditPolicy, Temperature, tanh_gaussian_sample
from qam_ray.core.optim import make_adam, polyak_update_
from qam_ray.domains import DOMAIN_NAMES

ONLINE_LEARNERS = ("sac", "td3")
OPTIMIZERS = ("muon", "adam")


# --------------------------------------------------------------------------------------------------
# Hyperparameters (the paper states none of these numbers, SEED_METHODS §3.3: defaults justified per field)
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SMACHyperparams(AgentHyperparams):
    """SAC's standard settings (Haarnoja et al. 2018: 2 critics, 256×256, lr 3e-4, τ 0.005, learned α with target
    entropy −D), IDQL's score network (T = 5, VP schedule, LN-ResNet 3×256, time_dim 128), TD3's standard online
    settings (Fujimoto et al. 2018).  ``rho`` and ``flow_steps`` are unused (the critics combine by their minimum)."""

    actor_hidden_dims: tuple[int, ...] = (256, 256)  # tanh-Gaussian actor trunk (GELU)
    value_hidden_dims: tuple[int, ...] = (256, 256)  # critic members (GELU + LayerNorm: a smooth ∇ₐQ to match)
    num_qs: int = 2  # critic ensemble E (SAC's twin critics, combined by the minimum)
    lr: float = 3e-4  # Adam rate of the non-matrix parameters (all parameters with optimizer="adam")
    kappa: float = 1.0  # κ, weight of L_SM in the critic loss
    scale_hidden_dims: tuple[int, ...] = (256, 256)  # α_ψ(s) MLP (GELU), one unconstrained real output
    optimizer: str = "muon"  # "muon": Muon on 2-D weight matrices + Adam on the rest (paper); "adam": the ablation
    muon_lr: float = 3e-4  # Muon rate, with the RMS-matched adjustment so that Adam's rate carries over
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum, torch's and Keller Jordan's default
    muon_weight_decay: float = 0.0  # none, as the Adam side (torch's default 0.1 is for LLM pre-training)
    muon_adjust_lr: str = "match_rms_adamw"  # 0.2·√max(A, B)·lr (Moonshot), so lr ≈ Adam's; "original": Keller's
    sac_alpha: float = 1.0  # initial temperature α (log α = 0, the usual autotune start)
    alpha_lr: float = 3e-4  # Adam rate of log α
    target_entropy_multiplier: float = 1.0  # H̄ = −multiplier·D (SAC's −|A|)
    diffusion_steps: int = 5  # T of the score model's VP schedule (IDQL); L_SM queries step k = 1 (index 0)
    score_num_blocks: int = 3  # LN-ResNet blocks of ε_ω (IDQL)
    score_hidden_dim: int = 256  # LN-ResNet width of ε_ω (IDQL)
    time_dim: int = 128  # Fourier time features of ε_ω (IDQL)
    score_lr: float = 3e-4  # Adam rate of ε_ω (IDQL's actor lr, without its cosine decay and weight decay)
    online_learner: str = "sac"  # the online phase: "sac" (default) or "td3", same weights and optimiser states
    td3_policy_noise: float = 0.2  # TD3 target policy smoothing σ, in the squashed action space
    td3_noise_clip: float = 0.5  # TD3 smoothing noise clip c
    td3_policy_delay: int = 2  # TD3: one actor (and target) update per this many critic updates
    td3_exploration_noise: float = 0.1  # TD3 acting: a = clip(tanh(μ(s)) + σ·ε, −1, 1)

    def errors(self) -> list[str | None]:
        errors = super().errors() + [positive_int(self, name) for name in (
            "diffusion_steps", "score_num_blocks", "score_hidden_dim", "td3_policy_delay")]
        errors += [non_negative(self, name) for name in (
            "kappa", "muon_lr", "muon_weight_decay", "alpha_lr", "target_entropy_multiplier", "score_lr",
            "td3_policy_noise", "td3_noise_clip", "td3_exploration_noise")]
        errors.append(in_interval(self, "muon_momentum", 0.0, 1.0))
        dims = self.scale_hidden_dims
        if not (isinstance(dims, (tuple, list)) and dims and all(isinstance(d, int) and d >= 1 for d in dims)):
            errors.append(f"scale_hidden_dims={dims!r}: must be a non-empty sequence of positive integers")
        if not (isinstance(self.time_dim, int) and self.time_dim >= 2 and self.time_dim % 2 == 0):
            errors.append(f"time_dim={self.time_dim!r}: must be an even integer >= 2 (cos and sin halves)")
        if not (isinstance(self.sac_alpha, (int, float)) and self.sac_alpha > 0):
            errors.append(f"sac_alpha={self.sac_alpha!r}: must be a number > 0 (α = exp(log α))")
        for name, allowed in (("online_learner", ONLINE_LEARNERS), ("optimizer", OPTIMIZERS),
                              ("muon_adjust_lr", ("match_rms_adamw", "original"))):
            if getattr(self, name) not in allowed:
                errors.append(f"{name}={getattr(self, name)!r}: must be one of {', '.join(allowed)}")
        return errors

    def __post_init__(self):
        if isinstance(self.scale_hidden_dims, list):
            object.__setattr__(self, "scale_hidden_dims", tuple(self.scale_hidden_dims))
        super().__post_init__()

    @property
    def target_entropy(self) -> float:
        return -self.target_entropy_multiplier * self.chunk_dim


# No published per-domain values: κ is the same on every domain.
PER_DOMAIN = per_domain_values("SMAC", "kappa", {domain: 1.0 for domain in DOMAIN_NAMES})


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------
class MemberCritics(nn.Module):
    """E independent critics Q_e(s, a), each an MLP (GELU, LayerNorm) of ``nn.Linear`` layers, so Muon sees each
    weight as the 2-D matrix it orthogonalises (the batched ``EnsembleCritic`` stores (E, in, out) kernels, which
    ``torch.optim.Muon`` rejects).  Outputs (E, *batch)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims, num_members: int, layer_norm: bool):
        super().__init__()
        self.members = nn.ModuleList(MLP(obs_dim + action_dim, hidden_dims, 1, layer_norm=layer_norm)
                                     for _ in range(num_members))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """Every member at the same actions; ``detach_params``: the critic as a constant (gradients reach the
        actions only, the SAC / TD3 actor losses)."""
        return self.per_member(obs, actions.expand(len(self.members), *actions.shape), detach_params)

    def per_member(self, obs: torch.Tensor, actions: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """Member e at actions[e] (E, …, D): the members share no input path, so ∇ of the sum over members w.r.t.
        ``actions`` holds each member's own ∇ₐQ_e in its slice."""
        outputs = []
        for member, member_actions in zip(self.members, actions):
            x = torch.cat((obs.expand(*member_actions.shape[:-1], obs.shape[-1]), member_actions), dim=-1)
            if detach_params:
                outputs.append(functional_call(member, {n: p.detach() for n, p in member.named_parameters()}, (x,)))
            else:
                outputs.append(member(x))
        return torch.stack(outputs).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------------
class SMACAgent(Agent):
    """``actor`` π(a|s) (tanh-Gaussian), ``critic`` (E members), ``scale`` α_ψ(s), ``temperature`` α, ``score_model``
    ε_ω(s, a, w, k) and the targets ``target_critic`` and ``target_actor`` (the latter read by TD3 online)."""

    name = "smac"
    Hyperparams = SMACHyperparams
    PER_DOMAIN = PER_DOMAIN
    TARGETS = {"target_critic": "critic", "target_actor": "actor"}
    DATASET_EXTRAS = ("returns_to_go",)

    def __init__(self, hp: SMACHyperparams):
        super().__init__(hp)
        s, d = hp.obs_dim, hp.chunk_dim
        self.actor = TanhGaussianEditPolicy(s, d, hp.actor_hidden_dims, condition_on_action=False)
        self.critic = MemberCritics(s, d, hp.value_hidden_dims, hp.num_qs, hp.value_layer_norm)
        self.scale = MLP(s, hp.scale_hidden_dims, 1)  # α_ψ(s) ∈ ℝ (absorbs ε's sign and 1/√(1−ᾱ_1))
        self.temperature = Temperature(hp.sac_alpha)
        # The RvS condition is [s, w]: IDQL's noise network with one more observation input.
        self.score_model = NoiseNetwork(s + 1, d, hp.score_hidden_dim, hp.score_num_blocks, hp.time_dim)
        self.register_buffer("alpha_hats", vp_schedule(hp.diffusion_steps)[2], persistent=False)  # derived from T
        self.make_targets()
        self.online_phase = False
        self.td3_updates = 0  # critic updates of the TD3 phase (a Python count: the delay branches on no tensor)
        self.actor_metrics: dict[str, torch.Tensor] = {}  # the last actor update's, logged on delayed updates too

    def acting_modules(self) -> tuple[str, ...]:
        return ("actor",)

    def begin_online_phase(self) -> None:
        """Plain SAC / TD3 from here on: L_SM and the score model's update stop; modules and optimisers stay."""
        self.online_phase = True

    @classmethod
    def search_space(cls, trial, method: str) -> dict:
        return {"kappa": trial.suggest_float("kappa", 0.01, 10.0, log=True),
                "lr": trial.suggest_float("lr", 1e-4, 1e-3, log=True),
                "muon_lr": trial.suggest_float("muon_lr", 1e-4, 3e-3, log=True),
                "sac_alpha": trial.suggest_float("sac_alpha", 0.01, 1.0, log=True)}

    # --- optimisers ------------------------------------------------------------------------------------
    def make_optimizers(self, betas=(0.9, 0.999), eps=1e-8) -> dict[str, torch.optim.Optimizer]:
        """Muon on the 2-D weights of actor, critic and α_ψ, Adam on their other parameters (``optimizer="adam"``:
        Adam on all of them); the temperature's and the score model's own Adams.  The same set in both phases, so
        the online phase continues every optimiser state."""
        hp = self.hp
        networks = [p for module in (self.actor, self.critic, self.scale) for p in module.parameters()]
        matrices = [p for p in networks if p.ndim == 2] if hp.optimizer == "muon" else []
        rest = [p for p in networks if all(p is not m for m in matrices)]
        optimizers = {"adam": make_adam(rest, hp.lr, betas, eps),
                      "alpha": make_adam(self.temperature.parameters(), hp.alpha_lr, betas, eps),
                      "score": make_adam(self.score_model.parameters(), hp.score_lr, betas, eps)}
        if matrices:
            optimizers["muon"] = torch.optim.Muon(matrices, lr=hp.muon_lr, weight_decay=hp.muon_weight_decay,
                                                  momentum=hp.muon_momentum, adjust_lr_fn=hp.muon_adjust_lr)
        return optimizers

    # --- draws and acting ------------------------------------------------------------------------------
    def draw_specs(self, batch_size: int) -> dict:
        hp, shape = self.hp, (batch_size, self.hp.chunk_dim)
        specs = {"next_eps": (NORMAL, shape),  # SAC: a′ ~ π(·|s′); TD3: the target smoothing noise
                 "actor_eps": (NORMAL, shape)}  # a_π ~ π(·|s) of the SAC actor loss
        if not self.online_phase:
            specs.update(sm_choice=(UNIFORM, (batch_size,)),  # B: a row takes the policy's action where < ½
                         sm_policy_eps=(NORMAL, shape), sm_uniform=(UNIFORM, shape),
                         ddpm_t=(hp.diffusion_steps, (batch_size,)), ddpm_noise=(NORMAL, shape))
        return specs

    def act_draw_specs(self, batch_size: int) -> dict:
        return {"eps": (NORMAL, (batch_size, self.hp.chunk_dim))}

    def sample(self, obs: torch.Tensor, eps: torch.Tensor, actor: nn.Module | None = None):
        """a = tanh(μ + σ·ε) ~ π(·|s) and log π(a|s) (reparameterised)."""
        _, actions, log_probs = tanh_gaussian_sample(*(actor or self.actor).heads(obs), eps)
        return actions, log_probs

    def deterministic(self, obs: torch.Tensor, actor: nn.Module | None = None) -> torch.Tensor:
        """TD3's policy tanh(μ(s))."""
        return torch.tanh((actor or self.actor).heads(obs)[0])

    def act(self, obs, draws, intermediates=None) -> torch.Tensor:
        """The stochastic SAC policy; with ``online_learner="td3"`` TD3's exploration clip(tanh(μ) + σ·ε, −1, 1) (in
        both phases: the acting modules on EnvRunners never see the phase)."""
        with torch.no_grad():
            if self.hp.online_learner == "td3":
                return (self.deterministic(obs) + self.hp.td3_exploration_noise * draws["eps"]).clamp(-1.0, 1.0)
            return self.sample(obs, draws["eps"])[0]

    # --- losses ------------------------------------------------------------------------------------------
    def score_condition(self, obs: torch.Tensor, returns_to_go: torch.Tensor) -> torch.Tensor:
        """[s, w] with w = (1 − γ)·G: the return-to-go on the per-step reward scale."""
        return torch.cat((obs, ((1.0 - self.hp.discount) * returns_to_go)[:, None]), dim=-1)

    def mixed_actions(self, obs: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """B(A): per row, with probability ½ the current policy's action (constant), otherwise Uniform[−1, 1]^D."""
        with torch.no_grad():
            policy_actions = self.sample(obs, draws["sm_policy_eps"])[0]
        uniform_actions = 2.0 * draws["sm_uniform"] - 1.0
        return torch.where((draws["sm_choice"] < 0.5)[:, None], policy_actions, uniform_actions)

    def action_gradients(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """∇ₐQ_e(s, a) of every member (E, B, D), differentiable in the critic's parameters (double backward)."""
        per_member = actions.detach().expand(len(self.critic.members), *actions.shape).clone().requires_grad_(True)
        qs = self.critic.per_member(obs, per_member)
        (grads,) = torch.autograd.grad(qs.sum(), per_member, create_graph=True)
        return grads

    # Eager under ``compile_losses``: AOTAutograd has no double backward, so torch.compile runs the rest of
    # ``losses`` compiled and this part as it is.
    @torch.compiler.disable
    def score_matching_loss(self, obs, actions, condition) -> tuple[torch.Tensor, dict]:
        """L_SM = mean_{B,E} ‖∇ₐQ_e(s, a) − α_ψ(s)·sg[ε_ω(s, a, w, 1)]‖² (the gradient reaches critic and α_ψ)."""
        with torch.no_grad():  # the score model is a fixed estimate here: its own loss trains it
            first_step = torch.zeros(actions.shape[0], 1, device=actions.device, dtype=actions.dtype)
            eps_pred = self.score_model(condition, actions, first_step)
        grads = self.action_gradients(obs, actions)
        scale = self.scale(obs)  # (B, 1)
        loss = (grads - scale * eps_pred).square().sum(-1).mean()
        metrics = {"sm_loss": loss.detach(), "scale_mean": scale.detach().mean(),
                   "grad_q_norm": grads.detach().norm(dim=-1).mean(), "score_eps_norm": eps_pred.norm(dim=-1).mean()}
        return loss, metrics

    def losses(self, batch, draws, update_actor: bool = True) -> Losses:
        """Every loss term of one update at the current parameters (phase and learner from ``begin_online_phase`` and
        ``online_learner``); ``update_actor=False``: TD3's delayed step without the actor loss."""
        hp, step = self.hp, chunk_step(batch)
        td3 = self.online_phase and hp.online_learner == "td3"
        alpha = self.temperature()

        # TD target: SAC's soft value of a′ ~ π(·|s′), or TD3's smoothed target policy; the minimum over members.
        with torch.no_grad():
            if td3:
                noise = (hp.td3_policy_noise * draws["next_eps"]).clamp(-hp.td3_noise_clip, hp.td3_noise_clip)
                next_actions = (self.deterministic(step.next_obs, self.target_actor) + noise).clamp(-1.0, 1.0)
                next_v = self.target_critic(step.next_obs, next_actions).min(0).values
            else:
                next_actions, next_log_probs = self.sample(step.next_obs, draws["next_eps"])
                next_v = self.target_critic(step.next_obs, next_actions).min(0).values - alpha * next_log_probs
            target_q = td_target(step, next_v, hp.discount, hp.horizon_length)
        critic_q = self.critic(step.obs, step.actions)
        td_loss = critic_td_loss(critic_q, target_q, step.valid)
        terms = {"td": td_loss}
        metrics = {"td_loss": td_loss.detach(), "q_mean": critic_q.detach().mean(), "target_q": target_q.mean()}

        if not self.online_phase:  # SMAC's offline additions: the score model and κ·L_SM
            condition = self.score_condition(step.obs, batch["returns_to_go"])
            score_loss, _ = ddpm_noise_loss(self.score_model, condition, step.actions, draws["ddpm_t"],
                                            draws["ddpm_noise"], self.alpha_hats, step.valid)
            sm_loss, sm_metrics = self.score_matching_loss(step.obs, self.mixed_actions(step.obs, draws), condition)
            terms.update(score=score_loss, sm=hp.kappa * sm_loss)
            metrics.update(score_loss=score_loss.detach(), **sm_metrics)

        if update_actor:
            if td3:  # −Q_1(s, tanh μ(s)): TD3's first critic, a constant
                actor_loss = -self.critic(step.obs, self.deterministic(step.obs), detach_params=True)[0].mean()
                terms["actor"] = actor_loss
                metrics["actor_loss"] = actor_loss.detach()
            else:
                actions, log_probs = self.sample(step.obs, draws["actor_eps"])
                q = self.critic(step.obs, actions, detach_params=True).min(0).values
                actor_loss = (alpha.detach() * log_probs - q).mean()
                entropy = -log_probs.detach().mean()
                alpha_loss = alpha * (entropy - hp.target_entropy)  # α grows while H is below its target
                terms.update(actor=actor_loss, alpha=alpha_loss)
                metrics.update(actor_loss=actor_loss.detach(), entropy=entropy, alpha_loss=alpha_loss.detach(),
                               alpha=alpha.detach())
        total = sum(terms.values())
        return Losses(total, terms, metrics, {"target_q": target_q, "critic_q": critic_q.detach()})

    # --- update --------------------------------------------------------------------------------------------
    def update(self, optimizers, batch, draws, on_raw_gradients=None):
        """One joint backward of every term (each reaches only its own module), then every optimiser steps the
        parameters it reached; Polyak after the step.  TD3 online: the actor and the targets every
        ``td3_policy_delay``-th update only (the actor gets no gradient in between, and Muon / Adam skip it)."""
        td3 = self.online_phase and self.hp.online_learner == "td3"
        update_actor = not td3 or self.td3_updates % self.hp.td3_policy_delay == 0
        losses = self.losses(batch, draws, update_actor)
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        if on_raw_gradients is not None:
            on_raw_gradients()
        for optimizer in optimizers.values():
            optimizer.step()
        if update_actor:
            polyak_update_(*self.target_pairs(), self.hp.tau)
            self.actor_metrics = {k: v for k, v in losses.metrics.items()
                                  if k in ("actor_loss", "entropy", "alpha_loss", "alpha")}
        if td3:
            self.td3_updates += 1
        total = sum(term.detach() for term in losses.terms.values())
        return {**losses.metrics, **self.actor_metrics, "total_loss": total}, losses.intermediates

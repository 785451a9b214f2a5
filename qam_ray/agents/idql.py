"""IDQL: implicit Q-learning with a diffusion behaviour policy, as the official learner computes it
(``philippe-eecs/IDQL@7582571``, ``jaxrl5/agents/ddpm_iql_simple/ddpm_iql_learner.py``, class ``DDPMIQLLearner``).
Fixture document: FIXTURE_FORMAT_IDQL.md (``idql_small``; the update §6, the acting path §8).

An IQL critic re-read as an actor-critic: an expectile value V_ψ(s) regresses the **minimum** of two target critics
at the dataset action, the critics regress r + γ·m·V_ψ(s′), and a DDPM ε_θ (an LN-ResNet with learnable Fourier
time features, VP schedule, T = 5) clones the behaviour policy μ.  The policy is implicit, π(a|s) ∝ μ(a|s)·w(s, a):
draw N candidates from the EMA copy of ε_θ and take the one the target critics' minimum ranks highest (``argmax``,
the official extraction), or resample them with the paper's expectile weights (``expectile``).

Unlike the QAM-repository agents, one update is three sub-updates with their own optimisers, in the official order
actor → value → critic (the TD target uses the value net *after* its step), and both targets (the actor EMA and the
target critic) are averaged from the **post-step** online parameters (§13).

On OGBench the policy and critics work on action chunks of the domain's length H (the fixtures are single-step,
H = 1) and the TD target bootstraps with γ^H, like every other method here; a chunk that crossed an episode end is
masked out of the TD and behaviour-cloning losses (``valid``), as in the QAM repository's agents.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from qam_ray.agents.base import NORMAL, UNIFORM, Agent, AgentHyperparams, Losses, in_interval, per_domain_values, \
    positive_int
from qam_ray.agents.ifql import PER_DOMAIN as IFQL_PER_DOMAIN
from qam_ray.core.flow import ddpm_sample, vp_schedule
from qam_ray.core.losses import chunk_step, critic_td_loss, ddpm_noise_loss, expectile_loss, td_target
from qam_ray.core.networks import LAYER_NORM_EPS, MLP, EnsembleCritic, NoiseNetwork, xavier_uniform_
from qam_ray.core.optim import cosine_decay_lr, make_adam, make_adamw, optimizer_step, polyak_update_

EXTRACTIONS = ("argmax", "expectile")


# --------------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class IDQLHyperparams(AgentHyperparams):
    """The official ``create()`` defaults and launcher values; τ per domain from PER_DOMAIN.  Of the common fields,
    ``lr`` is the learning rate of all three optimisers (the official actor_lr = value_lr = critic_lr = 3e-4),
    ``value_hidden_dims`` sizes the critic and the value net (the official critic_hidden_dims), ``tau`` is the
    target critic's Polyak rate; ``actor_hidden_dims``, ``flow_steps`` and ``rho`` are not used (the actor is the
    LN-ResNet below, the sampler has T steps, the critics are combined by their minimum)."""

    value_hidden_dims: tuple[int, ...] = (256, 256)  # critic and value MLPs, ReLU
    num_qs: int = 2  # critic ensemble E, combined by the minimum
    value_layer_norm: bool = True  # one LayerNorm on the value net's *input* (official value_layer_norm=True)
    expectile: float = 0.7  # τ of the value regression (official critic_hyperparam; 0.7 locomotion, 0.9 antmaze)
    diffusion_steps: int = 5  # T of the VP schedule (official T = 5)
    num_samples: int = 64  # N candidates at acting time (official training-time N = 64)
    extraction: str = "argmax"  # "argmax" (official eval_actions) or "expectile" resampling (the paper's weights)
    actor_num_blocks: int = 3  # LN-ResNet blocks
    actor_hidden_dim: int = 256  # LN-ResNet width (hard-wired to 256 in the official code)
    time_dim: int = 128  # Fourier time features; the conditioning MLP is (2·time_dim, 2·time_dim)
    actor_dropout_rate: float = 0.1  # inverted dropout on each block's input in training (paper launcher 0.1)
    actor_tau: float = 0.001  # EMA rate of the acting copy of ε_θ
    actor_weight_decay: float = 1e-4  # AdamW λ on every actor parameter (optax's default, unmasked)
    decay_steps: int = 3_000_000  # D of the actor's cosine learning-rate decay (official launcher 3e6)

    def errors(self) -> list[str | None]:
        errors = super().errors() + [positive_int(self, name) for name in (
            "diffusion_steps", "num_samples", "actor_num_blocks", "actor_hidden_dim", "decay_steps")]
        errors += [in_interval(self, "expectile", 0.0, 1.0), in_interval(self, "actor_tau", 0.0, 1.0, low_open=True),
                   in_interval(self, "actor_weight_decay", 0.0, 1.0)]
        dropout = self.actor_dropout_rate
        if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0):
            errors.append(f"actor_dropout_rate={dropout!r}: must be in [0, 1)")
        if not (isinstance(self.time_dim, int) and self.time_dim >= 2 and self.time_dim % 2 == 0):
            errors.append(f"time_dim={self.time_dim!r}: must be an even integer >= 2 (cos and sin halves)")
        if self.extraction not in EXTRACTIONS:
            errors.append(f"extraction={self.extraction!r}: must be one of {', '.join(EXTRACTIONS)}")
        return errors


# Per-domain expectile τ: the QAM paper's IFQL κ (QAM_SPEC.md §10), the same IQL value regression.
PER_DOMAIN = per_domain_values("IDQL", "expectile", {
    domain: values["kappa"] for domain, values in IFQL_PER_DOMAIN["IFQL"].items()})


# --------------------------------------------------------------------------------------------------
# Networks (FIXTURE_FORMAT_IDQL.md §2); the LN-ResNet noise network is core.networks.NoiseNetwork
# --------------------------------------------------------------------------------------------------
class TwinCritic(EnsembleCritic):
    """Q_φ(s, a), an ensemble of ReLU MLPs without LayerNorm (the last hidden layer activated), in the official
    tree ``VmapStateActionValue_0/{MLP_0/Dense_i, Dense_0}``."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims, num_members: int):
        super().__init__(obs_dim, action_dim, hidden_dims, num_members, layer_norm=False, activation=F.relu)
        last = len(hidden_dims)
        layer = {i: f"MLP_0.Dense_{i}" for i in range(last)} | {last: "Dense_0"}
        self.FLAX_NAMES = {f"{ours}.{i}": f"{layer[i]}.{leaf}" for i in layer
                           for ours, leaf in (("kernels", "kernel"), ("biases", "bias"))}


class InputNormValueNet(nn.Module):
    """V_ψ(s): LayerNorm on the raw observation (once), ReLU MLP, linear output; no LayerNorm between layers."""

    FLAX_NAMES = {"input_norm": "MLP_0.LayerNorm_0", "hidden": "MLP_0", "output": "OutputVDense"}

    def __init__(self, obs_dim: int, hidden_dims, input_layer_norm: bool):
        super().__init__()
        self.input_norm = nn.LayerNorm(obs_dim, eps=LAYER_NORM_EPS) if input_layer_norm else nn.Identity()
        self.hidden = MLP(obs_dim, hidden_dims, out_dim=None, activation=F.relu)
        self.output = nn.Linear(hidden_dims[-1], 1)
        xavier_uniform_(self.output.weight, hidden_dims[-1], 1)
        nn.init.zeros_(self.output.bias)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(self.input_norm(obs))).squeeze(-1)


class IDQLAgent(Agent):
    name = "idql"
    Hyperparams = IDQLHyperparams
    PER_DOMAIN = PER_DOMAIN
    TARGETS = {"target_score_model": "score_model", "target_critic": "critic"}
    FIXTURE_FORMAT = "idql"
    # Settings every IDQL fixture fixes and our port implements at that value only (FIXTURE_FORMAT_IDQL.md §1).
    FIXTURE_FIXED_FLAGS = {
        "beta_schedule": "vp", "vp_b_min": 0.1, "vp_b_max": 10.0, "M_repeat_last_step": 0, "clip_sampler": True,
        "ddpm_temperature": 1.0, "actor_block_expansion": 4, "actor_layer_norm": True, "fourier_learnable": True,
        "critic_layer_norm": False, "layer_norm_eps": 1e-6, "adam_eps_root": 0.0, "clip_grad": False,
        "actor_lr": 3e-4, "value_lr": 3e-4, "critic_lr": 3e-4, "step2_uses_same_batch": True}
    FIXTURE_CONFIG_NAMES = {"diffusion_steps": "T", "num_samples": "N"}
    FIXTURE_UNOFFICIAL_METRICS = ("total_loss",)
    LOSS_FUNCTIONS = ("actor_losses", "value_losses", "critic_losses")  # one per optimiser step of `update`

    def __init__(self, hp: IDQLHyperparams):
        super().__init__(hp)
        s, d = hp.obs_dim, hp.chunk_dim
        self.score_model = NoiseNetwork(s, d, hp.actor_hidden_dim, hp.actor_num_blocks, hp.time_dim)  # ε_θ
        self.critic = TwinCritic(s, d, hp.value_hidden_dims, hp.num_qs)
        self.value = InputNormValueNet(s, hp.value_hidden_dims, hp.value_layer_norm)
        for name, values in zip(("betas", "alphas", "alpha_hats"), vp_schedule(hp.diffusion_steps)):
            self.register_buffer(name, values, persistent=False)  # derived from T: not a checkpointed state
        self.make_targets()

    def acting_modules(self) -> tuple[str, ...]:
        return ("target_score_model", "target_critic", "value")

    @classmethod
    def search_space(cls, trial, method: str) -> dict:
        return {"expectile": trial.suggest_float("expectile", 0.6, 0.99),
                "num_samples": trial.suggest_categorical("num_samples", [16, 64, 256]),  # the official eval sweep
                "extraction": trial.suggest_categorical("extraction", list(EXTRACTIONS))}

    # ----------------------------------------------------------------------------------------------
    # Random draws (§7): the update draws t and ε (and dropout masks); acting draws x_T, z and the resampling u
    # ----------------------------------------------------------------------------------------------
    def draw_specs(self, batch_size: int) -> dict:
        hp = self.hp
        specs = {"ddpm_t": (hp.diffusion_steps, (batch_size,)), "ddpm_noise": (NORMAL, (batch_size, hp.chunk_dim))}
        if hp.actor_dropout_rate > 0:  # (the fixtures use rate 0 and draw no mask)
            specs["ddpm_dropout"] = (UNIFORM, (hp.actor_num_blocks, batch_size, hp.actor_hidden_dim))
        return specs

    def act_draw_specs(self, batch_size: int) -> dict:
        hp = self.hp
        shape = (batch_size, hp.num_samples, hp.chunk_dim)
        specs = {"init_noise": (NORMAL, shape), "step_noise": (NORMAL, (batch_size, hp.diffusion_steps, *shape[1:]))}
        if hp.extraction == "expectile":
            specs["resample_uniform"] = (UNIFORM, (batch_size,))
        return specs

    # ----------------------------------------------------------------------------------------------
    # Acting (§8): N candidates for every observation of a batch in one diffusion pass
    # ----------------------------------------------------------------------------------------------
    def act(self, obs, draws, intermediates=None) -> torch.Tensor:
        # The official eval_actions takes one observation (§13); this is the same computation for every row at once.
        hp, record = self.hp, ({} if intermediates is not None else None)
        with torch.no_grad():
            candidates = ddpm_sample(self.target_score_model, obs[:, None], draws["init_noise"],
                                     draws["step_noise"].transpose(0, 1), self.betas, self.alphas, self.alpha_hats,
                                     record).clamp(-1.0, 1.0)
            candidate_qs = self.target_critic(obs[:, None], candidates)  # (E, B, N), the *target* critics
            q_min = candidate_qs.min(0).values
            implicit_v, implicit_adv, implicit_weights, implicit_probs = self.implicit_policy(obs, q_min)
            if hp.extraction == "argmax":
                index = q_min.argmax(1)  # ties: the first index, as jnp.argmax
            else:  # inverse-CDF draw from the implicit policy over the candidates
                below = implicit_probs.cumsum(1) < draws["resample_uniform"][:, None]
                index = below.sum(1).clamp(max=hp.num_samples - 1)
            actions = candidates[torch.arange(obs.shape[0], device=obs.device), index]
        if intermediates is not None:  # in the fixture's per-observation layout
            intermediates.update({
                "act/times": record["times"], "act/xs": record["xs"].transpose(0, 1),
                "act/xs_unclipped": record["xs_unclipped"].transpose(0, 1),
                "act/eps_pred": record["eps_pred"].transpose(0, 1), "act/candidates": candidates,
                "act/candidate_qs": candidate_qs.transpose(0, 1), "act/candidate_q_min": q_min,
                "act/chosen_index": index.float(), "act/actions": actions, "act/implicit_v": implicit_v,
                "act/implicit_adv": implicit_adv, "act/implicit_weights": implicit_weights,
                "act/implicit_probs": implicit_probs})
        return actions

    def implicit_policy(self, obs: torch.Tensor, q_min: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The paper's implicit actor over the candidates (§8.3): π ∝ μ·w with w = |f′(u)|/|u| for the expectile
        loss f, i.e. w = τ where u = Q − V ≥ 0, else 1 − τ, normalised over the N candidates.
        Returns (V, u, w, p)."""
        v = self.value(obs)
        adv = q_min - v[:, None]
        weights = torch.where(adv >= 0, self.hp.expectile, 1.0 - self.hp.expectile)
        return v, adv, weights, weights / weights.sum(1, keepdim=True)

    # ----------------------------------------------------------------------------------------------
    # Losses (§6): each sub-update's loss at the current parameters
    # ----------------------------------------------------------------------------------------------
    def actor_losses(self, batch, draws) -> Losses:
        """Step 1: DDPM ε-prediction behaviour cloning of ε_θ (online, with dropout when the rate is > 0)."""
        hp, step = self.hp, chunk_step(batch)
        keep = None
        if hp.actor_dropout_rate > 0:  # inverted dropout: kept units scaled by 1/(1 − p)
            keep_prob = 1.0 - hp.actor_dropout_rate
            keep = (draws["ddpm_dropout"] < keep_prob).to(step.obs.dtype) / keep_prob
        loss, inter = ddpm_noise_loss(self.score_model, step.obs, step.actions, draws["ddpm_t"], draws["ddpm_noise"],
                                      self.alpha_hats, step.valid, keep)
        metrics = {"actor_loss": loss.detach()}
        return Losses(loss, {"actor": loss}, metrics, {**inter, "actor_loss": loss.detach()})

    def value_losses(self, batch) -> Losses:
        """Step 2: expectile regression of V_ψ on the target critics' minimum at the dataset action (no mask)."""
        step = chunk_step(batch)
        with torch.no_grad():
            value_target_qs = self.target_critic(step.obs, step.actions)
            value_target_q = value_target_qs.min(0).values  # the minimum, not a mean or mean − ρ·std
        v_pred = self.value(step.obs)
        value_adv = value_target_q - v_pred
        loss, value_weight = expectile_loss(value_adv, self.hp.expectile, zero_weight_expectile=False)
        metrics = {"value_loss": loss.detach(), "v": v_pred.detach().mean()}
        inter = {"value_target_qs": value_target_qs, "value_target_q": value_target_q, "v_pred": v_pred.detach(),
                 "value_adv": value_adv.detach(), "value_weight": value_weight, "value_loss": loss.detach()}
        return Losses(loss, {"value": loss}, metrics, inter)

    def critic_losses(self, batch) -> Losses:
        """Step 3: TD regression of both critics on r + γ^H·m·V_ψ(s′), with the value net as it is now (after its
        step in ``update``); the mean over ensemble and batch."""
        hp, step = self.hp, chunk_step(batch)
        with torch.no_grad():
            next_v = self.value(step.next_obs)
            target_q = td_target(step, next_v, hp.discount, hp.horizon_length)
        critic_q = self.critic(step.obs, step.actions)
        loss = critic_td_loss(critic_q, target_q, step.valid)
        metrics = {"critic_loss": loss.detach(), "q": critic_q.detach().mean()}
        inter = {"next_v": next_v, "target_q": target_q, "critic_q": critic_q.detach(), "critic_loss": loss.detach()}
        return Losses(loss, {"critic": loss}, metrics, inter)

    def losses(self, batch, draws) -> Losses:
        """The three losses at the current parameters (``update`` steps each after the previous one's step)."""
        parts = (self.actor_losses(batch, draws), self.value_losses(batch), self.critic_losses(batch))
        merge = lambda field: {k: v for part in parts for k, v in getattr(part, field).items()}  # noqa: E731
        return Losses(sum(part.total for part in parts), merge("terms"), merge("metrics"), merge("intermediates"))

    # ----------------------------------------------------------------------------------------------
    # Optimisation (§6.4): three optimisers stepped in turn, targets averaged from the post-step parameters
    # ----------------------------------------------------------------------------------------------
    def make_optimizers(self, betas=(0.9, 0.999), eps=1e-8) -> dict[str, torch.optim.Optimizer]:
        hp = self.hp
        actor = make_adamw(self.score_model.parameters(), hp.lr, hp.actor_weight_decay, betas, eps)
        # The cosine schedule's count lives in the param group, so it is checkpointed with the optimiser.
        actor.param_groups[0]["schedule_count"] = 0
        return {"actor": actor, "value": make_adam(self.value.parameters(), hp.lr, betas, eps),
                "critic": make_adam(self.critic.parameters(), hp.lr, betas, eps)}

    def update(self, optimizers, batch, draws, on_raw_gradients=None):
        hp = self.hp
        # Step 1: actor, AdamW at the cosine lr of the pre-increment count, then the EMA from the new ε_θ.
        group = optimizers["actor"].param_groups[0]
        group["lr"] = actor_lr = cosine_decay_lr(hp.lr, group["schedule_count"], hp.decay_steps)
        group["schedule_count"] += 1
        actor = self.actor_losses(batch, draws)
        optimizer_step(optimizers["actor"], actor.total, on_raw_gradients)
        self.average_target("target_score_model", hp.actor_tau)
        # Step 2: value, against the target critics as they stand at the start of this update.
        value = self.value_losses(batch)
        optimizer_step(optimizers["value"], value.total, on_raw_gradients)
        # Step 3: critic, bootstrapping from the value net just updated; then Polyak from the new critic.
        critic = self.critic_losses(batch)
        optimizer_step(optimizers["critic"], critic.total, on_raw_gradients)
        self.average_target("target_critic", hp.tau)
        inter = {**actor.intermediates, **value.intermediates, **critic.intermediates,
                 "actor_lr": torch.tensor(actor_lr), "schedule/betas": self.betas, "schedule/alphas": self.alphas,
                 "schedule/alpha_hats": self.alpha_hats}
        # total_loss: the sum of the three losses (each at its own pre-step parameters), the progress metric every
        # agent logs; the official code logs only the three.
        total = (actor.total + value.total + critic.total).detach()
        return {**actor.metrics, **value.metrics, **critic.metrics, "total_loss": total}, inter

    def average_target(self, target: str, rate: float) -> None:
        polyak_update_(list(getattr(self, target).parameters()),
                       list(getattr(self, self.TARGETS[target]).parameters()), rate)

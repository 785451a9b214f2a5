"""SAC Flow (Zhang et al., ICLR 2026): a flow policy trained end to end with SAC, offline-to-online track, as the
official ``Elessar123/SAC-FLOW@3df8b9d`` agents
``offline-to-online/agents/acfql_{gru,transformer}_ablation_online_sac.py`` compute it.  Fixture document:
FIXTURE_FORMAT_SACFLOW.md (``sacflow_g_small``: Flow-G, ``sacflow_t_small``: Flow-T).

The K-step Euler rollout of a velocity field is a residual recurrence, so the velocity is re-parameterised like a
recurrent cell: **Flow-G** gates it like a GRU, v = σ(gate) ⊙ (candidate − x); **Flow-T** decodes it from one
action-time token that attends to a state token (``naive``, the paper's ablation: a plain MLP velocity, FQL's
``VelocityField``).  Every Euler step is made Gaussian (noise σ·ε in state space), so
the tanh-squashed sample a = tanh(x_K) has a log-likelihood and SAC applies:

    y   = r + γ^H·m·(mean_E Q_target(s′, a′) − α·log π(a′|s′)),   a′ rolled out with σ_inf
    L_Q = mean_{E·B} (Q(s, a_D) − y)²·v
    L_π = alpha·mean (a_π − a_D)² − mean_B (mean_E Q(s, a_π) − α·log π(a_π|s)),   a_π rolled out with σ_on
    L_α = α·(mean_B log π(a_π|s) − target_entropy)

The offline phase runs, on every batch, the official ``update`` (flow-matching BC + critic) and then
``online_update`` (the SAC update above); the online phase runs ``online_update`` only.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from qam_ray.agents.base import (NORMAL, QAM_REPO_FIXED_FLAGS, UNIFORM, Agent, AgentHyperparams, Losses, non_negative,
                                 positive_int)
from qam_ray.core.flow import VelocityFn, time_grid
from qam_ray.core.losses import chunk_step, critic_td_loss, stats, td_target
from qam_ray.core.networks import (LAYER_NORM_EPS, MLP, EnsembleCritic, Temperature, VelocityField, gelu,
                                   lecun_normal_)
from qam_ray.core.optim import joint_step, make_adam
from qam_ray.domains import DOMAIN_NAMES

VARIANTS = ("Flow-G", "Flow-T", "naive")  # "naive": a plain MLP velocity, the paper's "naive SAC Flow" ablation
TANH_LOGPROB_EPS = 1e-6  # inside log(1 − tanh² + 1e-6) of the official Jacobian (§5)


# --------------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SACFlowHyperparams(AgentHyperparams):
    """The official offline-to-online defaults (SEED_METHODS §2.4; FIXTURE_FORMAT_SACFLOW §1).  ``rho`` is unused:
    the TD target aggregates the ensemble by ``q_agg``."""

    variant: str = "Flow-G"  # velocity network: "Flow-G" (gated), "Flow-T" (decoded) or "naive" (plain MLP)
    num_qs: int = 2  # critic ensemble size E
    flow_steps: int = 4  # K: Euler steps of every rollout (official `denoising_steps`; its `flow_steps` is unused)
    q_agg: str = "mean"  # how the TD target aggregates the target ensemble: "mean" or "min" (the actor always means)
    alpha: float = 100.0  # weight of the action-regularisation (BC) term of the actor loss; NOT the SAC temperature
    sac_alpha: float = 0.2  # initial SAC temperature α (stored as log α), autotuned
    alpha_lr: float = 3e-4  # Adam learning rate of log α
    target_entropy: float = 0.0  # the official −D·0
    online_noise_std: float = 0.05  # σ_on: rollout noise of the actor loss
    inference_noise_std: float = 0.02  # σ_inf: rollout noise of the TD target and of acting
    gate_hidden_dim: int = 256  # Flow-G: width of the gate's hidden layer (hard-coded 256 in the official network)
    transformer_d_model: int = 128  # Flow-T: token width d (a multiple of 4 and of the head count)
    transformer_n_head: int = 4  # Flow-T: attention heads h
    transformer_n_layers: int = 2  # Flow-T: decoder layers L

    def errors(self) -> list[str | None]:
        errors = super().errors() + velocity_policy_errors(self)
        errors += [non_negative(self, name) for name in
                   ("alpha", "alpha_lr", "online_noise_std", "inference_noise_std")]
        if self.q_agg not in ("mean", "min"):
            errors.append(f"q_agg={self.q_agg!r}: must be 'mean' or 'min'")
        return errors


def velocity_policy_errors(hp) -> list[str | None]:
    """The checks every SAC Flow track shares: the velocity network's sizes and variant, the initial temperature."""
    errors = [positive_int(hp, name) for name in
              ("gate_hidden_dim", "transformer_d_model", "transformer_n_head", "transformer_n_layers")]
    if hp.variant not in VARIANTS:
        errors.append(f"variant={hp.variant!r}: must be one of {', '.join(VARIANTS)}")
    if not (isinstance(hp.sac_alpha, (int, float)) and 0 < hp.sac_alpha < math.inf):
        errors.append(f"sac_alpha={hp.sac_alpha!r}: must be a finite number > 0 (it is stored as log α)")
    d, h = hp.transformer_d_model, hp.transformer_n_head
    if isinstance(d, int) and isinstance(h, int) and h > 0 and (d % 4 or d % h):
        errors.append(f"transformer_d_model={d!r}: must be a multiple of 4 and of transformer_n_head={h!r}")
    return errors


# The official scripts tune the BC weight per environment but publish no per-domain table (SEED_METHODS §2.4):
# every paper domain gets the defaults; the method label picks the velocity network.
PER_DOMAIN = {method: {domain: {"variant": variant} for domain in DOMAIN_NAMES}
              for method, variant in (("SAC-Flow-G", "Flow-G"), ("SAC-Flow-T", "Flow-T"), ("SAC-Flow-naive", "naive"))}


# --------------------------------------------------------------------------------------------------
# Networks (§4)
# --------------------------------------------------------------------------------------------------
def dense(in_dim: int, out_dim: int) -> nn.Linear:
    """A flax ``nn.Dense`` with its default init: truncated lecun-normal kernel, zero bias (§2.4)."""
    layer = nn.Linear(in_dim, out_dim)
    lecun_normal_(layer.weight, in_dim)
    nn.init.zeros_(layer.bias)
    return layer


class GatedVelocityField(nn.Module):
    """Flow-G (§4.1, ``ActorVectorFieldGRU``): u = [s, x, t]; candidate c = MLP(u) (xavier, GELU hidden layers);
    gate z = sigmoid(W₂·swish(W₁u + b₁) + b₂) with W₂ = 0, b₂ = 5 at init, so z ≈ 0.993; v = z ⊙ (c − x)."""

    GATE_BIAS_INIT = 5.0
    FLAX_NAMES = {"candidate": "mlp", "gate_hidden": "gate_net.layers_0", "gate_out": "gate_net.layers_2"}

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims, gate_hidden_dim: int):
        super().__init__()
        in_dim = obs_dim + action_dim + 1
        self.candidate = MLP(in_dim, hidden_dims, action_dim)
        self.gate_hidden = dense(in_dim, gate_hidden_dim)
        self.gate_out = nn.Linear(gate_hidden_dim, action_dim)
        nn.init.zeros_(self.gate_out.weight)
        nn.init.constant_(self.gate_out.bias, self.GATE_BIAS_INIT)

    def forward(self, obs, x, t, parts: dict | None = None) -> torch.Tensor:
        u = torch.cat((obs.expand(*x.shape[:-1], obs.shape[-1]), x, t.expand(*x.shape[:-1], 1)), dim=-1)
        candidate = self.candidate(u)
        gate_logits = self.gate_out(F.silu(self.gate_hidden(u)))
        gate = torch.sigmoid(gate_logits)
        velocity = gate * (candidate - x)
        if parts is not None:
            parts.update(candidate=candidate, gate_logits=gate_logits, gate=gate, out=velocity)
        return velocity


class Attention(nn.Module):
    """Multi-head attention with biased projections: softmax(QKᵀ/√(d/h))·V, heads concatenated, out_proj."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, dense(d_model, d_model))

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """``query`` (..., Lq, d) attends to ``memory`` (..., Lk, d)."""
        heads = lambda y: y.unflatten(-1, (self.n_head, -1)).transpose(-3, -2)  # noqa: E731  (..., h, L, d/h)
        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(memory)), heads(self.v_proj(memory))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.out_proj((weights @ v).transpose(-3, -2).flatten(-2))


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention, cross-attention to the state token, 4× GELU feed-forward, each
    followed by residual + LayerNorm (eps 1e-6)."""

    FLAX_NAMES = {"self_norm": "LayerNorm_0", "cross_norm": "LayerNorm_1", "ff_norm": "LayerNorm_2",
                  "ff_in": "Dense_0", "ff_out": "Dense_1"}

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.self_attn = Attention(d_model, n_head)
        self.self_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.cross_attn = Attention(d_model, n_head)
        self.cross_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.ff_in = dense(d_model, 4 * d_model)
        self.ff_out = dense(4 * d_model, d_model)
        self.ff_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)

    def forward(self, token, state_token, parts: dict | None = None):
        # One token per row: the official additive "diagonal" mask of a length-1 sequence is [[0]], a no-op (§4.2).
        self_out = self.self_attn(token, token)
        token = self.self_norm(token + self_out)
        cross_out = self.cross_attn(token, state_token)
        token = self.cross_norm(token + cross_out)
        token = self.ff_norm(token + self.ff_out(gelu(self.ff_in(token))))
        if parts is not None:
            for name, value in (("self_attn_out", self_out), ("cross_attn_out", cross_out), ("layer_outputs", token)):
                parts.setdefault(name, []).append(value.squeeze(-2))
        return token


class DecodedVelocityField(nn.Module):
    """Flow-T (§4.2, ``FlowMatchingTransformerActor``): state token m = Dense(swish(Dense(s))); action-time token
    e = action_proj(x) + time MLP(t) (1 → d/4 → d/2 → d, swish); L decoder layers; v = velocity_head(e).  Each row is
    its own length-1 sequence, so every attention weight is 1 and q_proj / k_proj never receive gradient."""

    def __init__(self, obs_dim: int, action_dim: int, d_model: int, n_head: int, n_layers: int):
        super().__init__()
        d = d_model
        self.state_hidden = dense(obs_dim, d // 2)
        self.state_out = dense(d // 2, d)
        self.action_proj = dense(action_dim, d)
        self.time_hidden = dense(1, d // 4)
        self.time_mid = dense(d // 4, d // 2)
        self.time_out = dense(d // 2, d)
        self.layers = nn.ModuleList(DecoderLayer(d, n_head) for _ in range(n_layers))
        self.velocity_head = dense(d, action_dim)
        self.FLAX_NAMES = {"state_hidden": "Dense_0", "state_out": "Dense_1", "time_hidden": "Dense_2",
                           "time_mid": "Dense_3", "time_out": "Dense_4",
                           **{f"layers.{i}": f"layer_{i}" for i in range(n_layers)}}

    def forward(self, obs, x, t, parts: dict | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        state_token = self.state_out(F.silu(self.state_hidden(obs.expand(*lead, obs.shape[-1]))))
        action_emb = self.action_proj(x)
        time_emb = self.time_out(F.silu(self.time_mid(F.silu(self.time_hidden(t.expand(*lead, 1))))))
        token = (action_emb + time_emb).unsqueeze(-2)  # (..., 1, d): one token per row
        memory = state_token.unsqueeze(-2)
        layer_parts = {} if parts is not None else None
        for layer in self.layers:
            token = layer(token, memory, layer_parts)
        velocity = self.velocity_head(token.squeeze(-2))
        if parts is not None:
            parts.update(obs_emb=state_token, action_emb=action_emb, time_emb=time_emb, out=velocity,
                         **{name: torch.stack(values) for name, values in layer_parts.items()})
        return velocity


# --------------------------------------------------------------------------------------------------
# The noise-augmented rollout and its log-probability (§5)
# --------------------------------------------------------------------------------------------------
def tanh_log_jacobian(x: torch.Tensor) -> torch.Tensor:
    """The official Σ_d log(1 − tanh²(x) + 1e-6), from y = tanh(x) in the working precision (§3, §5)."""
    return torch.log(1.0 - torch.tanh(x).square() + TANH_LOGPROB_EPS).sum(-1)


def tanh_log_jacobian_exact(x: torch.Tensor) -> torch.Tensor:
    """Σ_d log(1 − tanh²(x)) = Σ_d 2·(log 2 − x − softplus(−2x)), exact and stable at any |x|."""
    return (2.0 * (math.log(2.0) - x - F.softplus(-2.0 * x))).sum(-1)


def standard_normal_log_density(z: torch.Tensor) -> torch.Tensor:
    return (-0.5 * z.square() - 0.5 * math.log(2 * math.pi)).sum(-1)


def noisy_rollout(field: VelocityFn, obs: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, sigma: float,
                  num_steps: int) -> dict[str, torch.Tensor]:
    """x_{k+1} = m_k + σ·ε_k with m_k = x_k + Δt·v_θ(s, x_k, k/K) from x_0 ~ N(0, I); a = tanh(x_K).

    log π(a|s) = log N(x_0) + Σ_k log N(x_{k+1}; m_k, σ²I) − Σ_d log(1 − a_d² + 1e-6) is the density of the path
    (x_0 … x_{K−1}, a) (§5); integrated over the intermediate states it gives the density of a (tests/test_sacflow.py
    checks both by quadrature).  Each step term is computed from ((x_{k+1} − m_k)/σ)² as the official code does.
    ``log_probs_corrected`` uses ε_k and the exact tanh Jacobian (informational).
    Returns the fixture's rollout arrays: xs (K+1, B, D), vs, means (K, B, D), logp_steps (K, B), ….
    """
    dt = 1.0 / num_steps
    xs, vs, means, logp_steps = [x0], [], [], []
    for k, t in enumerate(time_grid(num_steps, x0)):
        v = field(obs, xs[-1], t)
        mean = xs[-1] + dt * v
        x_next = mean + sigma * eps[k]
        logp_steps.append(standard_normal_log_density((x_next - mean) / sigma) - x0.shape[-1] * math.log(sigma))
        xs.append(x_next)
        vs.append(v)
        means.append(mean)
    x_final, logp_steps = xs[-1], torch.stack(logp_steps)
    logp_prior = standard_normal_log_density(x0)
    logp_tanh = tanh_log_jacobian(x_final)
    logp_tanh_exact = tanh_log_jacobian_exact(x_final)
    step_terms_exact = standard_normal_log_density(eps).sum(0) - num_steps * x0.shape[-1] * math.log(sigma)
    return dict(xs=torch.stack(xs), vs=torch.stack(vs), means=torch.stack(means), actions=torch.tanh(x_final),
                log_probs=logp_prior + logp_steps.sum(0) - logp_tanh, logp_prior=logp_prior, logp_steps=logp_steps,
                logp_tanh=logp_tanh, log_probs_corrected=logp_prior + step_terms_exact - logp_tanh_exact,
                logp_tanh_exact=logp_tanh_exact)


# --------------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------------
class SACFlowAgent(Agent):
    """Critic ensemble + its Polyak target, the velocity network under its official module name
    (``actor_onestep_flow`` for Flow-G, ``actor_transformer`` for Flow-T) and the temperature log α.

    Optimisers: one Adam over the networks, a second Adam on log α (lr ``alpha_lr``), both stepped every update."""

    name = "sacflow"
    Hyperparams = SACFlowHyperparams
    PER_DOMAIN = PER_DOMAIN
    TARGETS = {"target_critic": "critic"}
    FIXTURE_FORMAT = "sacflow"
    FIXTURE_AGENTS = ("acfql_gru_ablation_online_sac", "acfql_transformer_ablation_online_sac")
    FIXTURE_FIXED_FLAGS = QAM_REPO_FIXED_FLAGS | {"autotune_alpha": True, "tanh_logprob_eps": TANH_LOGPROB_EPS,
                                                  "clip_grad": False}
    FIXTURE_CONFIG_NAMES = {"flow_steps": "denoising_steps"}
    FIXTURE_UPDATE_KWARGS = {"kind": "online_update"}  # the fixture's two updates
    FIXTURE_EXTRA_UPDATES = {"offline/": {"kind": "update"}}  # one official `update` from params_before
    FIXTURE_PROBES = {"vf/": "velocity_probe", "rollout/": "rollout_probe", "rollout42/": "fixed_noise_rollout_probe"}
    FIXTURE_NORM_EXCLUDED_MODULES = ("temperature",)  # its gradient feeds its own optimiser, not the logged norms
    FLAX_NAMES = {"temperature": "alpha"}

    def __init__(self, hp: SACFlowHyperparams):
        super().__init__(hp)
        s, d = hp.obs_dim, hp.chunk_dim
        self.critic = EnsembleCritic(s, d, hp.value_hidden_dims, hp.num_qs, layer_norm=hp.value_layer_norm)
        if hp.variant == "Flow-G":
            self.actor_onestep_flow = GatedVelocityField(s, d, hp.actor_hidden_dims, hp.gate_hidden_dim)
        elif hp.variant == "naive":  # the ablation, not covered by the fixtures: the same losses, v = MLP(s, x, t)
            self.actor_onestep_flow = VelocityField(s, d, hp.actor_hidden_dims)
        else:
            self.actor_transformer = DecodedVelocityField(s, d, hp.transformer_d_model, hp.transformer_n_head,
                                                          hp.transformer_n_layers)
        self.temperature = Temperature(hp.sac_alpha)
        self.temperature.FLAX_NAMES = {"log_alpha": "log_ent_coef"}  # the official `alpha/log_ent_coef` leaf
        self.make_targets()
        self.online_phase = False  # the offline phase runs `update` + `online_update` per batch, online only the latter

    @property
    def actor(self) -> nn.Module:
        return self.actor_transformer if self.hp.variant == "Flow-T" else self.actor_onestep_flow

    def acting_modules(self) -> tuple[str, ...]:
        return ("actor_transformer" if self.hp.variant == "Flow-T" else "actor_onestep_flow",)

    def begin_online_phase(self) -> None:
        self.online_phase = True

    @classmethod
    def search_space(cls, trial, method: str) -> dict:
        """The BC weight, σ_on and the initial temperature α₀, on log scales."""
        return {"alpha": trial.suggest_float("alpha", 1.0, 1000.0, log=True),
                "online_noise_std": trial.suggest_float("online_noise_std", 0.01, 0.3, log=True),
                "sac_alpha": trial.suggest_float("sac_alpha", 0.01, 1.0, log=True)}

    def make_optimizers(self, betas=(0.9, 0.999), eps=1e-8) -> dict[str, torch.optim.Optimizer]:
        networks = (p for name, p in self.named_parameters()
                    if name.split(".")[0] not in (*self.TARGETS, "temperature"))
        return {"adam": make_adam(networks, self.hp.lr, betas, eps),
                "alpha": make_adam(self.temperature.parameters(), self.hp.alpha_lr, betas, eps)}

    # ----------------------------------------------------------------------------------------------
    # Random draws (§9): fresh N(0, 1) noise for every step of every rollout, never a fixed key (§13)
    # ----------------------------------------------------------------------------------------------
    def draw_specs(self, batch_size: int, kind: str | None = None) -> dict:
        """The draws of one official update (``kind``), or of one training step of the current phase (offline:
        ``update``'s draws prefixed ``bc_``, then ``online_update``'s)."""
        if kind is None:
            if self.online_phase:
                return self.draw_specs(batch_size, "online_update")
            return {**{f"bc_{name}": spec for name, spec in self.draw_specs(batch_size, "update").items()},
                    **self.draw_specs(batch_size, "online_update")}
        shape, steps = (batch_size, self.hp.chunk_dim), (self.hp.flow_steps, batch_size, self.hp.chunk_dim)
        specs = {"target_x0": (NORMAL, shape), "target_eps": (NORMAL, steps)}  # TD-target rollout at s′
        if kind == "update":
            specs.update(fm_x0=(NORMAL, shape), fm_t=(UNIFORM, (batch_size, 1)))  # flow-matching pair
        else:
            specs.update(actor_x0=(NORMAL, shape), actor_eps=(NORMAL, steps))  # actor rollout at s
        return specs

    def act_draw_specs(self, batch_size: int) -> dict:
        shape = (batch_size, self.hp.chunk_dim)
        return {"x0": (NORMAL, shape), "eps": (NORMAL, (self.hp.flow_steps, *shape))}

    # ----------------------------------------------------------------------------------------------
    # Acting: the noise-augmented rollout with σ_inf (the official sample_actions), a = tanh(x_K)
    # ----------------------------------------------------------------------------------------------
    def rollout(self, obs, x0, eps, sigma: float) -> dict[str, torch.Tensor]:
        return noisy_rollout(self.actor, obs, x0, eps, sigma, self.hp.flow_steps)

    def act(self, obs, draws, intermediates=None) -> torch.Tensor:
        with torch.no_grad():
            return self.rollout(obs, draws["x0"], draws["eps"], self.hp.inference_noise_std)["actions"]

    # ----------------------------------------------------------------------------------------------
    # Losses
    # ----------------------------------------------------------------------------------------------
    def losses(self, batch, draws, kind: str = "online_update") -> Losses:
        """The official ``update`` (critic + flow-matching BC, §7) or ``online_update`` (critic + SAC actor, §6);
        both end with the temperature loss.  ``total`` = network loss + α loss: the network loss treats α as a
        constant and the α loss the log-probabilities, so one backward pass routes each gradient where it belongs."""
        hp, step = self.hp, chunk_step(batch)
        alpha = self.temperature()
        alpha_value = alpha.detach()  # the pre-update α, a constant of the network loss

        # Steps 1-2: TD target from the online actor's σ_inf rollout at s′ and the target critic; critic loss.
        with torch.no_grad():
            target = self.rollout(step.next_obs, draws["target_x0"], draws["target_eps"], hp.inference_noise_std)
            next_actions, next_log_probs = target["actions"], target["log_probs"]
            next_qs = self.target_critic(step.next_obs, next_actions)
            next_q = next_qs.mean(0) if hp.q_agg == "mean" else next_qs.min(0).values
            target_soft_v = next_q - alpha_value * next_log_probs
            target_q = td_target(step, target_soft_v, hp.discount, hp.horizon_length)
            target_q_corrected = td_target(step, next_q - alpha_value * target["log_probs_corrected"], hp.discount,
                                           hp.horizon_length)
        critic_q = self.critic(step.obs, step.actions)
        critic_loss = critic_td_loss(critic_q, target_q, step.valid)
        inter = {f"target_{name}": value for name, value in target.items()}
        inter.update(alpha_value=alpha_value, next_actions=next_actions, next_log_probs=next_log_probs,
                     next_log_probs_corrected=target["log_probs_corrected"], next_qs=next_qs, next_q=next_q,
                     target_entropy_term=alpha_value * next_log_probs, target_soft_v=target_soft_v, target_q=target_q,
                     target_q_corrected_logp=target_q_corrected, critic_q=critic_q.detach(),
                     critic_loss=critic_loss.detach())
        zero = torch.zeros((), device=critic_loss.device)
        if kind == "update":
            actor_loss, actor_entropy, actor_terms = self.bc_flow_loss(batch, step, draws, inter)
            distill_loss, q_loss, bc_flow_loss = zero, zero, actor_loss.detach()
        else:
            actor_loss, actor_entropy, actor_terms = self.sac_actor_loss(step, draws, alpha_value, inter)
            distill_loss, q_loss, bc_flow_loss = inter["distill_loss"], inter["q_loss"], zero

        # Temperature (§6 step 7): α·(−entropy − target_entropy), the entropy of the pre-update actor a constant.
        alpha_loss = alpha * (-actor_entropy - hp.target_entropy)
        network_loss = critic_loss + actor_loss
        inter.update(actor_loss=actor_loss.detach(), actor_entropy=actor_entropy, alpha_loss=alpha_loss.detach(),
                     alpha_grad=alpha_loss.detach(),  # d(α·c)/d log α = α·c
                     total_loss=network_loss.detach())
        metrics = {"critic_loss": critic_loss.detach(), **stats("q", critic_q), "actor_loss": actor_loss.detach(),
                   "bc_flow_loss": bc_flow_loss, "distill_loss": distill_loss, "q_loss": q_loss,
                   "actor_entropy": actor_entropy, "alpha_loss": alpha_loss.detach(), "alpha_value": alpha_value,
                   "total_loss": network_loss.detach()}
        terms = {"critic": critic_loss, **actor_terms, "alpha": alpha_loss}
        return Losses(network_loss + alpha_loss, terms, metrics, inter)

    def bc_flow_loss(self, batch, step, draws, inter) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Flow matching of the velocity network on x_t = (1−t)·x₀ + t·a_D, target a_D − x₀, weighted by the
        **full** (B, H) valid matrix (§7: not only its last column as the critic's loss)."""
        x0, t = draws["fm_x0"], draws["fm_t"]
        xt = (1.0 - t) * x0 + t * step.actions
        pred = self.actor(step.obs, xt, t)
        valid = batch["valid"]
        error = (pred - (step.actions - x0)).square().reshape(*valid.shape, -1)
        loss = (error * valid[..., None]).mean()
        inter.update(fm_xt=xt, fm_pred=pred.detach(), bc_flow_loss=loss.detach())
        # No log-probability in this loss: the entropy is 0, so the α gradient is 0 (the α Adam still steps).
        return loss, torch.zeros((), device=loss.device), {"bc_flow": loss}

    def sac_actor_loss(self, step, draws, alpha, inter) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Steps 3-4 of §6: σ_on rollout at s with gradient through every step; BC weight·mean (a_π − a_D)² (no valid
        mask) − mean_B(mean_E Q(s, a_π) − α·log π), the online critic a constant (gradient reaches a_π only)."""
        hp = self.hp
        rollout = self.rollout(step.obs, draws["actor_x0"], draws["actor_eps"], hp.online_noise_std)
        actions, log_probs = rollout["actions"], rollout["log_probs"]
        distill_loss = (actions - step.actions).square().mean()
        actor_qs = self.critic(step.obs, actions, detach_params=True)
        actor_q = actor_qs.mean(0)  # always the mean, whatever q_agg
        q_loss = -(actor_q - alpha * log_probs).mean()
        actor_entropy = -log_probs.detach().mean()
        inter.update({f"actor_{name}": value.detach() for name, value in rollout.items()})
        inter.update(distill_loss=distill_loss.detach(), actor_qs=actor_qs.detach(), actor_q=actor_q.detach(),
                     actor_entropy_term=(alpha * log_probs).detach(), q_loss=q_loss.detach(),
                     actor_entropy_corrected=-rollout["log_probs_corrected"].detach().mean())
        return hp.alpha * distill_loss + q_loss, actor_entropy, {"distill": hp.alpha * distill_loss, "q": q_loss}

    # ----------------------------------------------------------------------------------------------
    # Update
    # ----------------------------------------------------------------------------------------------
    def update(self, optimizers, batch, draws, on_raw_gradients=None, kind: str | None = None):
        """One official update (``kind``), or one training step of the current phase: offline, ``update`` then
        ``online_update`` on the same batch (§13); online, ``online_update``.  Each is the joint step (Polyak from
        the pre-step weights, Adam, no clip) followed by the α optimiser's step."""
        if kind is None and not self.online_phase:
            bc_draws = {name.removeprefix("bc_"): value for name, value in draws.items() if name.startswith("bc_")}
            bc_metrics, _ = self.update(optimizers, batch, bc_draws, on_raw_gradients, kind="update")
            metrics, inter = self.update(optimizers, batch, draws, on_raw_gradients, kind="online_update")
            return {**metrics, "bc_flow_loss": bc_metrics["bc_flow_loss"]}, inter
        kind = kind or "online_update"
        optimizers["alpha"].zero_grad(set_to_none=True)
        # joint_step reads losses, target_pairs and hp: the agent with `losses` bound to this update kind.
        this_kind = SimpleNamespace(losses=partial(self.losses, kind=kind), target_pairs=self.target_pairs, hp=self.hp)
        metrics, inter = joint_step(this_kind, optimizers["adam"], batch, draws, on_raw_gradients)
        optimizers["alpha"].step()
        return metrics, inter

    # ----------------------------------------------------------------------------------------------
    # Reference-check probes (§10): the velocity network and a standalone rollout on the initial parameters
    # ----------------------------------------------------------------------------------------------
    def velocity_probe(self, read) -> dict[str, torch.Tensor]:
        parts = {}
        with torch.no_grad():
            self.actor(read("vf/obs"), read("vf/x"), read("vf/t"), parts)
        return parts

    def rollout_probe(self, read) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            result = self.rollout(read("rollout/obs"), read("rollout/x0"), read("rollout/eps"),
                                  self.hp.online_noise_std)
        sigma = torch.full((self.hp.flow_steps,), self.hp.online_noise_std)
        return {**result, "sigma": sigma}

    def fixed_noise_rollout_probe(self, read) -> dict[str, torch.Tensor]:
        """The official Flow-G behaviour (one noise vector at every step, §13) is our rollout given that noise."""
        with torch.no_grad():
            result = self.rollout(read("rollout/obs"), read("rollout/x0"), read("rollout42/eps"),
                                  self.hp.online_noise_std)
        return {"actions": result["actions"], "log_probs": result["log_probs"]}

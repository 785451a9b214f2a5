"""Networks of the QAM family, numerically identical to the official flax modules.

Porting facts that matter (QAM_SPEC.md §2, §13):
- flax's ``nn.gelu`` is the tanh approximation, so ``approximate="tanh"`` everywhere;
- LayerNorm (eps 1e-6) sits *after* the activation and only in the critic;
- kernels are xavier-uniform, biases zero, each ensemble member initialised independently;
- the time input of a velocity field is the raw scalar t (no Fourier features).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-6


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def xavier_uniform_(weight: torch.Tensor, fan_in: int, fan_out: int) -> torch.Tensor:
    # Explicit fans: torch's own helper mis-reads them for the (E, in, out) ensemble layout.
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


class MLP(nn.Module):
    """Dense → GELU(tanh) [→ LayerNorm] per hidden layer, then a linear output layer.  ``activation`` replaces
    GELU where an official network uses another one (IDQL's ReLU value net and swish time MLP)."""

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        out_dim: int | None,
        layer_norm: bool = False,
        layer_norm_eps: float = LAYER_NORM_EPS,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,  # None: GELU(tanh)
    ):
        super().__init__()
        self.activation = activation
        widths = [in_dim, *hidden_dims] + ([out_dim] if out_dim is not None else [])
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:]))
        # With out_dim=None every layer is a hidden (activated) one, as flax's activate_final=True.
        self.num_hidden = len(hidden_dims)
        self.norms = nn.ModuleList(
            nn.LayerNorm(h, eps=layer_norm_eps) for h in (hidden_dims if layer_norm else ())
        )
        for layer in self.layers:
            xavier_uniform_(layer.weight, layer.in_features, layer.out_features)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_hidden:
                x = self.activation(x) if self.activation is not None else gelu(x)
                if self.norms:
                    x = self.norms[i](x)
        return x


class VelocityField(nn.Module):
    """Flow velocity f(s, x, t) on the flattened action chunk; ``t=None`` gives the one-step
    policy μ(s, z) of QAM-F (same network without the time input)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: Sequence[int], time_input: bool = True):
        super().__init__()
        self.time_input = time_input
        self.net = MLP(obs_dim + action_dim + int(time_input), hidden_dims, action_dim)

    def forward(self, obs: torch.Tensor, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        obs = obs.expand(*x.shape[:-1], obs.shape[-1])  # e.g. (B, 1, obs) against (B, n, D) candidates
        inputs = (obs, x, t.expand(*x.shape[:-1], 1)) if self.time_input else (obs, x)
        return self.net(torch.cat(inputs, dim=-1))


class EnsembleCritic(nn.Module):
    """E independent Q(s, a) MLPs evaluated as one batched matmul chain (no loop over members).

    Parameters are stored in the flax layout: kernels (E, in, out), biases (E, out), LayerNorm
    scale/bias (E, h).  Output shape (E, *batch).
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden_dims: Sequence[int],
        num_members: int,
        layer_norm: bool = True,
        layer_norm_eps: float = LAYER_NORM_EPS,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,  # None: GELU(tanh)
    ):
        super().__init__()
        widths = [obs_dim + action_dim, *hidden_dims, 1]
        self.num_members = num_members
        self.activation = activation
        self.layer_norm_eps = layer_norm_eps
        self.kernels = nn.ParameterList(
            nn.Parameter(torch.empty(num_members, i, o)) for i, o in zip(widths[:-1], widths[1:])
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(num_members, o)) for o in widths[1:])
        norm_dims = hidden_dims if layer_norm else ()
        self.norm_scales = nn.ParameterList(nn.Parameter(torch.ones(num_members, h)) for h in norm_dims)
        self.norm_biases = nn.ParameterList(nn.Parameter(torch.zeros(num_members, h)) for h in norm_dims)
        for kernel in self.kernels:
            xavier_uniform_(kernel, kernel.shape[1], kernel.shape[2])

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """``detach_params=True`` lets gradients reach the inputs only (the critic acts as a
        constant, e.g. in the QAM-F / QAM-E policy losses)."""
        lead = actions.shape[:-1]
        x = torch.cat((obs.expand(*lead, obs.shape[-1]), actions), dim=-1).reshape(1, -1, obs.shape[-1] + actions.shape[-1])
        params = lambda plist: [p.detach() if detach_params else p for p in plist]  # noqa: E731
        kernels, biases = params(self.kernels), params(self.biases)
        scales, shifts = params(self.norm_scales), params(self.norm_biases)
        last = len(kernels) - 1
        for i, (kernel, bias) in enumerate(zip(kernels, biases)):
            # (1|E, N, in) @ (E, in, out) broadcasts the shared input over the members.
            x = torch.baddbmm(bias.unsqueeze(1), x.expand(self.num_members, -1, -1), kernel)
            if i < last:
                x = self.activation(x) if self.activation is not None else gelu(x)
                if scales:
                    x = F.layer_norm(x, x.shape[-1:], eps=self.layer_norm_eps)
                    x = torch.addcmul(shifts[i].unsqueeze(1), x, scales[i].unsqueeze(1))
        return x.reshape(self.num_members, *lead)


class TanhGaussianEditPolicy(nn.Module):
    """QAM-E edit policy π(e | s, a_flow): GELU trunk on every layer, linear mean and log-std
    heads, log σ clipped to [-20, 2], tanh squashing (the official TanhNormal).  With
    ``condition_on_action=False`` the trunk sees the observation only (DSRL's latent policy π(w | s))."""

    LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
    FLAX_NAMES = {"trunk": "MLP_0", "mean": "OutputDenseMean", "log_std": "OutputDenseLogStd"}  # official names

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: Sequence[int], condition_on_action: bool = True):
        super().__init__()
        self.trunk = MLP(obs_dim + action_dim * condition_on_action, hidden_dims, out_dim=None)
        self.mean = nn.Linear(hidden_dims[-1], action_dim)
        self.log_std = nn.Linear(hidden_dims[-1], action_dim)
        for head in (self.mean, self.log_std):
            xavier_uniform_(head.weight, head.in_features, head.out_features)
            nn.init.zeros_(head.bias)

    def heads(self, obs: torch.Tensor, action: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, clipped log σ); ``obs`` broadcasts against the leading axes of ``action`` (e.g. n candidates)."""
        inputs = obs if action is None else torch.cat((obs.expand(*action.shape[:-1], obs.shape[-1]), action), -1)
        h = self.trunk(inputs)
        return self.mean(h), self.log_std(h).clamp(self.LOG_STD_MIN, self.LOG_STD_MAX)

    def forward(self, obs: torch.Tensor, action: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised sample e = tanh(μ + σ·eps) and its log-density (summed over dims)."""
        _, sample, log_prob = tanh_gaussian_sample(*self.heads(obs, action), eps)
        return sample, log_prob


def tanh_gaussian_sample(mean: torch.Tensor, log_std: torch.Tensor,
                         eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u = μ + σ·eps, tanh(u) and its log-density Σ_D [N(eps) − log σ − log|d tanh/du|], computed from u (never
    atanh(tanh(u)), which overflows near ±1).  Returns (u, tanh(u), log-density)."""
    pre_tanh = mean + log_std.exp() * eps
    gaussian_logp = -0.5 * eps.square() - log_std - 0.5 * math.log(2 * math.pi)
    # log|d tanh(u)/du| = log(1 - tanh(u)^2), written stably.
    log_det = 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))
    return pre_tanh, torch.tanh(pre_tanh), (gaussian_logp - log_det).sum(-1)


class Temperature(nn.Module):
    """A learned entropy temperature α = exp(log α), log α initialised to log(initial) (SAC-style tuning)."""

    FLAX_NAMES = {"log_alpha": "log_value"}  # the official scalar leaf

    def __init__(self, initial: float = 1.0):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((), math.log(initial)))

    def forward(self) -> torch.Tensor:
        return self.log_alpha.exp()


class ValueNet(MLP):
    """V(s): one MLP with the critic's layout (LayerNorm after each hidden activation) and no ensemble axis."""

    def __init__(self, obs_dim: int, hidden_dims: Sequence[int], layer_norm: bool = True):
        super().__init__(obs_dim, hidden_dims, 1, layer_norm=layer_norm)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return super().forward(obs).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# The LN-ResNet noise network of a DDPM policy (IDQL; FIXTURE_FORMAT_IDQL.md §2)
# --------------------------------------------------------------------------------------------------
def lecun_normal_(weight: torch.Tensor, fan_in: int) -> torch.Tensor:
    """flax's default kernel init: a normal of std √(1/fan_in) truncated at ±2σ (std corrected for the cut)."""
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, std=std, a=-2.0 * std, b=2.0 * std)


class FourierFeatures(nn.Module):
    """Learnable Fourier features of a scalar time: f = 2π·t·Wᵀ, φ = [cos f, sin f] (cosines first).  The kernel W
    (out_dim/2, 1) is stored in the official layout and drawn from N(0, init_std²)."""

    def __init__(self, out_dim: int, init_std: float = 0.2):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(out_dim // 2, 1) * init_std)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = (2 * math.pi * t) * self.kernel[:, 0]  # (…, 1)·(out_dim/2,) → (…, out_dim/2), the official order
        return torch.cat((torch.cos(f), torch.sin(f)), dim=-1)


class MLPResNetBlock(nn.Module):
    """Pre-norm residual block h + Dense(swish(Dense(LayerNorm(dropout(h))))) with a 4× expansion; the residual is
    the un-dropped, un-normalised h.  ``keep`` is the block's inverted-dropout multiplier (1/(1−p) where a unit is
    kept, 0 where dropped), drawn by the caller; None: no dropout."""

    FLAX_NAMES = {"norm": "LayerNorm_0", "expand": "Dense_0", "project": "Dense_1"}

    def __init__(self, width: int, expansion: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.expand = nn.Linear(width, expansion * width)
        self.project = nn.Linear(expansion * width, width)
        for layer in (self.expand, self.project):
            lecun_normal_(layer.weight, layer.in_features)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = h if keep is None else h * keep
        return h + self.project(F.silu(self.expand(self.norm(x))))


class MLPResNet(nn.Module):
    """Dense → blocks → swish → Dense (an activation before the output layer).  The outer layers are
    xavier-uniform, the block layers lecun-normal, as the official initialisers."""

    def __init__(self, in_dim: int, width: int, num_blocks: int, out_dim: int):
        super().__init__()
        self.input_layer = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(MLPResNetBlock(width) for _ in range(num_blocks))
        self.output_layer = nn.Linear(width, out_dim)
        for layer in (self.input_layer, self.output_layer):
            xavier_uniform_(layer.weight, layer.in_features, layer.out_features)
            nn.init.zeros_(layer.bias)
        self.FLAX_NAMES = {"input_layer": "Dense_0", "output_layer": "Dense_1",
                           **{f"blocks.{i}": f"MLPResNetBlock_{i}" for i in range(num_blocks)}}

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None,
                block_outputs: list | None = None) -> torch.Tensor:
        """``keep`` (num_blocks, …, width): per-block dropout multipliers; ``block_outputs`` receives each block's
        output."""
        h = self.input_layer(x)
        for i, block in enumerate(self.blocks):
            h = block(h, None if keep is None else keep[i])
            if block_outputs is not None:
                block_outputs.append(h)
        return self.output_layer(F.silu(h))


class NoiseNetwork(nn.Module):
    """ε_θ(s, x, t) of a DDPM policy: learnable Fourier features of the integer diffusion index t → a 2-layer swish
    MLP (no final activation) gives c; the LN-ResNet reads [x, s, c] (noisy action, observation, conditioning)."""

    FLAX_NAMES = {"time_features": "FourierFeatures_0", "cond_mlp": "MLP_0", "resnet": "MLPResNet_0"}

    def __init__(self, obs_dim: int, action_dim: int, width: int, num_blocks: int, time_dim: int,
                 fourier_init_std: float = 0.2):
        super().__init__()
        self.time_features = FourierFeatures(time_dim, fourier_init_std)
        self.cond_mlp = MLP(time_dim, (2 * time_dim,), 2 * time_dim, activation=F.silu)
        self.resnet = MLPResNet(action_dim + obs_dim + 2 * time_dim, width, num_blocks, action_dim)

    def forward(self, obs: torch.Tensor, x: torch.Tensor, t: torch.Tensor, keep: torch.Tensor | None = None,
                record: dict | None = None) -> torch.Tensor:
        """``obs`` and ``t`` (…, 1) broadcast against the leading axes of ``x``; ``record`` receives the time
        features, the conditioning and the block outputs."""
        time_features = self.time_features(t.expand(*x.shape[:-1], 1))
        cond = self.cond_mlp(time_features)
        blocks = [] if record is not None else None
        eps = self.resnet(torch.cat((x, obs.expand(*x.shape[:-1], obs.shape[-1]), cond), dim=-1), keep, blocks)
        if record is not None:
            record.update(time_features=time_features, cond=cond, block_outputs=torch.stack(blocks))
        return eps

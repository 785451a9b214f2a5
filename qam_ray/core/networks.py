"""Networks of the QAM family, numerically identical to the official flax modules.

Porting facts that matter (QAM_SPEC.md §2, §13):
- flax's ``nn.gelu`` is the tanh approximation, so ``approximate="tanh"`` everywhere;
- LayerNorm (eps 1e-6) sits *after* the activation and only in the critic;
- kernels are xavier-uniform, biases zero, each ensemble member initialised independently;
- the time input of a velocity field is the raw scalar t (no Fourier features).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    """Dense → GELU(tanh) [→ LayerNorm] per hidden layer, then a linear output layer."""

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        out_dim: int | None,
        layer_norm: bool = False,
        layer_norm_eps: float = LAYER_NORM_EPS,
    ):
        super().__init__()
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
                x = gelu(x)
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
    ):
        super().__init__()
        widths = [obs_dim + action_dim, *hidden_dims, 1]
        self.num_members = num_members
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
                x = gelu(x)
                if scales:
                    x = F.layer_norm(x, x.shape[-1:], eps=self.layer_norm_eps)
                    x = torch.addcmul(shifts[i].unsqueeze(1), x, scales[i].unsqueeze(1))
        return x.reshape(self.num_members, *lead)


class TanhGaussianEditPolicy(nn.Module):
    """QAM-E edit policy π(e | s, a_flow): GELU trunk on every layer, linear mean and log-std
    heads, log σ clipped to [-20, 2], tanh squashing (the official TanhNormal)."""

    LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: Sequence[int]):
        super().__init__()
        self.trunk = MLP(obs_dim + action_dim, hidden_dims, out_dim=None)
        self.mean = nn.Linear(hidden_dims[-1], action_dim)
        self.log_std = nn.Linear(hidden_dims[-1], action_dim)
        for head in (self.mean, self.log_std):
            xavier_uniform_(head.weight, head.in_features, head.out_features)
            nn.init.zeros_(head.bias)

    def forward(self, obs: torch.Tensor, action: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised sample e = tanh(μ + σ·eps) and its log-density (summed over dims)."""
        h = self.trunk(torch.cat((obs, action), dim=-1))
        mean = self.mean(h)
        log_std = self.log_std(h).clamp(self.LOG_STD_MIN, self.LOG_STD_MAX)
        pre_tanh = mean + log_std.exp() * eps
        gaussian_logp = -0.5 * eps.square() - log_std - 0.5 * math.log(2 * math.pi)
        # log|d tanh(u)/du| = log(1 - tanh(u)^2), written stably.
        log_det = 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))
        return torch.tanh(pre_tanh), (gaussian_logp - log_det).sum(-1)


class Temperature(nn.Module):
    """A learned entropy temperature α = exp(log α), log α initialised to log(initial) (SAC-style tuning)."""

    def __init__(self, initial: float = 1.0):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((), math.log(initial)))

    def forward(self) -> torch.Tensor:
        return self.log_alpha.exp()

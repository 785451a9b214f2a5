"""Flow samplers and the lean adjoint of adjoint matching (QAM_SPEC.md §6).

Time grid: K Euler steps, h = 1/K, t_i = i/K.  A *velocity field* is any callable
``field(obs, x, t) -> dx/dt`` on flattened action chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.profiler import record_function

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(num_steps: int, like: torch.Tensor) -> torch.Tensor:
    """t_i = i/K as a (K, 1, 1) tensor, computed in float32 like the reference (i / K)."""
    return (torch.arange(num_steps, device=like.device, dtype=like.dtype) / num_steps).view(num_steps, 1, 1)


def memoryless_sigmas(times: torch.Tensor, num_steps: int) -> torch.Tensor:
    """σ_i = sqrt(2(1 - t_i + h) / (t_i + h)): the memoryless noise schedule with the "+h"
    regularisers of the official code (not 1 - t - h)."""
    h = 1.0 / num_steps
    return torch.sqrt(2.0 * (1.0 - times + h) / (times + h))


def euler_ode(field: VelocityFn, obs: torch.Tensor, x0: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Deterministic Euler integration x ← x + f(s, x, i/K)/K from t=0 to 1 (unclipped).

    ``obs`` broadcasts against the leading axes of ``x0`` (e.g. (B, 1, obs) against (B, n, D) candidates).
    """
    x = x0
    for t in time_grid(num_steps, x0):
        x = x + field(obs, x, t) / num_steps
    return x


def euler_ode_states(field: VelocityFn, obs: torch.Tensor, x0: torch.Tensor, num_steps: int) -> torch.Tensor:
    """``euler_ode`` that keeps its K+1 states [x_0 … x_K], stacked on a new leading axis (x_K = states[-1])."""
    states = [x0]
    for t in time_grid(num_steps, x0):
        states.append(states[-1] + field(obs, states[-1], t) / num_steps)
    return torch.stack(states)


def memoryless_sde_step(x: torch.Tensor, fine_velocity: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor,
                        noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    """One Euler–Maruyama step of the memoryless SDE  x += h(2 f_θ − x/(t+h)) + √h·σ·ε  (h = 1/K)."""
    h = 1.0 / num_steps
    return x + h * (2.0 * fine_velocity - x / (t + h)) + math.sqrt(h) * sigma * noise


def memoryless_sde_trajectory(
    fine_field: VelocityFn,
    base_field: VelocityFn,
    obs: torch.Tensor,
    x0: torch.Tensor,
    step_noise: torch.Tensor,
    num_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward trajectory of adjoint matching (§6.1); the states carry no graph.

    Steps 0..K-2 follow the fine-tuned memoryless SDE  x += h(2 f_θ - x/(t+h)) + √h σ ε;
    the last step is a deterministic ODE step with the base field.  ``step_noise[K-1]`` is
    drawn by the reference but unused.  Returns (xs = [x_0..x_{K-1}] of shape (K, B, D), x_K, the fine
    velocities [f_θ(x_0, t_0)..f_θ(x_{K-2}, t_{K-2})] (K-1, B, D) with their graph to f_θ's parameters): the
    loss regresses f_θ at these very states and times, so it reuses them instead of evaluating f_θ again.
    """
    h = 1.0 / num_steps
    times = time_grid(num_steps, x0)
    sigmas = memoryless_sigmas(times, num_steps)
    xs, fine_velocities = [x0], []
    x = x0.detach()
    for i in range(num_steps - 1):
        fine_velocities.append(fine_field(obs, x, times[i]))
        with torch.no_grad():
            x = memoryless_sde_step(x, fine_velocities[-1], times[i], sigmas[i], step_noise[i], num_steps)
        xs.append(x)
    with torch.no_grad():
        x_final = x + h * base_field(obs, x, times[-1])
    fine_velocities = torch.stack(fine_velocities) if fine_velocities else x0.new_zeros((0, *x0.shape))  # K = 1
    return torch.stack(xs), x_final, fine_velocities


def vector_jacobian_product(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                            v: torch.Tensor) -> torch.Tensor:
    """vᵀ·∂fn/∂x at x, carrying no graph (whatever parameters fn reads).  Eager: ``autograd.grad`` (15 % faster per
    full-size VJP on CPU than ``torch.func.vjp``); under torch.compile: ``torch.func.vjp``, which it traces into the
    update's graph where ``autograd.grad`` would break the graph at every call."""
    if torch.compiler.is_compiling():
        with torch.no_grad():
            _, vjp_fn = torch.func.vjp(fn, x)
            return vjp_fn(v)[0]
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(fn(x), x, grad_outputs=v)[0]


def lean_adjoint(
    base_field: VelocityFn,
    obs: torch.Tensor,
    xs: torch.Tensor,
    terminal_adjoint: torch.Tensor,
    num_steps: int,
) -> torch.Tensor:
    """Backward Euler for dã/dt = -(∂b_β/∂x)ᵀ ã with the base drift b_β = 2 f_β - x/(t+h) (§6.3).

    The vector-Jacobian product at step i is taken at the *left* state x_i but at time t_i + h,
    and the last interval uses the same SDE-drift form.  Returns [ã_0..ã_{K-1}] (K, B, D), where
    ã_i is the value after the update at step i; the result carries no graph.
    """
    h = 1.0 / num_steps
    times = time_grid(num_steps, xs)
    adjoint = terminal_adjoint.detach()
    adjoints = [None] * num_steps
    for i in reversed(range(num_steps)):
        t_eval = times[i] + h
        vjp_f = vector_jacobian_product(lambda x: base_field(obs, x, t_eval), xs[i], 2.0 * adjoint)
        # VJP of the linear part -x/(t+h) is -ã/(t+h); added analytically.
        adjoint = adjoint + h * (vjp_f - adjoint / t_eval)
        adjoints[i] = adjoint
    return torch.stack(adjoints)


def adjoint_matching_loss(
    fine_field: VelocityFn,
    base_field: VelocityFn,
    obs: torch.Tensor,
    x0: torch.Tensor,
    step_noise: torch.Tensor,
    num_steps: int,
    terminal_adjoint_fn: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Adjoint-matching regression of the fine field onto the tilted target (§6.1-6.4).

    ``terminal_adjoint_fn(x_K)`` gives ã_K = ∇_x[-τ·Q(s, x)] (QAM: the clipped target-critic mean).
    L_AM = mean_B Σ_i Σ_d ((2/σ_i)(f_θ - f_β)(x_i, t_i) + σ_i ã_i)²: a sum over steps and dims with no
    ½ or h factor; only f_θ receives gradients.  Returns (loss, intermediates, all detached but f_θ's graph).
    """
    # ``phase:`` labels name the phases for `benchmark.py --profile` (a few µs each otherwise).
    with record_function("phase:am_sde_trajectory"):
        xs, x_final, trajectory_fine = memoryless_sde_trajectory(fine_field, base_field, obs, x0, step_noise,
                                                                 num_steps)
    with record_function("phase:am_terminal_adjoint"):
        adj_terminal = terminal_adjoint_fn(x_final).detach()
    with record_function("phase:am_vjps"):
        adjoints = lean_adjoint(base_field, obs, xs, adj_terminal, num_steps)
    with record_function("phase:am_loss"):
        times = time_grid(num_steps, xs)
        sigmas = memoryless_sigmas(times, num_steps)
        with torch.no_grad():
            vf_base = base_field(obs, xs, times)
        vf_fine = torch.cat((trajectory_fine, fine_field(obs, xs[-1:], times[-1:])))  # f_θ at x_{K-1} is new
        control = (2.0 / sigmas) * (vf_fine - vf_base)
        loss = (control + sigmas * adjoints).square().sum((0, 2)).mean()
    inter = dict(
        am_xs=xs, am_x_final=x_final, am_ts=times, am_sigmas=sigmas, am_adj_terminal=adj_terminal,
        am_adjs=adjoints, am_vf_fine=vf_fine.detach(), am_vf_base=vf_base,
    )
    return loss, inter


# --------------------------------------------------------------------------------------------------
# DDPM with the discretised VP schedule (IDQL; FIXTURE_FORMAT_IDQL.md §4, §8.1)
# --------------------------------------------------------------------------------------------------
NoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # ε̂(s, x, t), t the integer index


def vp_schedule(num_steps: int, b_min: float = 0.1, b_max: float = 10.0) -> tuple[torch.Tensor, ...]:
    """(β, α, ᾱ) of the discretised VP-SDE, 0-indexed (entry k is step i = k + 1), in float32:
    α_i = exp(−b_min/T − ½(b_max − b_min)(2i − 1)/T²), β = 1 − α (computed in float64, then rounded), α = 1 − β,
    ᾱ_k = ∏_{j ≤ k} α_j (including step k)."""
    i = torch.arange(1, num_steps + 1, dtype=torch.float64)
    betas = (1.0 - torch.exp(-b_min / num_steps - 0.5 * (b_max - b_min) * (2 * i - 1) / num_steps**2)).float()
    alphas = 1.0 - betas
    return betas, alphas, torch.cumprod(alphas, 0)


def ddpm_sample(noise_fn: NoiseFn, obs: torch.Tensor, x_T: torch.Tensor, step_noise: torch.Tensor,
                betas: torch.Tensor, alphas: torch.Tensor, alpha_hats: torch.Tensor,
                record: dict | None = None, clip_sampler: bool = True) -> torch.Tensor:
    """Ancestral DDPM sampling with an ε-prediction, from x_T over t = T−1 … 0, without gradients:
    x ← (1/√α_t)(x − ((1 − α_t)/√(1 − ᾱ_t))·ε̂(s, x, t)), plus √β_t·z for t > 0 (no noise at t = 0), then a clip
    to [−1, 1] after every step (the official ``clip_sampler``; False: the plain DDPM sampler).  ``step_noise`` (T, …) holds z of reverse step i at [i]; [T−1] is unused.
    ``record`` receives the times, the states (clipped and before the clip) and every ε̂, stacked on axis 0."""
    num_steps = betas.shape[0]
    times = torch.arange(num_steps - 1, -1, -1, device=x_T.device, dtype=x_T.dtype)
    x, xs, unclipped, eps_preds = x_T, [x_T], [], []
    with torch.no_grad():
        for i in range(num_steps):
            t = num_steps - 1 - i
            eps = noise_fn(obs, x, times[i].view(1))
            x = (1 / alphas[t].sqrt()) * (x - ((1 - alphas[t]) / (1 - alpha_hats[t]).sqrt()) * eps)
            if t > 0:
                x = x + betas[t].sqrt() * step_noise[i]
            unclipped.append(x)
            x = x.clamp(-1.0, 1.0) if clip_sampler else x
            xs.append(x)
            eps_preds.append(eps)
    if record is not None:
        record.update(times=times, xs=torch.stack(xs), xs_unclipped=torch.stack(unclipped),
                      eps_pred=torch.stack(eps_preds))
    return x

"""IDQL: the official update and acting path number by number (idql_small), the checker catching plausible porting
mistakes, and independent checks of the pieces the fixture cannot pin down: the VP sampler against a known
distribution, the expectile regression against a known expectile, the implicit policy's resampling, and batched
acting."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qam_ray import reference_check
from qam_ray.agents import idql, make_hyperparams
from qam_ray.agents.base import sample_draws
from qam_ray.agents.idql import IDQLAgent, IDQLHyperparams
from qam_ray.core import optim
from qam_ray.core.flow import ddpm_sample, vp_schedule

FIXTURE = str(Path(__file__).parent / "fixtures" / "idql_small.npz")
TINY = dict(obs_dim=3, action_dim=2, horizon_length=2, value_hidden_dims=(8, 8), actor_num_blocks=2,
            actor_hidden_dim=8, time_dim=4, num_samples=5)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread avoids contention with other processes (a 20× slowdown on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def failed(path: str = FIXTURE) -> set[str]:
    return {c.name for c in reference_check.check_fixture(path) if not c.ok}


def tiny_agent(**overrides) -> IDQLAgent:
    torch.manual_seed(0)
    return IDQLAgent(IDQLHyperparams(**{**TINY, **overrides})).double()


# --------------------------------------------------------------------------------------------------
# The official update and acting path
# --------------------------------------------------------------------------------------------------
def test_port_matches_the_official_update_and_acting_path():
    checks = reference_check.check_fixture(FIXTURE)
    assert not [(c.name, c.error, c.tol) for c in checks if not c.ok]
    names = {c.name for c in checks}
    for update in ("update1", "update2"):  # every class of quantity of FIXTURE_FORMAT_IDQL.md §9, both updates
        for key in ("info/actor_loss", "info/v", "info/q", "actor_loss", "value_loss", "critic_loss", "actor_lr",
                    "ddpm_block_outputs", "value_weight", "next_v", "schedule/alpha_hats",
                    "grad_global_norm/score_model", "grad_global_norm/value", "grad_global_norm/critic",
                    "opt_updates/score_model.resnet.blocks.0.norm.weight", "params/target_score_model.time_features.kernel",
                    "params/target_critic.kernels.2", "grads/value.input_norm.weight"):
            assert f"{update}/{key}" in names, (update, key)
    assert {"acting/act/chosen_index", "acting/act/implicit_probs", "acting/act/xs_unclipped",
            "update1/adam_mu/score_model.time_features.kernel"} <= names


def test_registry_values_per_domain():
    hp = make_hyperparams("IDQL", "humanoidmaze-medium-navigate-singletask-task1-v0", 10, 3)
    assert (hp.expectile, hp.horizon_length, hp.num_samples, hp.diffusion_steps) == (0.7, 1, 64, 5)
    hp = make_hyperparams("IDQL", "cube-triple-play-singletask-task2-v0", 10, 3)
    assert (hp.expectile, hp.horizon_length, hp.actor_dropout_rate) == (0.95, 5, 0.1)
    assert make_hyperparams("IDQL", "antmaze-giant-navigate-singletask-task1-v0", 10, 3).discount == 0.995
    with pytest.raises(ValueError, match="extraction"):
        IDQLHyperparams(obs_dim=1, action_dim=1, extraction="softmax")


def test_checker_catches_target_averaging_from_the_pre_step_parameters(monkeypatch):
    pre_step = {}
    real_step, real_polyak = optim.optimizer_step, optim.polyak_update_

    def step_keeping_the_old_parameters(optimizer, loss, on_raw_gradients=None):
        pre_step.update({p: p.detach().clone() for g in optimizer.param_groups for p in g["params"]})
        real_step(optimizer, loss, on_raw_gradients)

    monkeypatch.setattr(idql, "optimizer_step", step_keeping_the_old_parameters)
    monkeypatch.setattr(idql, "polyak_update_", lambda targets, onlines, tau: real_polyak(
        targets, [pre_step[p] for p in onlines], tau))
    bad = failed()
    assert any(n.startswith("update1/params/target_score_model") for n in bad)
    assert any(n.startswith("update1/params/target_critic") for n in bad)
    assert not any("/params/score_model" in n or "/params/critic" in n for n in bad)  # only the targets show it


def test_checker_catches_the_critic_stepped_before_the_value(monkeypatch):
    """The wrong order: the TD target then bootstraps from the pre-step value net."""
    calls, deferred = [], []
    real_step = optim.optimizer_step

    def value_step_after_the_critic(optimizer, loss, on_raw_gradients=None):
        calls.append(optimizer)
        if len(calls) % 3 == 2:  # the value sub-update: gradients now, its step only after the critic's
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            on_raw_gradients()
            deferred.append(optimizer)
            return
        real_step(optimizer, loss, on_raw_gradients)
        while deferred:
            deferred.pop().step()

    monkeypatch.setattr(idql, "optimizer_step", value_step_after_the_critic)
    bad = failed()
    assert {"update1/next_v", "update1/target_q", "update1/critic_loss"} <= bad
    assert "update1/value_loss" not in bad


def test_checker_catches_a_missing_actor_weight_decay_only_in_the_update_vectors(monkeypatch):
    monkeypatch.setattr(idql, "make_adamw", lambda params, lr, weight_decay, betas, eps: optim.make_adam(
        params, lr, betas, eps))
    bad = failed()
    assert bad and all("/opt_updates/score_model" in n for n in bad), bad


def test_checker_catches_a_constant_actor_learning_rate(monkeypatch):
    monkeypatch.setattr(idql, "cosine_decay_lr", lambda lr, count, decay_steps: lr)
    assert "update2/actor_lr" in failed()


# --------------------------------------------------------------------------------------------------
# Independent checks
# --------------------------------------------------------------------------------------------------
MIXTURE = dict(weights=(0.3, 0.7), means=(-0.5, 0.4), stds=(0.1, 0.15))


def mixture_noise_prediction(alpha_hats: torch.Tensor):
    """The exact ε-prediction of a 1-D Gaussian mixture: x_t = √ᾱ·x₀ + √(1 − ᾱ)·ε has the mixture with means
    √ᾱ·μ_k and variances ᾱ·s_k² + 1 − ᾱ, and ε*(x, t) = −√(1 − ᾱ_t)·∂_x log p_t(x)."""
    pi, mu, s = (torch.tensor(MIXTURE[k], dtype=torch.float64) for k in ("weights", "means", "stds"))

    def eps(obs, x, t):
        a = alpha_hats[t.long()].reshape(1)
        mean, var = a.sqrt() * mu, a * s**2 + (1 - a)
        log_r = torch.log(pi) - 0.5 * (x - mean) ** 2 / var - 0.5 * torch.log(var)
        r = torch.softmax(log_r, -1)
        score = (r * (mean - x) / var).sum(-1, keepdim=True)
        return -(1 - a).sqrt() * score
    return eps


def mixture_cdf(x: np.ndarray) -> np.ndarray:
    return sum(w * 0.5 * (1 + np.vectorize(math.erf)((x - m) / (s * math.sqrt(2))))
               for w, m, s in zip(MIXTURE["weights"], MIXTURE["means"], MIXTURE["stds"]))


def test_vp_sampler_reproduces_a_gaussian_mixture_from_its_exact_noise_prediction():
    betas, alphas, alpha_hats = (v.double() for v in vp_schedule(1000))
    g = torch.Generator().manual_seed(0)
    n = 20000
    x_T = torch.randn(n, 1, generator=g, dtype=torch.float64)
    step_noise = torch.randn(1000, n, 1, generator=g, dtype=torch.float64)
    x = ddpm_sample(mixture_noise_prediction(alpha_hats), None, x_T, step_noise, betas, alphas, alpha_hats,
                    clip_sampler=False)[:, 0].numpy()
    grid = np.linspace(-1.0, 1.0, 201)
    ks = np.abs((x[:, None] <= grid).mean(0) - mixture_cdf(grid)).max()
    assert ks < 0.015, ks  # the KS statistic; 20000 exact samples give ≈ 0.005
    assert abs((x < 0).mean() - 0.3) < 0.015
    # With the official T = 5 the same exact ε leaves a visible discretisation error: the check is not vacuous.
    betas5, alphas5, hats5 = (v.double() for v in vp_schedule(5))
    x5 = ddpm_sample(mixture_noise_prediction(hats5), None, x_T, step_noise[:5], betas5, alphas5, hats5,
                     clip_sampler=False)[:, 0].numpy()
    assert np.abs((x5[:, None] <= grid).mean(0) - mixture_cdf(grid)).max() > 2 * ks


def linear_critic_(critic) -> None:
    """Make every member Q(s, a) = a₀ (first action coordinate): relu(a₀) − relu(−a₀) through the ReLU layers."""
    with torch.no_grad():
        for kernel, bias in zip(critic.kernels, critic.biases):
            kernel.zero_()
            bias.zero_()
        obs_dim = critic.kernels[0].shape[1] - 2 * 2  # TINY's chunk is 2 × 2
        critic.kernels[0][:, obs_dim, 0], critic.kernels[0][:, obs_dim, 1] = 1.0, -1.0
        for kernel in critic.kernels[1:-1]:
            kernel[:, 0, 0], kernel[:, 1, 1] = 1.0, 1.0
        critic.kernels[-1][:, 0, 0], critic.kernels[-1][:, 1, 0] = 1.0, -1.0


ATOMS = torch.tensor([-0.8, -0.2, 0.5, 0.9], dtype=torch.float64)
PROBS = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)


def expectile_of_atoms(tau: float) -> float:
    """The τ-expectile e of the discrete distribution: τ·E[(X − e)₊] = (1 − τ)·E[(e − X)₊], by bisection."""
    low, high = -1.0, 1.0
    for _ in range(100):
        e = 0.5 * (low + high)
        gap = tau * (PROBS * (ATOMS - e).clamp(min=0)).sum() - (1 - tau) * (PROBS * (e - ATOMS).clamp(min=0)).sum()
        low, high = (e, high) if gap > 0 else (low, e)
    return e


@pytest.mark.parametrize("tau", [0.7, 0.9])
def test_expectile_regression_converges_to_the_expectile_of_a_known_distribution(tau):
    """The value sub-update alone, on a full batch that *is* the distribution (rows repeated by probability)."""
    agent = tiny_agent(expectile=tau, lr=1e-2)
    linear_critic_(agent.target_critic)
    counts = (PROBS * 10).round().long()
    a0 = ATOMS.repeat_interleave(counts)
    rows = a0.shape[0]
    actions = torch.zeros(rows, 2, 2, dtype=torch.float64)
    actions[:, 0, 0] = a0
    obs = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64).expand(rows, 3)
    batch = {"observations": obs, "actions": actions, "rewards": torch.zeros(rows, 2, dtype=torch.float64),
             "masks": torch.ones(rows, 2, dtype=torch.float64), "valid": torch.ones(rows, 2, dtype=torch.float64),
             "next_observations": obs[:, None].expand(rows, 2, 3)}
    value_optimizer = agent.make_optimizers()["value"]
    for _ in range(1500):
        optim.optimizer_step(value_optimizer, agent.value_losses(batch).total)
    v = float(agent.value(obs[:1]).detach())
    assert abs(v - expectile_of_atoms(tau)) < 2e-3, (v, expectile_of_atoms(tau))
    assert abs(v - float((PROBS * ATOMS).sum())) > 0.05  # not the mean


def test_expectile_resampling_reproduces_the_implicit_policy_on_a_discrete_toy(monkeypatch):
    """μ uniform-free discrete behaviour over ATOMS, Q(s, a) = a₀, V = the τ-expectile of Q under μ (IQL's fixed
    point).  The paper's implicit policy π ∝ μ·w (w = τ where Q ≥ V, else 1 − τ) has E_π[Q] = V; resampling N
    candidates of μ with those weights must draw from π."""
    tau, n_obs, n_samples = 0.8, 8000, 64
    agent = tiny_agent(expectile=tau, extraction="expectile", num_samples=n_samples)
    linear_critic_(agent.target_critic)
    v = expectile_of_atoms(tau)
    with torch.no_grad():  # V(s) = v for every s
        agent.value.output.weight.zero_()
        agent.value.output.bias.fill_(v)
    weights = torch.where(ATOMS >= v, tau, 1 - tau)
    implicit = PROBS * weights / (PROBS * weights).sum()
    assert abs(float((implicit * ATOMS).sum()) - v) < 1e-9  # the implicit policy's value is V

    g = torch.Generator().manual_seed(0)
    behaviour = torch.multinomial(PROBS, n_obs * n_samples, replacement=True, generator=g).view(n_obs, n_samples)
    candidates = torch.zeros(n_obs, n_samples, 4, dtype=torch.float64)
    candidates[..., 0] = ATOMS[behaviour]
    monkeypatch.setattr(idql, "ddpm_sample", lambda *args, **kwargs: candidates)  # exact draws from μ
    obs = torch.zeros(n_obs, 3, dtype=torch.float64)
    draws = sample_draws(agent.act_draw_specs(n_obs), g, "cpu")
    actions = agent.act(obs, {k: d.double() for k, d in draws.items()})
    chosen = (actions[:, 0:1] == ATOMS).double().mean(0)
    assert torch.allclose(chosen, implicit, atol=0.02), (chosen, implicit)
    assert not torch.allclose(chosen, PROBS, atol=0.05)  # it is not the behaviour policy


@pytest.mark.parametrize("extraction", ["argmax", "expectile"])
def test_batched_acting_equals_acting_one_observation_at_a_time(extraction):
    agent = tiny_agent(extraction=extraction)
    obs = torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    draws = {k: v.double() for k, v in sample_draws(agent.act_draw_specs(6), torch.Generator().manual_seed(4),
                                                     "cpu").items()}
    batched = agent.act(obs, draws)
    assert batched.shape == (6, 4) and float(batched.abs().max()) <= 1.0
    for i in range(6):
        single = agent.act(obs[i:i + 1], {k: v[i:i + 1] for k, v in draws.items()})
        torch.testing.assert_close(single[0], batched[i])


def test_one_training_update_moves_every_online_parameter_and_keeps_the_schedule_count():
    agent = tiny_agent(actor_dropout_rate=0.1, decay_steps=10)
    g = torch.Generator().manual_seed(5)
    b = 7
    batch = {"observations": torch.randn(b, 3, generator=g, dtype=torch.float64),
             "actions": torch.rand(b, 2, 2, generator=g, dtype=torch.float64) * 2 - 1,
             "rewards": -torch.rand(b, 2, generator=g, dtype=torch.float64),
             "masks": torch.ones(b, 2, dtype=torch.float64), "valid": torch.ones(b, 2, dtype=torch.float64),
             "next_observations": torch.randn(b, 2, 3, generator=g, dtype=torch.float64)}
    optimizers = agent.make_optimizers()
    before = {n: p.detach().clone() for n, p in agent.named_parameters()}
    for _ in range(2):
        draws = {k: v.double() for k, v in sample_draws(agent.draw_specs(b), g, "cpu").items()}
        metrics, _ = agent.update(optimizers, batch, draws)
    assert set(metrics) == {"actor_loss", "value_loss", "v", "critic_loss", "q", "total_loss"}
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert all(not torch.equal(before[n], p) for n, p in agent.named_parameters()), "a parameter did not move"
    state = optimizers["actor"].state_dict()  # the schedule's count survives a checkpoint
    assert state["param_groups"][0]["schedule_count"] == 2
    assert math.isclose(optimizers["actor"].param_groups[0]["lr"], optim.cosine_decay_lr(3e-4, 1, 10))


def test_offline_training_is_deterministic_and_resumes_identically(tiny_dataset_dir):
    """The plain trainer (the RLlib learner runs the same updates): the three optimisers, the schedule's count and
    the generator all come back from a checkpoint."""
    import copy

    from qam_ray.data.ogbench_data import load_offline_dataset
    from qam_ray.data.replay import ChunkReplayBuffer
    from qam_ray.training import OfflineTrainer

    from .conftest import TINY_ENV

    def trainer(seed=0):
        buffer = ChunkReplayBuffer.from_arrays(load_offline_dataset(TINY_ENV, tiny_dataset_dir).train, "cpu")
        overrides = {"value_hidden_dims": (16, 16), "actor_hidden_dim": 16, "actor_num_blocks": 1, "time_dim": 4,
                     "num_samples": 4, "decay_steps": 5}
        return OfflineTrainer.for_env("IDQL", TINY_ENV, buffer, overrides, batch_size=8, seed=seed)

    a = trainer()
    a.train(3)
    state = copy.deepcopy(a.state_dict())
    expected = a.train(3)
    b = trainer(seed=123)
    b.load_state_dict(state)
    assert b.train(3) == expected
    assert b.optimizers["actor"].param_groups[0]["schedule_count"] == 6  # 3 before the checkpoint, 3 after


# --------------------------------------------------------------------------------------------------
# Fixtures of other configurations in the IDQL format (written from our own agent, so the errors are those of float32
# replay): the checker must read every size from config_json, as it must for the official fixtures it has not seen.
# --------------------------------------------------------------------------------------------------
def write_idql_fixture(path, batch_size: int = 5, **sizes) -> None:
    import json

    config = json.loads(str(np.load(FIXTURE)["config_json"]))  # the format's fixed flags
    torch.manual_seed(1)
    hp = IDQLHyperparams(horizon_length=1, actor_dropout_rate=0.0, **sizes)
    agent = IDQLAgent(hp)
    config.update({key: getattr(hp, ours) for ours, key in (
        ("obs_dim", "obs_dim"), ("action_dim", "action_dim"), ("diffusion_steps", "T"), ("num_samples", "N"),
        ("actor_num_blocks", "actor_num_blocks"), ("actor_hidden_dim", "actor_hidden_dim"), ("time_dim", "time_dim"),
        ("value_hidden_dims", "value_hidden_dims"), ("value_hidden_dims", "critic_hidden_dims"),
        ("expectile", "expectile"), ("discount", "discount"), ("tau", "tau"), ("actor_tau", "actor_tau"),
        ("decay_steps", "decay_steps"), ("num_qs", "num_qs"), ("value_layer_norm", "value_layer_norm"))},
        batch_size=batch_size)
    names = reference_check.official_names(agent)
    subs = {"score_model": ("FourierFeatures_0", "MLPResNet_0", "MLP_0"), "critic": "VmapStateActionValue_0",
            "value": ("MLP_0", "OutputVDense")}
    subs.update(target_score_model=subs["score_model"], target_critic=subs["critic"])

    def tree(values: dict, snapshot: str) -> dict:
        arrays = {}
        for name, value in values.items():
            flax, transposed = reference_check.flax_path(names[name], subs)
            array = value.detach().numpy().astype(np.float32)
            arrays[f"{snapshot}/{flax}"] = array.T if transposed else array
        return arrays

    g = torch.Generator().manual_seed(2)
    o, a, b = hp.obs_dim, hp.action_dim, batch_size
    batch = {"observations": torch.randn(b, o, generator=g), "actions": torch.rand(b, a, generator=g) * 1.8 - 0.9,
             "rewards": torch.randn(b, generator=g), "masks": (torch.arange(b) % 3 != 1).float(),
             "next_observations": torch.randn(b, o, generator=g)}
    arrays = {"config_json": json.dumps(config), "config": repr(config), **tree(agent.state_dict(), "params_before"),
              **{f"batch/{k}": v.numpy() for k, v in batch.items()}}
    act_obs = torch.randn(3, o, generator=g)
    act_draws = sample_draws(agent.act_draw_specs(3), g, "cpu")
    act_inter = {}
    agent.act(act_obs, act_draws, act_inter)
    arrays.update({"act/observations": act_obs.numpy(), **{f"act/{k}": v.numpy() for k, v in act_draws.items()},
                   **{k: v.numpy() for k, v in act_inter.items()}})
    chunked = {k: v if k == "observations" else v.unsqueeze(1) for k, v in batch.items()}
    chunked["valid"] = torch.ones(b, 1)
    optimizers = agent.make_optimizers()
    online = {n: p for n, p in agent.named_parameters() if p.requires_grad}
    for prefix, snapshot in (("", "params_after_one_update"), ("step2/", "params_after_two_updates")):
        draws = sample_draws(agent.draw_specs(b), g, "cpu")
        before = {n: p.detach().clone() for n, p in online.items()}
        grads = {}
        metrics, inter = agent.update(optimizers, chunked, draws, on_raw_gradients=lambda: grads.update(
            {n: p.grad.clone() for n, p in online.items() if p.grad is not None}))
        arrays.update({prefix + k: v.numpy() for k, v in {**draws, **inter}.items()
                       if not (prefix and k.startswith("schedule/"))})
        arrays.update({f"{prefix}info/{k}": v.numpy() for k, v in metrics.items() if k != "total_loss"})
        arrays.update(tree(grads, prefix + "grads"))
        for module in ("score_model", "value", "critic"):
            norm = torch.linalg.vector_norm(torch.stack([g_.norm() for n, g_ in grads.items() if n.startswith(module)]))
            arrays[f"{prefix}grad_global_norm/{module}"] = norm.numpy()
        groups = {p: (group, opt) for opt in optimizers.values() for group in opt.param_groups for p in group["params"]}
        updates = {}
        for name, param in online.items():
            group, opt = groups[param]
            state, (b1, b2) = opt.state[param], group["betas"]
            step = float(state["step"])
            updates[name] = -group["lr"] * (state["exp_avg"] / (1 - b1**step) / (
                (state["exp_avg_sq"] / (1 - b2**step)).sqrt() + group["eps"]) + group["weight_decay"] * before[name])
        arrays.update(tree(updates, prefix + "opt_updates"))
        arrays.update(tree(agent.state_dict(), snapshot))
        if not prefix:
            for ours, theirs in (("exp_avg", "mu"), ("exp_avg_sq", "nu")):
                arrays.update(tree({n: groups[p][1].state[p][ours] for n, p in online.items()},
                                   f"adam_after_one_update/{theirs}"))
    np.savez(path, **arrays)


@pytest.mark.parametrize("sizes", [
    dict(obs_dim=4, action_dim=3, actor_num_blocks=1, actor_hidden_dim=6, time_dim=2, value_hidden_dims=(5,),
         num_samples=2, expectile=0.9, discount=0.9, actor_tau=0.3, decay_steps=1),
    dict(obs_dim=2, action_dim=1, actor_num_blocks=3, actor_hidden_dim=4, time_dim=6, value_hidden_dims=(3, 4, 5),
         num_samples=9, expectile=0.6, num_qs=3, value_layer_norm=False),
], ids=["one-block-N2-D1", "three-blocks-A1-E3-no-value-norm"])
def test_checker_reads_every_size_of_the_idql_format_from_the_file(tmp_path, sizes):
    path = tmp_path / "idql_other.npz"
    write_idql_fixture(path, **sizes)
    checks = reference_check.check_fixture(str(path))
    assert not [(c.name, c.error) for c in checks if not c.ok]
    assert any(c.name == "update2/actor_lr" for c in checks) and len(checks) > 100

"""Check our QAM update number by number against fixtures dumped from the official JAX code.

    python -m qam_ray.reference_check FIXTURE.npz [FIXTURE.npz ...]

The fixture format and tolerances are those of shared/fixtures/FIXTURE_FORMAT.md (§7).  Everything
(sizes, variant, hyperparameters) is read from the file's ``config_json``; the fixture's parameters and
random draws are loaded into our modules and two updates are replayed from *our own* state, so errors of
update 1 propagate into update 2 as they would in training.  Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np
import torch

from qam_ray.core.qam import (
    QAMDraws,
    QAMHyperparams,
    QAMNetworks,
    make_optimizer,
    optimization_step,
)

# Official flags the format fixes; a fixture with other values needs code paths QAM's defaults never take.
FIXED_FLAGS = {
    "action_chunking": True, "activation": "gelu_tanh_approximation", "layer_norm_eps": 1e-6, "std_ddof": 0,
    "actor_layer_norm": False, "best_of_n": 1, "target_actor": True, "residual": False, "clip_adj": True,
    "use_target_grad": True, "adam_eps_root": 0.0, "weight_decay": 0.0, "edit_scale": 0.0,
    "step2_uses_same_batch": True,
}
# Official module name → (our module, flax sub-module).  target_actor_fast is never used, so we have none.
MODULES = {
    "critic": "value_net", "target_critic": "value_net", "actor_slow": "mlp", "target_actor_slow": "mlp",
    "actor_fast": "mlp", "one_step_actor": "mlp",
}
UNUSED_MODULES = ("target_actor_fast",)
TARGET_MODULES = ("target_critic", "target_actor_slow")

LOSS_KEYS = {  # fixture scalar → our metric
    "total_loss": "total_loss", "info/critic/critic_loss": "critic_loss", "info/actor/flow_loss": "flow_loss",
    "info/actor/adj_loss": "adj_loss", "info/actor/fast_loss": "adj_loss",
    "info/actor/fql_distill_loss": "fql_distill_loss", "info/actor/fql_q_loss": "fql_q_loss",
}
STAT_KEYS = {
    "info/critic/q_mean": "q_mean", "info/critic/q_max": "q_max", "info/critic/q_min": "q_min",
    "info/actor/adj_max": "adj_max", "info/actor/adj_mean": "adj_mean", "info/actor/adj_std": "adj_std",
}
INTERMEDIATES = (
    "next_actions", "next_qs", "next_v", "target_q", "critic_q", "fm_xt", "fm_pred", "am_xs", "am_ts",
    "am_sigmas", "am_x_final", "am_adj_terminal", "am_adjs", "am_vf_fine", "am_vf_base",
    "fql_flow_actions", "fql_os_actions", "fql_qs",
)
TOL_LOSS, TOL_INTERMEDIATE, TOL_PARAMS, TOL_TARGETS, TOL_ADAM = 1e-5, 1e-4, 1e-5, 5e-7, 1e-4


class FixtureError(ValueError):
    pass


# --------------------------------------------------------------------------------------------------
# Fixture ↔ our modules
# --------------------------------------------------------------------------------------------------
def hyperparams_from_config(config: dict) -> QAMHyperparams:
    wrong = {k: config.get(k) for k, v in FIXED_FLAGS.items() if k in config and config[k] != v}
    if wrong:
        raise FixtureError(f"fixture sets {wrong}; the fixture format fixes them to {FIXED_FLAGS}")
    if config["full_action_dim"] != config["action_dim"] * config["horizon_length"]:
        raise FixtureError("full_action_dim must equal action_dim * horizon_length")
    if config["variant"] != ("QAM-F" if config["fql_alpha"] > 0 else "QAM"):
        raise FixtureError(f"variant {config['variant']!r} does not match fql_alpha={config['fql_alpha']}")
    return QAMHyperparams(
        obs_dim=config["obs_dim"], action_dim=config["action_dim"], horizon_length=config["horizon_length"],
        actor_hidden_dims=tuple(config["actor_hidden_dims"]), value_hidden_dims=tuple(config["value_hidden_dims"]),
        num_qs=config["num_qs"], flow_steps=config["flow_steps"], inv_temp=config["inv_temp"], rho=config["rho"],
        discount=config["discount"], tau=config["tau"], lr=config["lr"], fql_alpha=config["fql_alpha"],
        clip_grad_max_norm=config["clip_grad_max_norm"] if config["clip_grad"] else None,
        value_layer_norm=config["value_layer_norm"],
    )


def flax_path(param_name: str) -> tuple[str, bool]:
    """Our parameter name → (flax path below the snapshot, whether the array is transposed)."""
    module, rest = param_name.split(".", 1)
    prefix = f"modules_{module}/{MODULES[module]}"
    if MODULES[module] == "value_net":  # EnsembleCritic: kernels.i / biases.i / norm_scales.i / norm_biases.i
        kind, index = rest.split(".")
        layer, leaf = {"kernels": ("Dense", "kernel"), "biases": ("Dense", "bias"),
                       "norm_scales": ("LayerNorm", "scale"), "norm_biases": ("LayerNorm", "bias")}[kind]
        return f"{prefix}/{layer}_{index}/{leaf}", False
    _, _, index, leaf = rest.split(".")  # net.layers.i.weight|bias; torch Linear weight = flax kernel.T
    return f"{prefix}/Dense_{index}/{'kernel' if leaf == 'weight' else 'bias'}", leaf == "weight"


def fixture_array(fixture, snapshot: str, param_name: str) -> np.ndarray:
    path, transposed = flax_path(param_name)
    array = fixture[f"{snapshot}/{path}"]
    return array.T if transposed else array


def load_parameters(nets: QAMNetworks, fixture, snapshot: str = "params_before") -> None:
    ours = {name.split(".")[0] for name in nets.state_dict()}
    theirs = {key.split("/")[1].removeprefix("modules_") for key in fixture.files if key.startswith(snapshot + "/")}
    if theirs - ours - set(UNUSED_MODULES) or ours - theirs:
        raise FixtureError(f"module sets differ: fixture {sorted(theirs)}, ours {sorted(ours)}")
    state = {}
    for name, value in nets.state_dict().items():
        array = fixture_array(fixture, snapshot, name)
        if array.shape != tuple(value.shape):
            raise FixtureError(f"{name}: fixture shape {array.shape} != ours {tuple(value.shape)}")
        state[name] = torch.from_numpy(np.ascontiguousarray(array))
    nets.load_state_dict(state)


def load_batch(fixture) -> dict[str, torch.Tensor]:
    keys = ("observations", "actions", "rewards", "masks", "valid", "terminals", "next_observations")
    return {k: torch.from_numpy(fixture[f"batch/{k}"]) for k in keys}


def load_draws(fixture, prefix: str, variant: str) -> QAMDraws:
    def get(key):
        return torch.from_numpy(fixture[prefix + key])

    return QAMDraws(
        target_noise=get("target_noise")[:, 0, :],  # the middle axis is best-of-n = 1
        fm_x0=get("fm_x0"), fm_t=get("fm_t"), am_x0=get("am_x0"), am_noise=get("am_noise"),
        policy_z=get("fql_z") if variant == "QAM-F" else None,
    )


# --------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Check:
    name: str
    metric: str  # "rel" (relative), "maxrel" (max|Δ|/max|ref|) or "abs" (max|Δ|)
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.error < self.tol)  # NaN fails


def compare(name: str, mine, ref, metric: str, tol: float) -> Check:
    mine = np.asarray(mine.detach().cpu() if isinstance(mine, torch.Tensor) else mine, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    mine = np.broadcast_to(mine, ref.shape) if mine.size < ref.size else mine.reshape(ref.shape)
    diff = np.abs(mine - ref).max(initial=0.0)
    if metric == "rel":
        error = diff / max(np.abs(ref).max(), 1e-30)
    elif metric == "maxrel":
        error = diff / max(np.abs(ref).max(initial=0.0), 1e-30)
    else:
        error = diff
    return Check(name, metric, float(error), tol)


def check_fixture(path: str) -> list[Check]:
    fixture = np.load(path)
    config = json.loads(str(fixture["config_json"]))
    hp = hyperparams_from_config(config)
    torch.manual_seed(0)  # init is overwritten by the fixture; seeded only to make the run repeatable
    nets = QAMNetworks(hp)
    load_parameters(nets, fixture)
    optimizer = make_optimizer(nets, hp, betas=(config["adam_b1"], config["adam_b2"]), eps=config["adam_eps"])
    batch = load_batch(fixture)
    online_params = {n: p for n, p in nets.named_parameters() if p.requires_grad}
    checks: list[Check] = []

    for update, prefix in ((1, ""), (2, "step2/")):
        tag = f"update{update}/"
        raw_grads = {}

        def keep_raw_grads():
            raw_grads.update({n: p.grad.clone() for n, p in online_params.items() if p.grad is not None})

        metrics, inter = optimization_step(
            nets, hp, optimizer, batch, load_draws(fixture, prefix, hp.variant), on_raw_gradients=keep_raw_grads
        )
        for ref_key, ours in LOSS_KEYS.items():
            if prefix + ref_key in fixture:
                checks.append(compare(tag + ref_key, metrics[ours], fixture[prefix + ref_key], "rel", TOL_LOSS))
        for ref_key, ours in STAT_KEYS.items():
            checks.append(compare(tag + ref_key, metrics[ours], fixture[prefix + ref_key], "maxrel", TOL_INTERMEDIATE))
        for key in INTERMEDIATES:
            if prefix + key in fixture:
                checks.append(compare(tag + key, inter[key], fixture[prefix + key], "maxrel", TOL_INTERMEDIATE))
        grad_prefix = "grads" if update == 1 else "step2/grads"
        for name, grad in raw_grads.items():
            checks.append(compare(tag + "grads/" + name, grad, fixture_array(fixture, grad_prefix, name), "maxrel", TOL_INTERMEDIATE))
        global_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in raw_grads.values()]))
        checks.append(compare(tag + "grad_global_norm", global_norm, fixture[prefix + "grad_global_norm"], "maxrel", TOL_INTERMEDIATE))

        snapshot = "params_after_one_update" if update == 1 else "params_after_two_updates"
        for name, value in nets.state_dict().items():
            is_target = name.split(".")[0] in TARGET_MODULES
            tol = TOL_TARGETS if is_target else TOL_PARAMS
            checks.append(compare(f"{tag}params/{name}", value, fixture_array(fixture, snapshot, name), "abs", tol))
        if update == 1:
            for name, param in online_params.items():
                state = optimizer.state[param]
                for ours, theirs in (("exp_avg", "mu"), ("exp_avg_sq", "nu")):
                    ref = fixture_array(fixture, f"adam_after_one_update/{theirs}", name)
                    checks.append(compare(f"{tag}adam_{theirs}/{name}", state[ours], ref, "maxrel", TOL_ADAM))
    return checks


def report(path: str, checks: list[Check]) -> bool:
    print(f"== {path}")
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"  {'ok  ' if c.ok else 'FAIL'} {c.name:<{width}}  {c.metric:>6} err {c.error:.2e}  (tol {c.tol:.0e})")
    failed = [c for c in checks if not c.ok]
    groups = {}
    for c in checks:
        group = c.name.split("/")[1] if c.name.split("/")[1] in ("grads", "params", "adam_mu", "adam_nu") else "values"
        key = (group, c.metric)
        groups[key] = max(groups.get(key, 0.0), c.error)
    summary = ", ".join(f"{g} max {m} err {e:.1e}" for (g, m), e in sorted(groups.items()))
    print(f"  {len(checks) - len(failed)}/{len(checks)} checks passed; {summary}")
    return not failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixtures", nargs="+", help="fixture .npz files (FIXTURE_FORMAT.md)")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float32)
    all_ok = True
    for path in args.fixtures:
        try:
            ok = report(path, check_fixture(path))
        except (FixtureError, KeyError, OSError) as exc:
            print(f"== {path}\n  ERROR: {exc}")
            ok = False
        all_ok &= ok
    print("ALL CHECKS PASSED" if all_ok else "SOME CHECKS FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

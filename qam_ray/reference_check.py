"""Check our agents number by number against fixtures dumped from the official JAX code.

    python -m qam_ray.reference_check FIXTURE.npz [FIXTURE.npz ...]

A fixture's ``config_json`` names its agent (``agent``; QAM's own format has only ``variant``) and gives every size
and hyperparameter.  The fixture's parameters and random draws are loaded into our agent, the acting path (where
the fixture has one) runs on the initial parameters, and two updates are replayed from *our own* state, so
errors of update 1 propagate into update 2 as they would in training.  Compared: every logged scalar, every
intermediate, every raw gradient and the global norm, every parameter after each update (targets under a
stricter tolerance), and Adam's moments after update 1.  Every array of the fixture must be compared and every
intermediate our port produces must be in the fixture: a fixture with a key removed, or one we do not read, fails.

Tolerances are those of the fixture's format document (one per family; the ``FORMATS`` table).  Exit status 1 if
any check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

import numpy as np
import torch

from qam_ray.agents import agent_classes
from qam_ray.agents.base import Agent, field_names


class FixtureError(ValueError):
    pass


# --------------------------------------------------------------------------------------------------
# Tolerances of each fixture format
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tolerances:
    loss: float = 1e-5  # relative error of loss scalars
    stat: float = 1e-4  # logged statistics (q_mean, …)
    stat_floor: float = 0.0  # stats use |Δ| / max(|ref|, stat_floor) (0: plain relative error)
    intermediate: float = 1e-4  # max|Δ| / max|ref|
    grad: float = 1e-4  # per array, max|Δ| / max(max|ref|, grad_floor · largest gradient element of the tree)
    grad_floor: float = 0.0
    params: float = 1e-5  # max abs error of online parameters after each update
    targets: float = 5e-7  # max abs error of target parameters after each update
    adam: float = 1e-4  # Adam moments after update 1, max|Δ| / max|ref|


FORMATS = {  # an agent's FIXTURE_FORMAT names its family's format document
    "qam": Tolerances(),  # FIXTURE_FORMAT.md §7
    "baselines": Tolerances(stat_floor=1.0, grad_floor=1e-3),  # FIXTURE_FORMAT_BASELINES.md §10
    "baselines2": Tolerances(stat_floor=1.0, grad_floor=1e-3),  # FIXTURE_FORMAT_BASELINES2.md §11
}
BATCH_KEYS = ("observations", "actions", "rewards", "masks", "valid", "terminals", "next_observations")


# --------------------------------------------------------------------------------------------------
# Fixture ↔ our agent
# --------------------------------------------------------------------------------------------------
def fixture_agent(config: dict) -> type[Agent]:
    agents = agent_classes()
    name = config.get("agent") or ("qam" if config.get("variant") in ("QAM", "QAM-F") else None)
    ported = {n: a for n, a in agents.items() if a.FIXTURE_FORMAT in FORMATS}
    if name not in ported:
        raise FixtureError(f"fixture agent {config.get('agent')!r} (variant {config.get('variant')!r}) is not "
                           f"one we port; known agents: {', '.join(sorted(ported))}")
    return ported[name]


def hyperparams_from_config(agent: type[Agent], config: dict):
    wrong = {k: config[k] for k, v in agent.FIXTURE_FIXED_FLAGS.items() if k in config and config[k] != v}
    if wrong:
        raise FixtureError(f"fixture sets {wrong}; the {agent.name} port implements only {agent.FIXTURE_FIXED_FLAGS}")
    if config["full_action_dim"] != config["action_dim"] * config["horizon_length"]:
        raise FixtureError("full_action_dim must equal action_dim * horizon_length")
    values = {name: config[name] for name in field_names(agent.Hyperparams)
              if name in config and name != "clip_grad_max_norm"}
    values["clip_grad_max_norm"] = config["clip_grad_max_norm"] if config["clip_grad"] else None
    try:
        hp = agent.Hyperparams(**values)
    except (TypeError, ValueError) as exc:
        raise FixtureError(f"config_json does not make valid {agent.Hyperparams.__name__}: {exc}") from None
    variant = getattr(hp, "variant", config.get("variant"))
    if config.get("variant") != variant:
        raise FixtureError(f"variant {config.get('variant')!r} does not match the hyperparameters ({variant})")
    return hp


_ENSEMBLE_LEAF = re.compile(r"(kernels|biases|norm_scales|norm_biases)\.(\d+)$")
_MLP_LEAF = re.compile(r"(layers|norms)\.(\d+)\.(weight|bias)$")


def flax_path(param_name: str, subs: dict[str, str]) -> tuple[str, bool]:
    """Our parameter name → (flax path below a snapshot, whether the array is transposed).

    Ensemble critics store the flax layout already (kernels (E, in, out)); MLP layers are ``nn.Linear`` (weight =
    kernel transposed) with ``LayerNorm`` weight/bias = flax scale/bias.  ``subs`` maps a module to the flax
    sub-module name the fixture uses under it (``value_net`` or ``mlp``).
    """
    module, rest = param_name.split(".", 1) if "." in param_name else (param_name, "")
    if module not in subs:
        raise FixtureError(f"our parameter {param_name!r} has no module in the fixture")
    prefix = f"modules_{module}/{subs[module]}"
    match = _ENSEMBLE_LEAF.search(rest)
    if match:
        layer, leaf = {"kernels": ("Dense", "kernel"), "biases": ("Dense", "bias"),
                       "norm_scales": ("LayerNorm", "scale"), "norm_biases": ("LayerNorm", "bias")}[match[1]]
        return f"{prefix}/{layer}_{match[2]}/{leaf}", False
    match = _MLP_LEAF.search(rest)
    if match:
        layer = "Dense" if match[1] == "layers" else "LayerNorm"
        leaf = {"Dense": {"weight": "kernel", "bias": "bias"}, "LayerNorm": {"weight": "scale", "bias": "bias"}}
        return f"{prefix}/{layer}_{match[2]}/{leaf[layer][match[3]]}", layer == "Dense" and match[3] == "weight"
    raise FixtureError(f"no flax layout known for our parameter {param_name!r}")


class Fixture:
    """The .npz with bookkeeping of which arrays were compared (all of them must be)."""

    def __init__(self, path: str):
        self.data = np.load(path)
        self.config = json.loads(str(self.data["config_json"]))
        self.unread = set(self.data.files) - {"config_json", "config"}

    def __contains__(self, key: str) -> bool:
        return key in self.data.files

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.data.files:
            raise FixtureError(f"fixture has no array {key!r}")
        self.unread.discard(key)
        return self.data[key]

    def tensor(self, key: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self[key]))

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.data.files if k.startswith(prefix)]

    def module_subs(self, snapshot: str) -> dict[str, str]:
        return {key.split("/")[1].removeprefix("modules_"): key.split("/")[2] for key in self.keys(snapshot + "/")}

    def param(self, snapshot: str, name: str, subs: dict[str, str]) -> np.ndarray:
        path, transposed = flax_path(name, subs)
        array = self[f"{snapshot}/{path}"]
        return array.T if transposed else array


def load_parameters(agent: Agent, fixture: Fixture, snapshot: str = "params_before") -> dict[str, str]:
    subs = fixture.module_subs(snapshot)
    ours = {name.split(".")[0] for name in agent.state_dict()}
    if set(subs) - ours - set(agent.FIXTURE_UNUSED_MODULES) or ours - set(subs):
        raise FixtureError(f"module sets differ: fixture {sorted(subs)}, ours {sorted(ours)}")
    state = {}
    for name, value in agent.state_dict().items():
        array = fixture.param(snapshot, name, subs)
        if array.shape != tuple(value.shape):
            raise FixtureError(f"{name}: fixture shape {array.shape} != ours {tuple(value.shape)}")
        state[name] = torch.from_numpy(np.ascontiguousarray(array))
    agent.load_state_dict(state)
    return subs


def load_draws(fixture: Fixture, prefix: str, specs: dict) -> dict[str, torch.Tensor]:
    draws = {}
    for name, (_, shape) in specs.items():
        draws[name] = fixture.tensor(prefix + name)
        if tuple(draws[name].shape) != tuple(shape):
            raise FixtureError(f"draw {prefix + name} has shape {tuple(draws[name].shape)}, the config implies {shape}")
    return draws


# --------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Check:
    name: str
    metric: str  # "rel", "maxrel", "abs", "floor" (|Δ| / max(|ref|, floor)) or "exact"
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.error < self.tol) if self.metric != "exact" else self.error == 0  # NaN fails


def as_array(value) -> np.ndarray:
    return np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)


def compare(name: str, mine, ref, metric: str, tol: float, floor: float = 0.0) -> Check:
    mine, ref = as_array(mine), as_array(ref)
    try:  # same elements in another layout, or a broadcastable constant (e.g. a (K, 1, 1) time grid)
        mine = mine.reshape(ref.shape) if mine.size == ref.size else np.broadcast_to(mine, ref.shape)
    except ValueError:
        return Check(f"{name} (shape {mine.shape} vs fixture {ref.shape})", metric, float("inf"), tol)
    diff = np.abs(mine - ref).max(initial=0.0)
    scale = {"rel": np.abs(ref).max(initial=0.0), "maxrel": np.abs(ref).max(initial=0.0),
             "floor": max(np.abs(ref).max(initial=0.0), floor), "abs": 1.0, "exact": 1.0}[metric]
    return Check(name, metric, float(diff / max(scale, 1e-30)), tol)


def missing(name: str) -> Check:
    return Check(name, "exact", float("inf"), 0.0)


def check_fixture(path: str) -> list[Check]:
    fixture = Fixture(path)
    agent_cls = fixture_agent(fixture.config)
    tol = FORMATS[agent_cls.FIXTURE_FORMAT]
    hp = hyperparams_from_config(agent_cls, fixture.config)
    torch.manual_seed(0)  # the initialisation is overwritten by the fixture; seeded only for repeatability
    agent = agent_cls(hp)
    subs = load_parameters(agent, fixture)
    for module in agent.FIXTURE_UNUSED_MODULES:  # in the official tree, never used: nothing of ours to compare
        for key in fixture.keys(""):
            if f"/modules_{module}/" in key:
                fixture.unread.discard(key)
    config = fixture.config
    optimizers = agent.make_optimizers(betas=(config["adam_b1"], config["adam_b2"]), eps=config["adam_eps"])
    batch = {k: fixture.tensor(f"batch/{k}") for k in BATCH_KEYS}
    checks = check_acting(agent, fixture, tol) if "act/observations" in fixture else []
    online = {n: p for n, p in agent.named_parameters() if p.requires_grad}

    for update, prefix in ((1, ""), (2, "step2/")):
        tag = f"update{update}/"
        raw_grads = {}

        def keep_raw_grads():
            raw_grads.update({n: p.grad.clone() for n, p in online.items() if p.grad is not None})

        draws = load_draws(fixture, prefix, agent.draw_specs(batch["observations"].shape[0]))
        # Per-update switches the fixture records as lists (e.g. ReBRAC's full_update), entry i for update i.
        options = {key: config[key][update - 1] for key in agent.FIXTURE_PER_UPDATE}
        metrics, inter = agent.update(optimizers, batch, draws, on_raw_gradients=keep_raw_grads, **options)
        checks += check_scalars(fixture, prefix, tag, metrics, agent_cls.FIXTURE_METRIC_ALIASES, tol)
        checks += check_intermediates(fixture, prefix, tag, inter, tol)

        grad_snapshot = "grads" if update == 1 else "step2/grads"
        refs = {name: fixture.param(grad_snapshot, name, subs) for name in online}
        largest = max(np.abs(r).max(initial=0.0) for r in refs.values())
        for name in online:
            if name not in raw_grads:
                checks.append(missing(f"{tag}grads/{name} (our port gives it no gradient)"))
                continue
            checks.append(compare(f"{tag}grads/{name}", raw_grads[name], refs[name], "floor", tol.grad,
                                  floor=tol.grad_floor * largest))
        checks += check_gradient_statistics(fixture, prefix, tag, list(raw_grads.values()), tol)
        for name in fixture.keys(grad_snapshot + "/"):  # the targets' zero gradients
            fixture.unread.discard(name)

        snapshot = "params_after_one_update" if update == 1 else "params_after_two_updates"
        for name, value in agent.state_dict().items():
            is_target = name.split(".")[0] in agent_cls.TARGETS
            checks.append(compare(f"{tag}params/{name}", value, fixture.param(snapshot, name, subs), "abs",
                                  tol.targets if is_target else tol.params))
        if update == 1:
            states = {p: opt.state[p] for opt in optimizers.values() for g in opt.param_groups for p in g["params"]}
            for name, param in online.items():
                state = states[param]
                for ours, theirs in (("exp_avg", "mu"), ("exp_avg_sq", "nu")):
                    ref = fixture.param(f"adam_after_one_update/{theirs}", name, subs)
                    checks.append(compare(f"{tag}adam_{theirs}/{name}", state[ours], ref, "maxrel", tol.adam))
            for name in fixture.keys("adam_after_one_update/"):  # the targets' zero moments
                fixture.unread.discard(name)
    for key in fixture.keys("params_before/"):
        fixture.unread.discard(key)
    checks += [missing(f"fixture/{key} (not compared by our check)") for key in sorted(fixture.unread)]
    return checks


def check_scalars(fixture: Fixture, prefix: str, tag: str, metrics: dict, aliases: dict, tol: Tolerances) -> list:
    """``total_loss`` and every logged ``info/<group>/<name>`` scalar; ``update_info/`` repeats them (read, not
    compared, as the format documents advise)."""
    checks = []
    if prefix + "total_loss" not in fixture:
        return [missing(f"{tag}total_loss (absent from the fixture)")]
    for key in ["total_loss"] + [k[len(prefix):] for k in fixture.keys(prefix + "info/")]:
        name = key.rsplit("/", 1)[-1]
        ours = metrics.get(aliases.get(name, name))
        if ours is None:
            checks.append(missing(f"{tag}{key} (our port does not log {name})"))
        elif name.endswith("loss"):
            checks.append(compare(tag + key, ours, fixture[prefix + key], "rel", tol.loss))
        else:
            checks.append(compare(tag + key, ours, fixture[prefix + key], "floor", tol.stat, floor=tol.stat_floor))
    # update_info/ repeats info/ (the scalars as logged inside the jitted update): the two sets must agree.
    logged = {k[len(prefix + "info/"):] for k in fixture.keys(prefix + "info/")}
    repeated = {k[len(prefix + "update_info/"):] for k in fixture.keys(prefix + "update_info/")} - set(GRAD_STATISTICS)
    for key in sorted(logged ^ repeated):
        checks.append(missing(f"{tag}info/{key} (in only one of info/ and update_info/)"))
    for key in fixture.keys(prefix + "update_info/"):
        if key[len(prefix + "update_info/"):] not in GRAD_STATISTICS:
            fixture.unread.discard(key)
    return checks


GRAD_STATISTICS = ("grad/max", "grad/min", "grad/norm")


def check_gradient_statistics(fixture: Fixture, prefix: str, tag: str, grads: list[torch.Tensor],
                              tol: Tolerances) -> list[Check]:
    """The global norm √Σg², and the official log's max / min element and Σ‖g‖ per array over the whole tree
    (whose target modules have zero gradients)."""
    if not grads:
        return [missing(f"{tag}grad_global_norm (our port computed no gradient)")]
    norms = torch.stack([g.norm() for g in grads])
    values = {"grad_global_norm": torch.linalg.vector_norm(norms),
              "update_info/grad/norm": norms.sum(),
              "update_info/grad/max": torch.stack([g.max() for g in grads]).max().clamp(min=0.0),
              "update_info/grad/min": torch.stack([g.min() for g in grads]).min().clamp(max=0.0)}
    return [compare(tag + key, value, fixture[prefix + key], "rel", tol.intermediate)
            for key, value in values.items() if key == "grad_global_norm" or prefix + key in fixture]


def check_intermediates(fixture: Fixture, prefix: str, tag: str, inter: dict, tol: Tolerances) -> list:
    """Our intermediates and the fixture's must be the same set."""
    checks = []
    for name, value in inter.items():
        if prefix + name in fixture:
            checks.append(compare(tag + name, value, fixture[prefix + name], "maxrel", tol.intermediate))
        else:
            checks.append(missing(f"{tag}{name} (absent from the fixture)"))
    return checks


def check_acting(agent: Agent, fixture: Fixture, tol: Tolerances) -> list[Check]:
    """The acting path on the initial parameters: every ``act/`` array, the chosen indices exactly."""
    obs = fixture.tensor("act/observations")
    draws = load_draws(fixture, "act/", agent.act_draw_specs(obs.shape[0]))
    inter: dict = {}
    agent.act(obs, draws, intermediates=inter)
    checks = []
    for key in fixture.keys("act/"):
        if key in ("act/observations",) or key.removeprefix("act/") in draws:
            continue
        if key not in inter:
            checks.append(missing(f"acting/{key} (our acting path does not produce it)"))
        elif key.endswith("_index"):
            checks.append(compare(f"acting/{key}", inter[key], fixture[key], "exact", 0.0))
        else:
            checks.append(compare(f"acting/{key}", inter[key], fixture[key], "maxrel", tol.intermediate))
    return checks


def report(path: str, checks: list[Check]) -> bool:
    print(f"== {path}")
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"  {'ok  ' if c.ok else 'FAIL'} {c.name:<{width}}  {c.metric:>6} err {c.error:.2e}  (tol {c.tol:.0e})")
    failed = [c for c in checks if not c.ok]
    groups = {}
    for c in checks:
        parts = c.name.split("/")
        group = parts[1] if len(parts) > 1 and parts[1] in ("grads", "params", "adam_mu", "adam_nu") else parts[0] \
            if parts[0] == "acting" else "values"
        groups[(group, c.metric)] = max(groups.get((group, c.metric), 0.0), c.error)
    summary = ", ".join(f"{g} max {m} err {e:.1e}" for (g, m), e in sorted(groups.items()))
    print(f"  {len(checks) - len(failed)}/{len(checks)} checks passed; {summary}")
    return not failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixtures", nargs="+", help="fixture .npz files (e.g. tests/fixtures/*.npz)")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float32)
    all_ok = True
    for path in args.fixtures:
        try:
            ok = report(path, check_fixture(path))
        except (FixtureError, KeyError, OSError, ValueError) as exc:
            print(f"== {path}\n  ERROR: {exc}")
            ok = False
        all_ok &= ok
    print("ALL CHECKS PASSED" if all_ok else "SOME CHECKS FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

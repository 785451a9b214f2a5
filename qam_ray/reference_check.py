"""Check our agents number by number against fixtures dumped from the official JAX code.

    python -m qam_ray.reference_check FIXTURE.npz [FIXTURE.npz ...] [--compile MODE] [--device cuda]

A fixture's ``config_json`` names its agent (``agent``; QAM's own format has only ``variant``) and gives every size
and hyperparameter.  The fixture's parameters and random draws are loaded into our agent, the acting path (where
the fixture has one) runs on the initial parameters, and two updates are replayed from *our own* state, so
errors of update 1 propagate into update 2 as they would in training.  Compared: every logged scalar, every
intermediate, every raw gradient and the global norm, every parameter after each update (targets under a
stricter tolerance), and Adam's moments after update 1.  Every array of the fixture must be compared and every
intermediate our port produces must be in the fixture: a fixture with a key removed, or one we do not read, fails.

Tolerances are those of the fixture's format document (one per family; the ``FORMATS`` table).  Exit status 1 if
any check fails.  ``--compile`` runs the agent's losses under that ``torch.compile`` mode (``qam_ray.core.compile``)
and ``--device`` runs the agent there, with TF32 off on CUDA: the same tolerances hold in every mode.
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
from qam_ray.core.compile import COMPILE_MODES, disable_tf32


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
    probe: float = 1e-4  # standalone computations on the initial parameters (FIXTURE_PROBES), max|Δ| / max|ref|
    acting: float = 1e-4  # act/ arrays, max|Δ| / max|ref|
    # Scalar intermediates named *loss (the losses of a format without info/ copies of each) and *_lr (learning
    # rates an update used), relative; None: compared as any other intermediate.
    loss_intermediate: float | None = None
    lr: float | None = None
    opt_updates: float = 3e-5  # optimiser update vectors u (opt_updates/), per array max|Δ| / max|ref|


FORMATS = {  # an agent's FIXTURE_FORMAT names its family's format document
    "qam": Tolerances(),  # FIXTURE_FORMAT.md §7
    "baselines": Tolerances(stat_floor=1.0, grad_floor=1e-3),  # FIXTURE_FORMAT_BASELINES.md §10
    "baselines2": Tolerances(stat_floor=1.0, grad_floor=1e-3),  # FIXTURE_FORMAT_BASELINES2.md §11
    "sacflow": Tolerances(stat=1e-5, stat_floor=1.0, grad_floor=1e-3, probe=1e-5),  # FIXTURE_FORMAT_SACFLOW.md §11
    "idql": Tolerances(stat_floor=1.0, grad_floor=1e-3, acting=1e-5, loss_intermediate=1e-5, lr=1e-6),  # FIXTURE_FORMAT_IDQL.md §10
}
BATCH_KEYS = ("observations", "actions", "rewards", "masks", "valid", "terminals", "next_observations")


# --------------------------------------------------------------------------------------------------
# Fixture ↔ our agent
# --------------------------------------------------------------------------------------------------
def fixture_agent(config: dict) -> type[Agent]:
    agents = agent_classes()
    name = config.get("agent") or ("qam" if config.get("variant") in ("QAM", "QAM-F") else None)
    ported = {n: a for n, a in agents.items() if a.FIXTURE_FORMAT in FORMATS}
    ported.update({official: a for a in list(ported.values()) for official in a.FIXTURE_AGENTS})
    if name not in ported:
        raise FixtureError(f"fixture agent {config.get('agent')!r} (variant {config.get('variant')!r}) is not "
                           f"one we port; known agents: {', '.join(sorted(ported))}")
    return ported[name]


def hyperparams_from_config(agent: type[Agent], config: dict):
    wrong = {k: config[k] for k, v in agent.FIXTURE_FIXED_FLAGS.items() if k in config and config[k] != v}
    if wrong:
        raise FixtureError(f"fixture sets {wrong}; the {agent.name} port implements only {agent.FIXTURE_FIXED_FLAGS}")
    if "full_action_dim" in config and config["full_action_dim"] != config["action_dim"] * config["horizon_length"]:
        raise FixtureError("full_action_dim must equal action_dim * horizon_length")
    keys = {name: agent.FIXTURE_CONFIG_NAMES.get(name, name) for name in field_names(agent.Hyperparams)}
    values = {name: config[key] for name, key in keys.items() if key in config and name != "clip_grad_max_norm"}
    values.setdefault("horizon_length", 1)  # a format without action chunks (IDQL's) is single-step
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


def official_names(agent: Agent) -> dict[str, str]:
    """Our parameter name → the same name with each sub-module a network class renames in ``FLAX_NAMES`` under its
    official name (e.g. ``edit_actor.trunk.layers.0.weight`` → ``edit_actor.MLP_0.layers.0.weight``), at every
    level of nesting (a renamed module inside a renamed module; the agent itself may rename a top-level module)."""
    modules = dict(agent.named_modules())
    names = {}
    for name in agent.state_dict():
        parts, official, i = name.split("."), [], 0
        while i < len(parts):  # parts[:i] is the module (ours) that owns the next segments
            flax_names = getattr(modules.get(".".join(parts[:i])), "FLAX_NAMES", {})
            j = next((j for j in range(len(parts), i, -1) if ".".join(parts[i:j]) in flax_names), None)
            official.append(flax_names[".".join(parts[i:j])] if j else parts[i])
            i = j or i + 1
        names[name] = ".".join(official)
    return names


def flax_path(param_name: str, subs: dict[str, str | tuple[str, ...]]) -> tuple[str, bool]:
    """Our parameter name (official sub-module names, see ``official_names``) → (flax path below a snapshot,
    whether the array is transposed).

    Ensemble critics store the flax layout already (kernels (E, in, out)); MLP layers are ``nn.Linear`` (weight =
    kernel transposed) with ``LayerNorm`` weight/bias = flax scale/bias.  ``subs`` maps a module to the flax
    sub-module name the fixture uses under it (``value_net`` or ``mlp``), or to the tuple of names of a module
    with several (an actor's ``MLP_0`` and output heads, ``alpha``'s ``log_value``): our name then starts with one.
    """
    module, rest = param_name.split(".", 1) if "." in param_name else (param_name, "")
    if module not in subs:
        raise FixtureError(f"our parameter {param_name!r} has no module in the fixture")
    sub = subs[module]
    if isinstance(sub, tuple):
        sub, _, rest = rest.partition(".")
        if sub not in subs[module]:
            raise FixtureError(f"our parameter {param_name!r}: no sub-module {sub!r} in the fixture's {subs[module]}")
    prefix = f"modules_{module}/{sub}"
    if not rest:  # a bare leaf (a scalar like alpha's log_value)
        return prefix, False
    if rest in ("weight", "bias"):  # an nn.Linear directly under the sub-module (an output head)
        return f"{prefix}/{'kernel' if rest == 'weight' else 'bias'}", rest == "weight"
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
    *inner, leaf = rest.split(".")
    if leaf == "kernel":  # a parameter we store in the flax layout already (a Fourier or an ensemble kernel)
        return "/".join([prefix, *inner, leaf]), False
    if leaf in ("weight", "bias"):  # an nn.Linear or LayerNorm deeper down, under its official (flax) name: a
        norm = inner[-1].startswith("LayerNorm")  # LayerNorm_i holds scale/bias, every other layer kernel/bias
        flax_leaf = "bias" if leaf == "bias" else "scale" if norm else "kernel"
        return f"{prefix}/{'/'.join(inner)}/{flax_leaf}", flax_leaf == "kernel"
    raise FixtureError(f"no flax layout known for our parameter {param_name!r}")


class Fixture:
    """The .npz with bookkeeping of which arrays were compared (all of them must be)."""

    def __init__(self, path: str, device: str = "cpu"):
        self.device = torch.device(device)  # where tensor() puts inputs (the agent's device)
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
        return torch.from_numpy(np.ascontiguousarray(self[key])).to(self.device)

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.data.files if k.startswith(prefix)]

    def module_subs(self, snapshot: str) -> dict[str, str | tuple[str, ...]]:
        """Module → its one flax sub-module, or the sorted tuple of them where it has several (see flax_path)."""
        subs: dict[str, set[str]] = {}
        for key in self.keys(snapshot + "/"):
            subs.setdefault(key.split("/")[1].removeprefix("modules_"), set()).add(key.split("/")[2])
        return {module: names.pop() if len(names) == 1 and "/" in self._below(snapshot, module)
                else tuple(sorted(names)) for module, names in subs.items()}

    def _below(self, snapshot: str, module: str) -> str:
        """The path below ``modules_<module>/`` (or ``<module>/``, a leaf beside the modules such as SAC Flow's
        ``alpha/log_ent_coef``) of one of its arrays (a single bare leaf has no '/')."""
        keys = self.keys(f"{snapshot}/modules_{module}/") or self.keys(f"{snapshot}/{module}/")
        return keys[0].split("/", 2)[2]

    official_names: dict[str, str] = {}  # set by load_parameters: our parameter names in official spelling

    def param(self, snapshot: str, name: str, subs: dict[str, str | tuple[str, ...]]) -> np.ndarray:
        path, transposed = flax_path(self.official_names.get(name, name), subs)
        beside = path.removeprefix("modules_")  # a leaf the official tree keeps beside `modules`
        array = self[f"{snapshot}/{path}" if f"{snapshot}/{path}" in self or f"{snapshot}/{beside}" not in self
                     else f"{snapshot}/{beside}"]
        return array.T if transposed else array


def load_parameters(agent: Agent, fixture: Fixture, snapshot: str = "params_before") -> dict[str, str]:
    subs = fixture.module_subs(snapshot)
    fixture.official_names = official_names(agent)
    ours = {name.split(".")[0] for name in fixture.official_names.values()}
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


def check_fixture(path: str, compile: str = "none", device: str = "cpu") -> list[Check]:
    fixture = Fixture(path, device)
    agent_cls = fixture_agent(fixture.config)
    tol = FORMATS[agent_cls.FIXTURE_FORMAT]
    hp = hyperparams_from_config(agent_cls, fixture.config)
    agent, optimizers, subs = start_from_fixture(agent_cls, hp, fixture, compile)
    for module in agent.FIXTURE_UNUSED_MODULES:  # in the official tree, never used: nothing of ours to compare
        for key in fixture.keys(""):
            if f"/modules_{module}/" in key:
                fixture.unread.discard(key)
    config = fixture.config
    batch = fixture_batch(fixture)
    checks = check_acting(agent, fixture, tol) if "act/observations" in fixture else []
    checks += check_probes(agent, fixture, tol)
    if "init_spec" in fixture.config:
        checks += check_initialiser(agent_cls, hp, fixture, subs)

    for update, prefix in ((1, ""), (2, "step2/")):
        # Per-update switches the fixture records as lists (e.g. ReBRAC's full_update), entry i for update i.
        options = {key: config[key][update - 1] for key in agent.FIXTURE_PER_UPDATE}
        snapshots = (("grads", "params_after_one_update", "adam_after_one_update") if update == 1 else
                     ("step2/grads", "params_after_two_updates", None))
        checks += check_update(agent, optimizers, subs, fixture, batch, prefix, f"update{update}/", snapshots,
                               agent.FIXTURE_UPDATE_KWARGS, options, tol)
    for prefix, kwargs in agent.FIXTURE_EXTRA_UPDATES.items():  # e.g. SAC Flow's offline `update`
        agent, optimizers, subs = start_from_fixture(agent_cls, hp, fixture, compile)
        snapshots = (f"{prefix}grads", f"{prefix}params_after", f"{prefix}adam_after")
        checks += check_update(agent, optimizers, subs, fixture, batch, prefix, prefix, snapshots, kwargs, {}, tol)
    for key in fixture.keys("params_before/"):
        fixture.unread.discard(key)
    checks += [missing(f"fixture/{key} (not compared by our check)") for key in sorted(fixture.unread)]
    return checks


def fixture_batch(fixture: Fixture) -> dict[str, torch.Tensor]:
    """The fixture's batch in our chunked layout.  A single-step format (no ``horizon_length`` in config_json, no
    ``valid``) gets a chunk axis of length 1, every chunk valid."""
    if "horizon_length" in fixture.config:
        return {k: fixture.tensor(f"batch/{k}") for k in BATCH_KEYS}
    batch = {k: fixture.tensor(f"batch/{k}") for k in ("observations", "actions", "rewards", "masks",
                                                       "next_observations")}
    batch = {k: v if k == "observations" else v.unsqueeze(1) for k, v in batch.items()}
    return {**batch, "valid": torch.ones_like(batch["rewards"])}


def start_from_fixture(agent_cls: type[Agent], hp, fixture: Fixture, compile: str = "none"):
    """Our agent on the fixture's device with the fixture's initial parameters, fresh optimisers and its losses
    compiled in mode ``compile``: (agent, optimizers, subs)."""
    torch.manual_seed(0)  # the initialisation is overwritten by the fixture; seeded only for repeatability
    agent = agent_cls(hp)
    subs = load_parameters(agent, fixture)
    agent.to(fixture.device)
    config = fixture.config
    optimizers = agent.make_optimizers(betas=(config["adam_b1"], config["adam_b2"]), eps=config["adam_eps"])
    agent.compile_losses(compile)
    return agent, optimizers, subs


def check_update(agent: Agent, optimizers: dict, subs: dict, fixture: Fixture, batch: dict, prefix: str, tag: str,
                 snapshots: tuple[str, str, str | None], kwargs: dict, options: dict, tol: Tolerances) -> list[Check]:
    """One update from our current state: its draws, scalars and intermediates under ``prefix``, the raw gradients,
    the parameters after it and (where the fixture has them) the Adam moments and step counts, under
    ``snapshots`` = (gradients, parameters, Adam state or None).  ``kwargs`` go to ``draw_specs`` and ``update``,
    ``options`` to ``update`` only."""
    grad_snapshot, param_snapshot, adam_snapshot = snapshots
    online = {n: p for n, p in agent.named_parameters() if p.requires_grad}
    raw_grads = {}

    def keep_raw_grads():
        raw_grads.update({n: p.grad.clone() for n, p in online.items() if p.grad is not None})

    draws = load_draws(fixture, prefix, agent.draw_specs(batch["observations"].shape[0], **kwargs))
    before = {n: p.detach().clone() for n, p in online.items()}
    metrics, inter = agent.update(optimizers, batch, draws, on_raw_gradients=keep_raw_grads, **kwargs, **options)
    official = {k: v for k, v in metrics.items() if k not in agent.FIXTURE_UNOFFICIAL_METRICS}
    checks = check_scalars(fixture, prefix, tag, official, agent.FIXTURE_METRIC_ALIASES, tol)
    checks += check_intermediates(fixture, prefix, tag, inter, tol)
    if prefix + "total_loss_official" in fixture:  # the official loss function's total on the same state
        checks.append(compare(f"{tag}total_loss_official", metrics["total_loss"],
                              fixture[prefix + "total_loss_official"], "rel", tol.loss))

    refs = {name: fixture.param(grad_snapshot, name, subs) for name in online}
    # The gradient floor is relative to the largest element of the parameter's own optimiser's tree.
    tree_of = {p: name for name, opt in optimizers.items() for g in opt.param_groups for p in g["params"]}
    largest = {}
    for name, param in online.items():
        tree = tree_of.get(param)
        largest[tree] = max(largest.get(tree, 0.0), np.abs(refs[name]).max(initial=0.0))
    for name, param in online.items():
        if name not in raw_grads:
            checks.append(missing(f"{tag}grads/{name} (our port gives it no gradient)"))
            continue
        checks.append(compare(f"{tag}grads/{name}", raw_grads[name], refs[name], "floor", tol.grad,
                              floor=tol.grad_floor * largest[tree_of.get(param)]))
    checks += check_module_grad_norms(fixture, prefix, tag, raw_grads, tol)
    checks += check_update_vectors(fixture, prefix, tag, optimizers, online, before, subs, tol)
    network_grads = [g for n, g in raw_grads.items() if n.split(".")[0] not in agent.FIXTURE_NORM_EXCLUDED_MODULES]
    checks += check_gradient_statistics(fixture, prefix, tag, network_grads, tol)
    for name in fixture.keys(grad_snapshot + "/"):  # the targets' zero gradients
        fixture.unread.discard(name)

    for name, value in agent.state_dict().items():
        is_target = name.split(".")[0] in agent.TARGETS
        checks.append(compare(f"{tag}params/{name}", value, fixture.param(param_snapshot, name, subs), "abs",
                              tol.targets if is_target else tol.params))
    if adam_snapshot is not None:
        states = {p: opt.state[p] for opt in optimizers.values() for g in opt.param_groups for p in g["params"]}
        for name, param in online.items():
            state = states[param]
            for ours, theirs in (("exp_avg", "mu"), ("exp_avg_sq", "nu")):
                ref = fixture.param(f"{adam_snapshot}/{theirs}", name, subs)
                checks.append(compare(f"{tag}adam_{theirs}/{name}", state[ours], ref, "maxrel", tol.adam))
        for key in fixture.keys(adam_snapshot + "/"):
            counter = key.removeprefix(adam_snapshot + "/")  # `count` of "adam", `<name>_count` of optimiser <name>
            optimizer = optimizers.get("adam" if counter == "count" else counter.removesuffix("_count"))
            if counter.endswith("count") and optimizer is not None:
                step = optimizer.state[optimizer.param_groups[0]["params"][0]]["step"]
                checks.append(compare(f"{tag}adam_{counter}", step, fixture[key], "exact", 0.0))
            fixture.unread.discard(key)  # the targets' zero moments
    return checks


def check_initialiser(agent_cls: type[Agent], hp, fixture: Fixture, subs: dict) -> list[Check]:
    """Our own initialiser against the fixture's ``init_spec`` (the fixture starts from given parameters, so an init
    mistake shows nowhere else): every constant leaf bit-identical to its value and to ``params_before`` (a target,
    perturbed there, must equal the copy of its online module), every random leaf within its bound and, where it
    has 100 elements or more, with the spread of its distribution; every entry of the spec is one of our leaves."""
    spec = fixture.config["init_spec"]
    torch.manual_seed(0)
    agent = agent_cls(hp)
    names = official_names(agent)
    checks, covered = [], set()
    for name, value in agent.state_dict().items():
        path, transposed = flax_path(names[name], subs)
        key = path if path in spec else path.removeprefix("modules_")
        if key not in spec:
            checks.append(missing(f"init/{name} (no init_spec entry {path})"))
            continue
        covered.add(key)
        ours, rule = as_array(value.T if transposed else value), spec[key]
        if rule["kind"] == "constant":
            expected = np.full(ours.shape, np.float32(rule["value"]))
            checks.append(compare(f"init/{name}", ours, expected, "exact", 0.0))
            if name.split(".")[0] not in agent.TARGETS:
                checks.append(compare(f"init/params_before/{name}", fixture.param("params_before", name, subs),
                                      expected, "exact", 0.0))
            continue
        bound = rule["bound"]
        checks.append(Check(f"init/{name} (|w| / bound)", "bound", float(np.abs(ours).max() / bound), 1.0 + 1e-6))
        if ours.size >= 100:  # xavier: U(±bound), std bound/√3; truncated lecun: std √(1/fan_in)
            std = bound / np.sqrt(3.0) if rule["kind"] == "xavier_uniform" else np.sqrt(1.0 / rule["fan_in"])
            checks.append(Check(f"init/{name} (std / expected − 1)", "spread", abs(float(ours.std()) / std - 1), 0.3))
    for target, online in agent.TARGETS.items():  # a target starts as an exact copy
        copies = zip(getattr(agent, target).state_dict().items(), getattr(agent, online).state_dict().values())
        for (name, value), online_value in copies:
            checks.append(compare(f"init/{target}.{name} (= {online})", value, online_value, "exact", 0.0))
    return checks + [missing(f"init/{key} (no parameter of ours)") for key in sorted(set(spec) - covered)]


def check_probes(agent: Agent, fixture: Fixture, tol: Tolerances) -> list[Check]:
    """Standalone computations on the initial parameters (``FIXTURE_PROBES``): every array under the prefix that
    the agent's method did not read as an input is one of its outputs, and every output is in the fixture."""
    checks = []
    for prefix, method in agent.FIXTURE_PROBES.items():
        if not fixture.keys(prefix):
            continue
        inputs = set()

        def read(key: str) -> torch.Tensor:
            inputs.add(key)
            return fixture.tensor(key)

        outputs = getattr(agent, method)(read)
        for key in fixture.keys(prefix):
            if key not in inputs:
                name = key.removeprefix(prefix)
                checks.append(compare(key, outputs[name], fixture[key], "maxrel", tol.probe) if name in outputs
                              else missing(f"{key} (our {method} does not produce it)"))
        checks += [missing(f"{prefix}{name} (absent from the fixture)") for name in outputs
                   if prefix + name not in fixture]
    return checks


def check_scalars(fixture: Fixture, prefix: str, tag: str, metrics: dict, aliases: dict, tol: Tolerances) -> list:
    """``total_loss`` and every logged ``info/<group>/<name>`` scalar; ``update_info/`` repeats them (read, not
    compared, as the format documents advise)."""
    checks = []
    if prefix + "total_loss" not in fixture and "total_loss" in metrics:
        return [missing(f"{tag}total_loss (absent from the fixture)")]
    joint = ["total_loss"] if "total_loss" in metrics or prefix + "total_loss" in fixture else []  # (IDQL: none)
    for key in joint + [k[len(prefix):] for k in fixture.keys(prefix + "info/")]:
        name = key.rsplit("/", 1)[-1]  # an alias may name the full key where groups repeat a name (total_loss)
        ours = metrics.get(aliases.get(key, aliases.get(name, name)))
        if ours is None:
            checks.append(missing(f"{tag}{key} (our port does not log {name})"))
        elif name.endswith("loss"):
            checks.append(compare(tag + key, ours, fixture[prefix + key], "rel", tol.loss))
        else:
            checks.append(compare(tag + key, ours, fixture[prefix + key], "floor", tol.stat, floor=tol.stat_floor))
    # update_info/ repeats info/ (the scalars as logged inside the jitted update): the two sets must agree.
    logged = {k[len(prefix + "info/"):] for k in fixture.keys(prefix + "info/")}
    repeated = {k[len(prefix + "update_info/"):] for k in fixture.keys(prefix + "update_info/")} - set(GRAD_STATISTICS)
    for key in sorted(logged ^ repeated) if fixture.keys(prefix + "update_info/") else ():
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
    per_module = bool(fixture.keys(prefix + "grad_global_norm/"))  # then check_module_grad_norms compares them
    return [compare(tag + key, value, fixture[prefix + key], "rel", tol.intermediate)
            for key, value in values.items() if (key == "grad_global_norm" and not per_module) or prefix + key in fixture]


def check_module_grad_norms(fixture: Fixture, prefix: str, tag: str, raw_grads: dict[str, torch.Tensor],
                            tol: Tolerances) -> list[Check]:
    """``grad_global_norm/<module>``, where a format logs one norm per optimiser (IDQL): √Σg² over the module."""
    checks = []
    for key in fixture.keys(prefix + "grad_global_norm/"):
        module = key.rsplit("/", 1)[-1]
        grads = [g for n, g in raw_grads.items() if n.split(".")[0] == module]
        checks.append(compare(tag + key.removeprefix(prefix), torch.linalg.vector_norm(
            torch.stack([g.norm() for g in grads])), fixture[key], "rel", tol.intermediate) if grads
            else missing(f"{tag}{key.removeprefix(prefix)} (our port gives {module} no gradient)"))
    return checks


def check_update_vectors(fixture: Fixture, prefix: str, tag: str, optimizers: dict, online: dict,
                         before: dict, subs: dict, tol: Tolerances) -> list[Check]:
    """``opt_updates/``, where a format stores the optimiser's update vector u (θ_new = θ_old + u): computed from our
    Adam state as optax does, u = −lr·(m̂/(√v̂ + eps) + λ·θ_old), not as a difference of parameters (which rounds
    away the weight decay, FIXTURE_FORMAT_IDQL.md §10)."""
    snapshot = prefix + "opt_updates"
    if not fixture.keys(snapshot + "/"):
        return []
    hyper = {p: (g, opt) for opt in optimizers.values() for g in opt.param_groups for p in g["params"]}
    checks = []
    for name, param in online.items():
        group, optimizer = hyper[param]
        decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
        if group["weight_decay"] and not decoupled:  # Adam's L2 decay, not optax's
            checks.append(missing(f"{tag}opt_updates/{name} (coupled weight decay: not computable)"))
            continue
        state = optimizer.state[param]
        (b1, b2), step = group["betas"], float(state["step"])
        m_hat = state["exp_avg"].double() / (1 - b1**step)
        v_hat = state["exp_avg_sq"].double() / (1 - b2**step)
        update = -group["lr"] * (m_hat / (v_hat.sqrt() + group["eps"]) + group["weight_decay"] * before[name].double())
        checks.append(compare(f"{tag}opt_updates/{name}", update, fixture.param(snapshot, name, subs), "maxrel",
                              tol.opt_updates))
    for key in fixture.keys(snapshot + "/"):  # (the targets have none)
        fixture.unread.discard(key)
    return checks


def check_intermediates(fixture: Fixture, prefix: str, tag: str, inter: dict, tol: Tolerances) -> list:
    """Our intermediates and the fixture's must be the same set."""
    checks = []
    for name, value in inter.items():
        # A quantity every update shares (IDQL's schedule/) is stored once, unprefixed: compared in every update.
        key = prefix + name if prefix + name in fixture else name
        if key in fixture and (key == prefix + name or not fixture.keys(prefix + name.split("/")[0])):
            metric, tolerance = (
                ("rel", tol.loss_intermediate) if tol.loss_intermediate and name.endswith("loss") else
                ("rel", tol.lr) if tol.lr and name.endswith("_lr") else ("maxrel", tol.intermediate))
            checks.append(compare(tag + name, value, fixture[key], metric, tolerance))
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
            checks.append(compare(f"acting/{key}", inter[key], fixture[key], "maxrel", tol.acting))
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
        group = parts[1] if len(parts) > 1 and parts[1] in ("grads", "params", "adam_mu", "adam_nu", "opt_updates") else parts[0] \
            if parts[0] == "acting" else "values"
        groups[(group, c.metric)] = max(groups.get((group, c.metric), 0.0), c.error)
    summary = ", ".join(f"{g} max {m} err {e:.1e}" for (g, m), e in sorted(groups.items()))
    print(f"  {len(checks) - len(failed)}/{len(checks)} checks passed; {summary}")
    return not failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixtures", nargs="+", help="fixture .npz files (e.g. tests/fixtures/*.npz)")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="none",
                        help="torch.compile mode of the agents' losses (default: eager)")
    parser.add_argument("--device", default="cpu", help="where the agent runs (cpu, cuda, cuda:1, ...)")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float32)
    if torch.device(args.device).type == "cuda":
        disable_tf32()
    all_ok = True
    for path in args.fixtures:
        try:
            ok = report(path, check_fixture(path, args.compile, args.device))
        except (FixtureError, KeyError, OSError, ValueError) as exc:
            print(f"== {path}\n  ERROR: {exc}")
            ok = False
        all_ok &= ok
    print("ALL CHECKS PASSED" if all_ok else "SOME CHECKS FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

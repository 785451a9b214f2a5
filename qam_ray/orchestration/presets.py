"""Sweep presets and their validation: methods × domains × tasks × seeds, each trial as one plain ``spec`` dict.

Everything a user can type is checked here, before Ray starts: names, budgets, hyperparameter overrides for every
method of the sweep, and whether a local dataset exists.  Overrides are ``KEY=VALUE`` (every method of the sweep
that has the hyperparameter ``KEY`` takes it) or ``METHOD.KEY=VALUE`` (that method only).
"""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import sys

from qam_ray.agents import METHOD_NAMES, agent_class, make_hyperparams
from qam_ray.agents.base import field_names
from qam_ray.domains import DOMAIN_NAMES, domain_of_env, get_domain

PAPER_SEEDS = [10001 * k for k in range(1, 13)]  # the official reproduce.py seeds
# Network sizes every agent shares (so one override serves every method of a sweep).
TINY = {"actor_hidden_dims": (16, 16), "value_hidden_dims": (16, 16), "num_qs": 2, "flow_steps": 3}
SMALL = {"actor_hidden_dims": (256, 256), "value_hidden_dims": (256, 256), "num_qs": 4}


@dataclasses.dataclass
class Preset:
    domains: list[str]
    tasks: list[int]
    seeds: list[int]
    methods: list[str]
    steps: int
    steps_per_iteration: int
    eval_every: int
    eval_episodes: int
    checkpoint_every: int  # iterations
    overrides: dict = dataclasses.field(default_factory=dict)  # KEY or METHOD.KEY → value
    batch_size: int = 256
    dataset_dir: str | None = None
    # "1M": every domain on its standard file; "paper": what the paper trains each domain on (the 100M shard
    # folders for cube-quadruple and puzzle-4x4, qam_ray.data.shards); "100M": shard folders for every domain.
    dataset_size: str = "1M"
    dataset_url: str | None = None  # a mirror of OGBench's host for missing standard files
    generate: tuple[str, str, int] | None = None  # (env, type, episodes) to generate into dataset_dir if missing
    search: bool = False
    num_samples: int = 1
    max_concurrent: int = 2
    # Online fine-tuning after the offline steps (QAM_SPEC §9); online_steps = 0 trains offline only.
    online_steps: int = 0
    online_eval_every: int = 50_000  # env steps
    utd_ratio: float = 1.0
    start_training: int = 5000
    env_runners: int = 1  # the reference collects with one env
    envs_per_env_runner: int = 1
    rollout_fragment_length: int = 20  # chunks per env and iteration
    cpus_per_env_runner: float = 1.0


PRESETS = {
    "paper": Preset(list(DOMAIN_NAMES), [1, 2, 3, 4, 5], PAPER_SEEDS, ["QAM"], steps=1_000_000,
                    steps_per_iteration=1000, eval_every=50_000, eval_episodes=50, checkpoint_every=50,
                    dataset_size="paper"),
    "search": Preset(["cube-double-play"], [2], [0], ["QAM"], steps=200_000, steps_per_iteration=1000,
                     eval_every=20_000, eval_episodes=25, checkpoint_every=20, search=True, num_samples=24,
                     max_concurrent=4),
    # The README's first command: QAM and FQL side by side on generated data, within 15 minutes on 2 cores.
    "quickstart": Preset(["cube-single-play"], [2], [0, 1], ["QAM", "FQL"], steps=3000, steps_per_iteration=250,
                         eval_every=1500, eval_episodes=20, checkpoint_every=6, overrides=dict(SMALL),
                         dataset_dir="data/generated", generate=("cube-single", "play", 100)),
    "smoke": Preset(["cube-single-play"], [2], [0, 1], ["QAM"], steps=8, steps_per_iteration=4, eval_every=8,
                    eval_episodes=1, checkpoint_every=1, overrides=dict(TINY), batch_size=16,
                    dataset_dir="data/smoke", generate=("cube-single", "play", 2)),
}
# Offline → online: the paper's 1M offline + 500K online env steps, and a tiny CI version on 2 EnvRunners.
PRESETS["paper-online"] = dataclasses.replace(PRESETS["paper"], online_steps=500_000)
PRESETS["smoke-online"] = dataclasses.replace(
    PRESETS["smoke"], seeds=[0], online_steps=100, online_eval_every=100, start_training=50, env_runners=2,
    rollout_fragment_length=5, cpus_per_env_runner=0.5)
ONLINE_FIELDS = ("online_steps", "online_eval_every", "utd_ratio", "start_training", "env_runners",
                 "envs_per_env_runner", "rollout_fragment_length", "cpus_per_env_runner")
PRESET_FLAGS = ("domains", "tasks", "seeds", "methods", "steps", "steps_per_iteration", "eval_every", "eval_episodes",
                "batch_size", "num_samples", "max_concurrent", "dataset_dir", "dataset_size", "dataset_url",
                *ONLINE_FIELDS)


def parse_overrides(pairs: list[str]) -> dict:
    """``["inv_temp=3.0", "FQL.alpha=10", "actor_hidden_dims=(256,256)"]`` → dict; values are Python literals."""
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE or METHOD.KEY=VALUE, e.g. --set inv_temp=3.0")
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"--set {pair!r}: {text!r} is not a Python literal (e.g. 3.0, (256,256), None)") from None
    return overrides


def method_overrides(overrides: dict, method: str) -> dict:
    """The overrides that apply to ``method``: unscoped keys it has, and its own ``METHOD.KEY`` ones."""
    fields = set(field_names(agent_class(method).Hyperparams))
    values = {k: v for k, v in overrides.items() if "." not in k and k in fields}
    values.update({k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith(method + ".")})
    return values


def override_errors(overrides: dict, methods: list[str]) -> list[str]:
    """Overrides no method of the sweep can take, named with what they could be."""
    errors = []
    for key in overrides:
        method, _, name = key.rpartition(".")
        if method and method not in methods:
            errors.append(f"--set {key}: {method!r} is not a method of this sweep ({', '.join(methods)})")
        elif method and name not in field_names(agent_class(method).Hyperparams):
            errors.append(f"--set {key}: {method} has no hyperparameter {name!r}")
        elif not method and not any(key in field_names(agent_class(m).Hyperparams) for m in methods):
            errors.append(f"--set {key}: unknown hyperparameter for {', '.join(methods)}")
    return errors


def resolve(preset_name: str, flags: dict, gpus_per_trial: float = 0, cpus_per_trial: float = 1,
            offline_checkpoint: str | None = None, continue_run: str | None = None) -> tuple[Preset, list[dict], list[str]]:
    """The preset with the flags applied (``None`` = keep the preset's), one spec per grid trial, and every problem
    found (empty when the sweep can start)."""
    preset = dataclasses.replace(PRESETS[preset_name])
    preset.overrides = dict(preset.overrides)  # replace() is shallow: --set must not leak into PRESETS
    for field in PRESET_FLAGS:
        if flags.get(field) is not None:
            setattr(preset, field, flags[field])
    errors = number_errors(preset)
    try:
        preset.overrides.update(parse_overrides(flags.get("overrides") or []))
    except ValueError as exc:
        errors.append(str(exc))
    unknown = [m for m in preset.methods if m not in METHOD_NAMES]
    if unknown:
        return preset, [], errors + [f"--methods {' '.join(unknown)}: known methods are {', '.join(METHOD_NAMES)}"]
    if len(set(preset.methods)) != len(preset.methods):
        errors.append(f"--methods {' '.join(preset.methods)}: each method once")
    if preset.dataset_size not in DATASET_SIZE_CHOICES:
        errors.append(f"--dataset-size {preset.dataset_size!r}: expected one of {', '.join(DATASET_SIZE_CHOICES)} "
                      "(paper = 100M shards where the paper uses them)")
    if errors:  # the arithmetic below needs valid numbers
        return preset, [], errors
    if preset.eval_every % preset.steps_per_iteration or preset.steps % preset.eval_every:
        errors.append(f"--eval-every {preset.eval_every} must be a multiple of {preset.steps_per_iteration} "
                      f"and divide --steps {preset.steps}")
    if any(t not in range(1, 6) for t in preset.tasks):
        errors.append(f"--tasks {preset.tasks}: tasks are 1..5")
    if preset.search and len(preset.domains) * len(preset.tasks) * len(preset.methods) != 1:
        errors.append("the search preset tunes one domain, task and method at a time: pass one of each")
    errors += online_errors(preset, offline_checkpoint, continue_run)
    online_only = [m for m in preset.methods if not agent_class(m).OFFLINE_DATA]
    if online_only and not preset.online_steps:
        errors.append(f"--methods {' '.join(online_only)}: online-only (no offline data); set --online-steps")
    naming = override_errors(preset.overrides, preset.methods)
    errors += naming
    for domain in preset.domains if not naming else ():  # the values, once every name is known
        for method in preset.methods:
            try:
                make_hyperparams(method, f"{domain}-singletask-task1-v0", 1, 1,
                                 method_overrides(preset.overrides, method))
            except ValueError as exc:
                errors.append(f"{domain} / {exc}")
    if errors:
        return preset, [], errors
    if preset.dataset_dir is not None:
        preset.dataset_dir = os.path.abspath(preset.dataset_dir)
    specs = [
        {"method": m, "agent": agent_class(m).name, "domain": d, "task": t, "seed": s,
         "dataset_dir": preset.dataset_dir, "dataset_size": domain_dataset_size(preset, d),
         "dataset_url": preset.dataset_url, "steps": preset.steps, "steps_per_iteration": preset.steps_per_iteration,
         "eval_every": preset.eval_every, "eval_episodes": preset.eval_episodes,
         "checkpoint_every": preset.checkpoint_every, "batch_size": preset.batch_size,
         "overrides": method_overrides(preset.overrides, m), "gpus": gpus_per_trial,
         "threads": max(1, int(cpus_per_trial)), **{k: getattr(preset, k) for k in ONLINE_FIELDS},
         "offline_checkpoint": offline_checkpoint and os.path.abspath(offline_checkpoint),
         "mlflow_run_id": continue_run}
        for m in preset.methods for d in preset.domains for t in preset.tasks for s in preset.seeds
    ]
    return preset, specs, []


# flag → (least value, integer?) of every number a preset holds.
NUMBER_RULES = {
    "steps": (1, True), "steps_per_iteration": (1, True), "eval_every": (1, True), "eval_episodes": (1, True),
    "batch_size": (1, True), "num_samples": (1, True), "max_concurrent": (1, True), "online_steps": (0, True),
    "online_eval_every": (1, True), "start_training": (0, True), "env_runners": (1, True),
    "envs_per_env_runner": (1, True), "rollout_fragment_length": (1, True), "utd_ratio": (0, False),
    "cpus_per_env_runner": (0, False),
}


def number_errors(preset: Preset) -> list[str]:
    """Every number in range (positive, finite, integer where it must be), named by its flag."""
    errors = []
    for field, (least, integer) in NUMBER_RULES.items():
        value = getattr(preset, field)
        ok = (isinstance(value, int) and not isinstance(value, bool)) if integer else (
            isinstance(value, (int, float)) and math.isfinite(value))
        strict = not integer  # utd_ratio, cpus: > 0; the integers: >= their least value
        if not ok or (value <= least if strict else value < least):
            kind = "an integer" if integer else "a finite number"
            errors.append(f"--{field.replace('_', '-')} {value!r}: must be {kind} {'>' if strict else '>='} {least}")
    for field in ("tasks", "seeds"):
        bad = [v for v in getattr(preset, field) if not isinstance(v, int) or v < (1 if field == "tasks" else 0)]
        if bad:
            errors.append(f"--{field} {bad}: {'tasks are 1..5' if field == 'tasks' else 'seeds are integers >= 0'}")
    return errors


def online_errors(preset: Preset, offline_checkpoint: str | None, continue_run: str | None) -> list[str]:
    errors = []
    if preset.online_steps and (preset.env_runners < 1 or preset.envs_per_env_runner < 1
                                or preset.rollout_fragment_length < 1 or preset.online_eval_every < 1):
        errors.append("--env-runners, --envs-per-env-runner, --rollout-fragment-length and --online-eval-every "
                      "must be >= 1 for an online phase")
    single = len(preset.domains) * len(preset.tasks) * len(preset.methods) * len(preset.seeds) == 1
    for flag, value in (("--offline-checkpoint", offline_checkpoint), ("--continue-run", continue_run)):
        if value and not single:
            errors.append(f"{flag} belongs to one trial: pass one method, domain, task and seed")
    if offline_checkpoint:
        if not preset.online_steps:
            errors.append("--offline-checkpoint starts the online phase: set --online-steps")
        if not os.path.isdir(os.path.join(offline_checkpoint, "learner_group")):
            errors.append(f"--offline-checkpoint {offline_checkpoint}: no learner_group/ folder; pass a folder "
                          "written by algo.save_to_path (train.py --out DIR writes DIR/checkpoint)")
    return errors


DATASET_SIZE_CHOICES = ("1M", "paper", "100M")


def domain_dataset_size(preset: Preset, domain: str) -> str:
    """'1M' or '100M': the dataset ``domain`` trains on under the preset's ``dataset_size``."""
    if preset.dataset_size == "paper":
        return domain_of_env(f"{domain}-singletask-task1-v0").dataset_size
    return preset.dataset_size


def data_errors(preset: Preset, generate: bool) -> list[str]:
    """Every dataset the sweep needs, validated on disk without loading it (``check_dataset_files``, and
    ``open_shards`` for a 100M shard folder).

    A missing dataset is generated only when the preset asks for it *and* the folder is the preset's own (or
    ``generate`` is set): a mistyped ``--dataset-dir`` must not fill a new folder silently.  OGBench's own folder
    (no ``--dataset-dir``) is left to the trials, which download missing standard files; shard folders cannot be
    downloaded that way, so they are checked wherever they are expected.
    """
    from qam_ray.data.ogbench_data import DatasetError, check_dataset_files

    errors = []
    if not any(agent_class(method).OFFLINE_DATA for method in preset.methods):
        return errors  # online-only methods (Agent.OFFLINE_DATA = False) read no dataset
    for domain in dict.fromkeys(domain_of_env(f"{d}-singletask-task1-v0").name for d in preset.domains):
        env_name = f"{domain}-singletask-task1-v0"
        if domain_dataset_size(preset, domain) == "100M":
            from ogbench.utils import DEFAULT_DATASET_DIR

            from qam_ray.data.shards import open_shards

            try:
                open_shards(env_name, preset.dataset_dir or DEFAULT_DATASET_DIR)
            except DatasetError as error:
                errors.append(str(error))
            continue
        if preset.dataset_dir is None:
            continue  # OGBench's own folder: the trial downloads what is missing
        path = os.path.join(preset.dataset_dir, f"{domain}-v0.npz")
        if not os.path.exists(path) and preset.generate is not None and generate:
            env, kind, episodes = preset.generate
            if f"{env}-{kind}" == domain:
                from qam_ray.data.generate import generate_dataset

                print(f"generating {episodes} episodes of {domain} into {preset.dataset_dir} …", file=sys.stderr)
                generate_dataset(env, kind, episodes=episodes, seed=0, out_dir=preset.dataset_dir,
                                 episode_length=1001 if episodes > 5 else 100, workers=min(2, os.cpu_count() or 1))
        if not os.path.exists(path):
            errors.append(f"{path} is missing. Stage the official file there, or generate one: python "
                          f"experiments/generate_data.py --env {domain.rsplit('-', 1)[0]} --type "
                          f"{domain.rsplit('-', 1)[1]} --episodes 100 --out {preset.dataset_dir}"
                          + (" (or pass --generate to let the sweep do it)" if preset.generate else ""))
            continue
        try:
            check_dataset_files(env_name, preset.dataset_dir)
        except DatasetError as error:
            errors.append(str(error))
    return errors


def off_protocol_domains(preset: Preset) -> list[str]:
    """Paper domains the paper trains on 100M shards that this preset trains on the 1M file instead."""
    return [d for d in dict.fromkeys(preset.domains) if d in DOMAIN_NAMES and get_domain(d).dataset_size == "100M"
            and domain_dataset_size(preset, d) != "100M"]

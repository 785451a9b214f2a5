"""One RLlib algorithm for every registered method: ``AgentConfig`` (validated hyperparameters, OGBench presets)
and ``AgentAlgorithm``; ``qam_ray.rllib`` derives the per-family classes RLlib users expect (``QAMConfig`` /
``QAM``, ``FQLConfig`` / ``FQL``, …) from the method registry.

    config = (QAMConfig()
              .ogbench(domain="cube-double-play", task=2, method="QAM-E", dataset_dir="/data/ogbench")
              .learners(num_learners=0, num_gpus_per_learner=1)
              .evaluation(evaluation_interval=50, evaluation_duration=50))
    algo = config.build_algo()
    algo.train()

Offline (the default): no training EnvRunners; each learner loads its dataset by path onto its own device, and
every ``training_step`` asks the learners for ``num_steps_per_iteration`` gradient steps sampled learner-side.

Online (``.online(...)``, QAM_SPEC §9): start from an offline checkpoint; the learners' buffers hold the offline
dataset plus room for ``online_steps`` env transitions; each ``training_step`` samples chunk-steps on the EnvRunners
(``num_env_runners`` × ``num_envs_per_env_runner`` envs, ``rollout_fragment_length`` chunks each), appends their
single-step transitions to every learner's buffer, runs ``utd_ratio`` updates per new env step once
``start_training`` env steps exist, and syncs the new weights to the EnvRunners.  Evaluation then runs every
``online_eval_every`` env steps and at the end of the phase.

Evaluation runs on RLlib's evaluation EnvRunners with action chunks executed open-loop (``ActionChunkEnv``).
"""

from __future__ import annotations

import logging
import math
import os
import time

from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, EVALUATION_RESULTS, LEARNER_RESULTS

from qam_ray.agents import agent_class, registry_hyperparams
from qam_ray.agents.base import field_names
from qam_ray.core.compile import compile_mode_error
from qam_ray.data.shards import SHARD_INTERVAL
from qam_ray.domains import domain_of_env
from qam_ray.rllib.chunk_env import (ENV_ID, SuccessMetricsCallback, episode_means, episode_transitions,
                                     make_chunked_env)
from qam_ray.rllib.learner import AgentLearner
from qam_ray.rllib.module import AgentRLModule

ONLINE_RESULTS = "online"  # result key of the online phase's counters and timings
DATASET_SIZES = ("1M", "100M", "paper")

# Every algorithm here runs on RLlib's new API stack by design; its "you are running on the new API stack" notice
# at each build is noise.
logging.getLogger("ray.rllib.algorithms.algorithm_config").addFilter(
    lambda record: "on the new API stack" not in record.getMessage())

# Hyperparameters that RLlib's AlgorithmConfig holds under its own name (one name per setting).
RLLIB_NAMES = {"discount": "gamma", "lr": "lr", "tau": "tau", "clip_grad_max_norm": "grad_clip"}
DIMENSIONS = ("obs_dim", "action_dim")  # fixed by the spaces when the module is built


class InvalidConfigError(ValueError):
    """An AgentConfig that cannot train; the message names every bad field and the allowed values."""


class AgentConfig(AlgorithmConfig):
    """The config of any registered method.  ``method`` is a paper label (``QAM``, ``QAM-E``, ``FQL``, …); the
    agent's hyperparameters are attributes under their own names (see the agent's ``*Hyperparams`` dataclass),
    except γ, lr, the Polyak rate and the gradient clip, which are RLlib's ``gamma``, ``lr``, ``tau`` and
    ``grad_clip``."""

    default_method = "QAM"
    family: str | None = None  # a per-family config (QAMConfig, FQLConfig, …) holds only that family's methods

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or AgentAlgorithm)
        self.method = None
        self._set_method(self.default_method)
        self.grad_clip_by = "global_norm"
        self.train_batch_size_per_learner = 256
        # Data and loop.
        self.env_name = None  # OGBench singletask name: dataset and evaluation env
        self.dataset_dir = None  # None = OGBench's download folder
        self.dataset_size = "1M"  # or "100M": the domain's folder of shards (qam_ray.data.shards)
        self.dataset_url = None  # a mirror of OGBench's host for missing files (None: $QAM_RAY_DATASET_URL / official)
        self.dataset_replace_interval = SHARD_INTERVAL  # gradient steps per 100M shard (the reference's flag)
        self.sparse = False
        self.num_steps_per_iteration = 1000
        self.compile = "none"  # torch.compile mode of the agent's losses on the learners (qam_ray.core.compile)
        # Offline: no training EnvRunners (RAY_NOTES B3); the learner skips RLlib's per-parameter isfinite syncs.
        self._is_online = False
        self.torch_skip_nan_gradients = True
        self.callbacks_class = SuccessMetricsCallback
        self.evaluation_duration_unit = "episodes"
        self.evaluation_duration = 50
        # Online phase (set by .online()).
        self.online_steps = 0  # env steps (single actions, not chunks)
        self.utd_ratio = 1.0  # gradient steps per env step
        self.start_training = 5000  # env steps collected before the first online update
        self.online_eval_every = 50_000  # env steps
        self.offline_checkpoint = None  # algorithm checkpoint folder the learners start from
        self.rollout_fragment_length = 20  # chunks per env and iteration (≤ 20·H env steps)

    @property
    def agent_class(self):
        return agent_class(self.method)

    def agent_fields(self) -> tuple[str, ...]:
        """The agent's hyperparameters that the config holds under their own names."""
        return tuple(n for n in field_names(self.agent_class.Hyperparams) if n not in RLLIB_NAMES and n not in DIMENSIONS)

    def _set_method(self, method: str) -> None:
        """Switch to ``method``; a method of another agent family resets the hyperparameters to its defaults."""
        new = agent_class(method)
        if self.family is not None and new.name != self.family:
            raise ValueError(f"method={method!r} belongs to the {new.name.upper()} family; {type(self).__name__} "
                             f"holds {self.family.upper()} methods only: use {new.name.upper()}Config or AgentConfig")
        if self.method is None or agent_class(self.method) is not new:
            for name in self.agent_fields() if self.method else ():
                delattr(self, name)
            defaults = new.Hyperparams(obs_dim=1, action_dim=1)
            for name in field_names(new.Hyperparams):
                if name not in DIMENSIONS:
                    setattr(self, RLLIB_NAMES.get(name, name), getattr(defaults, name))
        self.method = method

    def training(self, *, num_steps_per_iteration=NotProvided, dataset_replace_interval=NotProvided,
                 compile=NotProvided, **kwargs):
        """The agent's hyperparameters by name (e.g. ``inv_temp=3.0`` for QAM, ``alpha=30.0`` for FQL),
        ``num_steps_per_iteration`` (gradient steps per ``train()``), ``dataset_replace_interval`` (gradient steps
        per shard of a 100M dataset, the reference's 1,000), ``compile`` (the learners' ``torch.compile`` mode of
        the agent's losses: "none" (eager, the default), "default", "reduce-overhead" (+ CUDA graphs on a GPU) or
        "max-autotune"; ``qam_ray.core.compile``), and every RLlib training option
        (``gamma``, ``lr``, ``tau``, ``grad_clip``, ``train_batch_size_per_learner``, …)."""
        for name in (*self.agent_fields(), "tau"):  # RLlib's base training() has no `tau` (its SAC config does)
            if name in kwargs:
                setattr(self, name, kwargs.pop(name))
                if name == "horizon_length" and self.env_name:  # the env plays chunks of this length
                    self._set_environment()
        if num_steps_per_iteration is not NotProvided:
            self.num_steps_per_iteration = num_steps_per_iteration
        if dataset_replace_interval is not NotProvided:
            self.dataset_replace_interval = dataset_replace_interval
        if compile is not NotProvided:
            self.compile = compile
        return super().training(**kwargs)

    def ogbench(self, domain: str, task: int = 1, method: str | None = None, dataset_dir: str | None = None,
                dataset_size: str = "1M", dataset_url: str | None = None):
        """Fill env, data and the method's per-domain hyperparameters from the registries.

        ``domain`` is a paper domain such as ``cube-double-play`` or a generated one such as ``cube-single-play``;
        ``method`` a paper label (default: this config's method).  ``dataset_size``: ``"1M"`` (the standard file),
        ``"100M"`` (the domain's shard folder ``<domain>-100m-v0/`` under ``dataset_dir``) or ``"paper"`` (what
        the paper trains this domain on: 100M for cube-quadruple and puzzle-4x4).  ``dataset_url``: a mirror
        to download missing standard files from.
        """
        if task not in range(1, 6):
            raise ValueError(f"task={task!r}: expected 1..5")
        if dataset_size not in DATASET_SIZES:
            raise ValueError(f"dataset_size={dataset_size!r}: expected one of {', '.join(DATASET_SIZES)}")
        self._set_method(method or self.method)
        env_name = f"{domain}-singletask-task{task}-v0"
        for name, value in registry_hyperparams(self.method, env_name).items():
            setattr(self, RLLIB_NAMES.get(name, name), value)
        domain_facts = domain_of_env(env_name)
        self.env_name, self.dataset_dir, self.sparse = env_name, dataset_dir, domain_facts.sparse
        self.dataset_size = domain_facts.dataset_size if dataset_size == "paper" else dataset_size
        self.dataset_url = dataset_url
        self._set_environment()
        return self

    def _set_environment(self) -> None:
        """The chunked env of ``env_name`` with chunks of ``horizon_length`` actions, and its spaces."""
        env_config = {"env_name": self.env_name, "horizon": self.horizon_length}
        probe = make_chunked_env(env_config)  # ~1 s; gives the spaces the RLModule is built from
        self.environment(ENV_ID, env_config=env_config, observation_space=probe.observation_space,
                         action_space=probe.action_space)
        probe.close()

    def online(self, online_steps: int = 500_000, *, utd_ratio: float = 1.0, start_training: int = 5000,
               eval_every: int = 50_000, offline_checkpoint: str | None = None):
        """Offline-to-online fine-tuning (QAM_SPEC §9 defaults).  ``offline_checkpoint`` is a ``save_to_path``
        folder of an offline run; its learner state (networks, Adam, sampling generator, step count) is loaded.
        Without one the learners start fresh (a method without offline data: from an empty buffer).
        Set EnvRunners with ``.env_runners(num_env_runners=..., num_envs_per_env_runner=...)``."""
        self._is_online = True
        self.online_steps, self.utd_ratio, self.start_training = online_steps, utd_ratio, start_training
        self.online_eval_every = eval_every
        self.offline_checkpoint = os.path.abspath(offline_checkpoint) if offline_checkpoint else None
        self.evaluation_interval = None  # evaluation follows env steps instead (AgentAlgorithm.step)
        return self

    def agent_hyperparams(self, obs_dim: int, action_dim: int):
        values = {name: getattr(self, RLLIB_NAMES.get(name, name))
                  for name in field_names(self.agent_class.Hyperparams) if name not in DIMENSIONS}
        return self.agent_class.Hyperparams(obs_dim=obs_dim, action_dim=action_dim, **values)

    def hyperparams_for_spaces(self):
        """The agent's hyperparameters at the dimensions of this config's spaces."""
        return self.agent_hyperparams(self.observation_space.shape[0],
                                      self.action_space.shape[0] // self.horizon_length)

    def validate(self) -> None:
        super().validate()
        errors = []
        if not self.env_name:
            errors.append("env_name is not set: call .ogbench(domain=..., task=..., method=...)")
        if self.grad_clip is not None and self.grad_clip_by != "global_norm":
            errors.append(f"grad_clip_by={self.grad_clip_by!r}: the agents clip by 'global_norm' only")
        if not (isinstance(self.num_steps_per_iteration, int) and self.num_steps_per_iteration >= 1):
            errors.append(f"num_steps_per_iteration={self.num_steps_per_iteration!r}: must be an integer >= 1")
        if not (isinstance(self.train_batch_size_per_learner, int) and self.train_batch_size_per_learner >= 1):
            errors.append(f"train_batch_size_per_learner={self.train_batch_size_per_learner!r}: must be >= 1")
        if self.env_name and self.env_config.get("horizon") != self.horizon_length:
            errors.append(f"horizon_length={self.horizon_length!r} but the env plays chunks of "
                          f"{self.env_config.get('horizon')}: set it with .training(horizon_length=...)")
        if not (isinstance(self.dataset_replace_interval, int) and self.dataset_replace_interval >= 1):
            errors.append(f"dataset_replace_interval={self.dataset_replace_interval!r}: must be an integer >= 1 "
                          "(gradient steps per 100M shard)")
        if compile_mode_error(self.compile):
            errors.append(compile_mode_error(self.compile))
        if self._is_online:
            errors += _online_errors(self)
        elif not self.agent_class.OFFLINE_DATA:
            errors.append(f"{self.method} learns online only (no offline data): call .online(online_steps=...)")
        # Dimensions are placeholders here: the spaces fix them when the module is built.
        try:
            self.agent_hyperparams(1, 1)
        except ValueError as exc:
            errors.append(str(exc))
        if errors:
            raise InvalidConfigError(f"Invalid {type(self).__name__} ({self.method}):\n  - " + "\n  - ".join(errors))

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        hyperparams = vars(self.agent_hyperparams(1, 1))
        model_config = {"method": self.method, **{k: v for k, v in hyperparams.items() if k not in DIMENSIONS}}
        return RLModuleSpec(module_class=AgentRLModule, model_config=model_config)

    def get_default_learner_class(self):
        return AgentLearner

    @property
    def agent_seed(self) -> int:
        return self.seed or 0


def build_agent_config(
    method: str, domain: str, task: int, *, dataset_dir: str | None, dataset_size: str = "1M",
    dataset_url: str | None = None, overrides: dict | None = None,
    steps_per_iteration: int = 1000, batch_size: int = 256, eval_interval: int = 50, eval_episodes: int = 50,
    eval_env_runners: int = 0, seed: int = 0, num_learners: int = 0, gpus_per_learner: float = 0,
) -> AgentConfig:
    """The config of one offline run: registry values, then ``overrides`` (hyperparameter names)."""
    config = AgentConfig().ogbench(domain, task=task, method=method, dataset_dir=dataset_dir,
                                   dataset_size=dataset_size, dataset_url=dataset_url)
    config.training(**{RLLIB_NAMES.get(key, key): value for key, value in (overrides or {}).items()})
    return (config.training(num_steps_per_iteration=steps_per_iteration, train_batch_size_per_learner=batch_size)
            .learners(num_learners=num_learners, num_gpus_per_learner=gpus_per_learner)
            .evaluation(evaluation_interval=eval_interval, evaluation_duration=eval_episodes,
                        evaluation_num_env_runners=eval_env_runners)
            .debugging(seed=seed))


def _online_errors(config: AgentConfig) -> list[str]:
    errors = []
    for name in ("online_steps", "start_training", "online_eval_every"):
        value = getattr(config, name)
        if not (isinstance(value, int) and value >= (0 if name == "start_training" else 1)):
            errors.append(f"{name}={value!r}: must be an integer >= {0 if name == 'start_training' else 1}")
    if not (isinstance(config.utd_ratio, (int, float)) and config.utd_ratio > 0):
        errors.append(f"utd_ratio={config.utd_ratio!r}: must be > 0 (gradient steps per env step)")
    checkpoint = config.offline_checkpoint
    if checkpoint is not None and not os.path.isdir(os.path.join(checkpoint, "learner_group")):
        errors.append(f"offline_checkpoint={checkpoint!r} has no learner_group/ folder: pass the folder written by "
                      "algo.save_to_path() (train.py's --out/checkpoint, or a sweep checkpoint's algorithm/)")
    return errors


def online_updates(before: int, after: int, start_training: int, utd_ratio: float) -> int:
    """Gradient steps owed for env steps (before, after]: ``utd_ratio`` per env step past ``start_training``,
    counted cumulatively so a fractional ratio loses nothing and the total matches the reference's loop."""
    def owed(steps: int) -> int:
        return math.floor(utd_ratio * max(0, steps - start_training))
    return owed(after) - owed(before)


class AgentAlgorithm(Algorithm):
    @classmethod
    def get_default_config(cls) -> AgentConfig:
        return AgentConfig()

    def setup(self, config) -> None:
        super().setup(config)
        cfg = self.config
        online_capacity = cfg.online_steps if cfg._is_online else 0
        results = self.learner_group.foreach_learner(
            lambda learner: learner.load_dataset(cfg.env_name, cfg.dataset_dir, cfg.sparse, online_capacity,
                                                 cfg.dataset_size, cfg.dataset_url, cfg.dataset_replace_interval)
        )
        self.dataset_info = call_values(results)[0]  # every learner loads the same file
        self._evaluate_after_step = False
        if cfg._is_online and cfg.offline_checkpoint:
            try:
                self.learner_group.restore_from_path(os.path.join(cfg.offline_checkpoint, "learner_group"))
            except Exception as error:  # a truncated or foreign checkpoint: name it rather than RLlib's internals
                raise InvalidConfigError(
                    f"offline_checkpoint={cfg.offline_checkpoint!r} cannot be loaded ({type(error).__name__}: "
                    f"{error}); pass a folder written by algo.save_to_path() of the same method and sizes") from error
            held = self.learner_value(lambda learner: learner.online_transitions)
            if held:
                raise InvalidConfigError(
                    f"offline_checkpoint={cfg.offline_checkpoint!r} already holds {held} online transitions: it was "
                    "saved in an online phase. Resume it with algo.restore_from_path() (sweeps: --resume) instead.")
            self._sync_env_runners()

    def get_ctor_args_and_kwargs(self):
        # A checkpoint restores its own learner state, online rows included: the offline start it began from is not
        # needed to reopen it (and its folder, often temporary, may be gone).
        state = self.config.get_state()
        state["offline_checkpoint"] = None
        return (state,), {}

    def learner_value(self, func):
        """Runs ``func(learner)`` on every learner and returns the first one's value (they hold the same state);
        re-raises a learner's error."""
        return call_values(self.learner_group.foreach_learner(func))[0]

    def _sync_env_runners(self) -> None:
        call_values(self.learner_group.foreach_learner(lambda learner: learner.bump_weights_seq_no()))
        self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)

    def training_step(self) -> None:
        if self.config._is_online:
            return self._online_training_step()
        steps = self.config.num_steps_per_iteration
        start = time.perf_counter()
        self._learner_steps(steps)
        self.metrics.log_value(  # RLlib owns the top-level "perf" key
            (LEARNER_RESULTS, DEFAULT_MODULE_ID, "updates_per_s"), steps / (time.perf_counter() - start), window=1)

    def _learner_steps(self, steps: int) -> None:
        """``steps`` updates on every learner; logs the learners' mean metrics and counts the steps."""
        batch = self.config.train_batch_size_per_learner
        per_learner = call_values(self.learner_group.foreach_learner(lambda learner: learner.run_steps(steps, batch)))
        means = {key: sum(m[key] for m in per_learner) / len(per_learner) for key in per_learner[0]}
        self.metrics.log_dict(means, key=(LEARNER_RESULTS, DEFAULT_MODULE_ID), reduce="mean", window=1)
        self.metrics.log_value("num_gradient_steps_lifetime", steps, reduce="lifetime_sum")

    def _online_training_step(self) -> None:
        cfg = self.config
        start = time.perf_counter()
        episodes, runner_metrics = synchronous_parallel_sample(
            worker_set=self.env_runner_group, concat=True, _uses_new_env_runners=True, _return_metrics=True)
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)
        transitions = episode_transitions(episodes)
        sample_s = time.perf_counter() - start

        # The phase ends at exactly online_steps env steps: the learners drop what lies beyond.
        progress = self.learner_value(lambda learner: learner.add_online_transitions(transitions, cfg.online_steps))
        before, after = progress["before"], progress["after"]
        updates = online_updates(before, after, cfg.start_training, cfg.utd_ratio)
        start = time.perf_counter()
        if updates:
            self._learner_steps(updates)
            self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)
        update_s = time.perf_counter() - start
        online = {
            "env_steps": after, "buffer_size": self.dataset_info["transitions"] + after,
            "gradient_steps": progress["gradient_steps"] + updates, "updates": updates, "sample_s": sample_s,
            "update_s": update_s, "env_steps_per_s": (after - before) / sample_s if sample_s > 0 else 0.0,
            "updates_per_s": updates / update_s if updates else 0.0,
        }
        self.metrics.log_dict(online, key=ONLINE_RESULTS, reduce="mean", window=1)
        every = cfg.online_eval_every
        self._evaluate_after_step = after // every > before // every or (after == cfg.online_steps > before)

    def step(self) -> dict:
        interval = self.config.evaluation_interval
        evaluated = bool(interval and (self.iteration + 1) % interval == 0)  # RLlib's own schedule
        results = super().step()
        if self._evaluate_after_step:  # online: every online_eval_every env steps and at the end of the phase
            self._evaluate_after_step = False
            results[EVALUATION_RESULTS] = self.evaluate()  # the new stack returns the bare metrics
            evaluated = True
        if not evaluated:
            # Ray 2.60 re-reports the last evaluation's metrics in every later iteration; a result carries
            # "evaluation" only when it evaluated, so curves get no stale points.
            results.pop(EVALUATION_RESULTS, None)
        if ENV_RUNNER_RESULTS in results:
            results[ENV_RUNNER_RESULTS] = episode_means(results[ENV_RUNNER_RESULTS])
        if EVALUATION_RESULTS in results:
            results[EVALUATION_RESULTS][ENV_RUNNER_RESULTS] = episode_means(
                results[EVALUATION_RESULTS][ENV_RUNNER_RESULTS])
        return results

    def evaluate(self, *args, **kwargs) -> dict:
        results = super().evaluate(*args, **kwargs)
        if ENV_RUNNER_RESULTS in results:  # the exact means over the episodes of every evaluation runner
            results[ENV_RUNNER_RESULTS] = episode_means(results[ENV_RUNNER_RESULTS])
        return results

    @classmethod
    def _should_create_evaluation_env_runners(cls, eval_config) -> bool:
        # Online evaluation is scheduled by env steps (evaluation_interval is None), but still needs its runners.
        return eval_config._is_online or super()._should_create_evaluation_env_runners(eval_config)

    def restore_from_path(self, path, *args, **kwargs):
        # Ray 2.60's Algorithm.restore_from_path syncs training EnvRunners unconditionally, and an offline
        # algorithm has none (RAY_NOTES B7): restore the components without that step.
        if self.env_runner_group is None:
            return super(Algorithm, self).restore_from_path(path, *args, **kwargs)
        return super().restore_from_path(path, *args, **kwargs)


def call_values(results) -> list:
    """Values of a ``foreach_learner`` call; re-raises a learner's exception (e.g. NonFiniteLossError)."""
    values = []
    for result in results:
        if hasattr(result, "ok"):  # remote learners return CallResult objects
            if not result.ok:
                raise result.get()
            result = result.get()
        values.append(result)
    return values

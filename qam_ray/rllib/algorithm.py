"""QAM as an RLlib algorithm: ``QAMConfig`` (validated hyperparameters, OGBench presets) and ``QAM``.

    config = (QAMConfig()
              .ogbench(domain="cube-double-play", task=2, variant="QAM-E", dataset_dir="/data/ogbench")
              .learners(num_learners=0, num_gpus_per_learner=1)
              .evaluation(evaluation_interval=50, evaluation_duration=50))
    algo = config.build_algo()
    algo.train()

Offline only: no training EnvRunners; each learner loads its dataset by path onto its own device, and every
``training_step`` asks the learners for ``num_steps_per_iteration`` gradient steps sampled learner-side.
Evaluation runs on RLlib's evaluation EnvRunners with action chunks executed open-loop (``ActionChunkEnv``).
"""

from __future__ import annotations

import time

from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import LEARNER_RESULTS

from qam_ray.core.qam import QAMHyperparams, validate_hyperparams
from qam_ray.domains import domain_of_env
from qam_ray.rllib.chunk_env import ENV_ID, SuccessMetricsCallback, make_chunked_env
from qam_ray.rllib.learner import QAMTorchLearner
from qam_ray.rllib.module import QAMRLModule
from qam_ray.training import registry_hyperparams

# QAM hyperparameters that keep their QAMHyperparams names on the config (RLlib's own gamma, lr, tau,
# grad_clip and train_batch_size_per_learner carry discount, lr, Polyak rate, clip and batch size).
QAM_FIELDS = (
    "horizon_length", "actor_hidden_dims", "value_hidden_dims", "num_qs", "flow_steps", "inv_temp", "rho",
    "fql_alpha", "edit_scale", "edit_target_entropy_multiplier", "value_layer_norm",
)


# QAMHyperparams names that RLlib's AlgorithmConfig holds under its own name.
RLLIB_NAMES = {"discount": "gamma", "clip_grad_max_norm": "grad_clip"}


class QAMConfig(AlgorithmConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or QAM)
        defaults = QAMHyperparams(obs_dim=1, action_dim=1)
        for name in QAM_FIELDS:
            setattr(self, name, getattr(defaults, name))
        self.gamma = defaults.discount
        self.lr = defaults.lr
        self.tau = defaults.tau  # Polyak rate of the target critic and the EMA behaviour flow
        self.grad_clip = defaults.clip_grad_max_norm
        self.grad_clip_by = "global_norm"
        self.train_batch_size_per_learner = 256
        # Data and loop.
        self.env_name = None  # OGBench singletask name: dataset and evaluation env
        self.dataset_dir = None  # None = OGBench's download folder
        self.sparse = False
        self.num_steps_per_iteration = 1000
        # Offline: no training EnvRunners (RAY_NOTES B3); the learner skips RLlib's per-parameter isfinite syncs.
        self._is_online = False
        self.torch_skip_nan_gradients = True
        self.callbacks_class = SuccessMetricsCallback
        self.evaluation_duration_unit = "episodes"
        self.evaluation_duration = 50

    def training(self, *, num_steps_per_iteration=None, **kwargs):
        """QAM_FIELDS by name, ``num_steps_per_iteration``, and every RLlib training option."""
        for name in QAM_FIELDS:
            if name in kwargs:
                setattr(self, name, kwargs.pop(name))
        if num_steps_per_iteration is not None:
            self.num_steps_per_iteration = num_steps_per_iteration
        return super().training(**kwargs)

    def ogbench(self, domain: str, task: int = 1, variant: str = "QAM", dataset_dir: str | None = None):
        """Fill env, data and per-domain hyperparameters from the registry (qam_ray.domains).

        ``domain`` is a paper domain such as ``cube-double-play`` or a generated one such as ``cube-single-play``.
        """
        if task not in range(1, 6):
            raise ValueError(f"task={task!r}: expected 1..5")
        env_name = f"{domain}-singletask-task{task}-v0"
        for name, value in registry_hyperparams(env_name, variant).items():
            setattr(self, RLLIB_NAMES.get(name, name), value)
        self.env_name, self.dataset_dir, self.sparse = env_name, dataset_dir, domain_of_env(env_name).sparse
        env_config = {"env_name": env_name, "horizon": self.horizon_length}
        probe = make_chunked_env(env_config)  # ~1 s; gives the spaces the RLModule is built from
        self.environment(ENV_ID, env_config=env_config, observation_space=probe.observation_space,
                         action_space=probe.action_space)
        probe.close()
        return self

    def qam_hyperparams(self, obs_dim: int, action_dim: int) -> QAMHyperparams:
        return QAMHyperparams(
            obs_dim=obs_dim, action_dim=action_dim, discount=self.gamma, lr=self.lr, tau=self.tau,
            clip_grad_max_norm=self.grad_clip, **{name: getattr(self, name) for name in QAM_FIELDS},
        )

    def validate(self) -> None:
        super().validate()
        errors = []
        if not self.env_name:
            errors.append("env_name is not set: call .ogbench(domain=..., task=..., variant=...)")
        if self.grad_clip is not None and self.grad_clip_by != "global_norm":
            errors.append(f"grad_clip_by={self.grad_clip_by!r}: QAM clips by 'global_norm' only")
        if not (isinstance(self.num_steps_per_iteration, int) and self.num_steps_per_iteration >= 1):
            errors.append(f"num_steps_per_iteration={self.num_steps_per_iteration!r}: must be an integer >= 1")
        if not (isinstance(self.train_batch_size_per_learner, int) and self.train_batch_size_per_learner >= 1):
            errors.append(f"train_batch_size_per_learner={self.train_batch_size_per_learner!r}: must be >= 1")
        if self.action_space is not None and self.action_space.shape[0] % self.horizon_length:
            errors.append(f"horizon_length={self.horizon_length} does not divide the action space "
                          f"{self.action_space.shape}; set it through .ogbench()")
        # Dimensions are placeholders here: the spaces fix them when the module is built.
        try:
            errors += validate_hyperparams(self.qam_hyperparams(1, 1))
        except ValueError as exc:
            errors.append(str(exc))
        if errors:
            raise ValueError("Invalid QAMConfig:\n  - " + "\n  - ".join(errors))

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=QAMRLModule, model_config=self._model_config_for_module())

    def _model_config_for_module(self) -> dict:
        # The module takes obs_dim / action_dim from its spaces.
        model_config = {k: v for k, v in vars(self.qam_hyperparams(1, 1)).items() if k not in ("obs_dim", "action_dim")}
        model_config["seed"] = self.qam_seed
        return model_config

    def get_default_learner_class(self):
        return QAMTorchLearner

    @property
    def qam_seed(self) -> int:
        return self.seed or 0


def build_qam_config(
    domain: str, task: int, variant: str, *, dataset_dir: str | None, overrides: dict | None = None,
    steps_per_iteration: int = 1000, batch_size: int = 256, eval_interval: int = 50, eval_episodes: int = 50,
    eval_env_runners: int = 0, seed: int = 0, num_learners: int = 0, gpus_per_learner: float = 0,
) -> QAMConfig:
    """The config of one offline run: registry values, then ``overrides`` (QAMHyperparams names)."""
    config = QAMConfig().ogbench(domain, task=task, variant=variant, dataset_dir=dataset_dir)
    for key, value in (overrides or {}).items():
        setattr(config, RLLIB_NAMES.get(key, key), value)
    return (config.training(num_steps_per_iteration=steps_per_iteration, train_batch_size_per_learner=batch_size)
            .learners(num_learners=num_learners, num_gpus_per_learner=gpus_per_learner)
            .evaluation(evaluation_interval=eval_interval, evaluation_duration=eval_episodes,
                        evaluation_num_env_runners=eval_env_runners)
            .debugging(seed=seed))


class QAM(Algorithm):
    @classmethod
    def get_default_config(cls) -> QAMConfig:
        return QAMConfig()

    def setup(self, config) -> None:
        super().setup(config)
        cfg = self.config
        results = self.learner_group.foreach_learner(
            lambda learner: learner.load_dataset(cfg.env_name, cfg.dataset_dir, cfg.sparse)
        )
        self.dataset_info = _values(results)[0]

    def training_step(self) -> None:
        steps, batch = self.config.num_steps_per_iteration, self.config.train_batch_size_per_learner
        start = time.perf_counter()
        per_learner = _values(self.learner_group.foreach_learner(lambda learner: learner.run_steps(steps, batch)))
        elapsed = time.perf_counter() - start
        means = {key: sum(m[key] for m in per_learner) / len(per_learner) for key in per_learner[0]}
        means["updates_per_s"] = steps / elapsed  # RLlib owns the top-level "perf" key
        self.metrics.log_dict(means, key=(LEARNER_RESULTS, DEFAULT_MODULE_ID), reduce="mean", window=1)
        self.metrics.log_value("num_gradient_steps_lifetime", steps, reduce="lifetime_sum")

    def restore_from_path(self, path, *args, **kwargs):
        # Ray 2.60's Algorithm.restore_from_path syncs training EnvRunners unconditionally, and an offline
        # algorithm has none (RAY_NOTES B7): restore the components without that step.
        if self.env_runner_group is None:
            return super(Algorithm, self).restore_from_path(path, *args, **kwargs)
        return super().restore_from_path(path, *args, **kwargs)


def _values(results) -> list:
    """Values of a ``foreach_learner`` call; re-raises a learner's exception (e.g. NonFiniteLossError)."""
    values = []
    for result in results:
        if hasattr(result, "ok"):  # remote learners return CallResult objects
            if not result.ok:
                raise result.get()
            result = result.get()
        values.append(result)
    return values

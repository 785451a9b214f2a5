"""QAMRLModule: owns the QAM networks; inference returns flattened action chunks.

``model_config`` holds the fields of :class:`QAMHyperparams` except the dimensions, which come from the spaces
(observation (obs_dim,), action = one flattened chunk (horizon_length · action_dim,)).  It is a plain dict, so it pickles into checkpoints and ``RLModule.from_checkpoint`` rebuilds the module.  On EnvRunners
(``inference_only``) only the acting networks exist: the critics and the training-only flows are dropped, so
weight syncs stay small.
"""

from __future__ import annotations

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule

from qam_ray.core.qam import HYPERPARAM_FIELDS, QAMHyperparams, QAMNetworks, sample_action_chunks

class QAMRLModule(TorchRLModule, InferenceOnlyAPI):
    def setup(self):
        values = {k: self.model_config[k] for k in HYPERPARAM_FIELDS if k in self.model_config}
        values["obs_dim"] = self.observation_space.shape[0]
        values["action_dim"] = self.action_space.shape[0] // values["horizon_length"]
        self.hp = QAMHyperparams(**values)
        self.nets = QAMNetworks(self.hp)
        self._generator = None  # created lazily on the module's device
        if self.inference_only:
            # Pruned here: Ray 2.60's TorchRLModule.__init__ deletes a nested attribute such as "nets.critic"
            # from the module itself instead of from its parent, so it cannot do this for us.
            for name in self.get_non_inference_attributes():
                delattr(self.nets, name.split(".", 1)[1])

    def get_non_inference_attributes(self) -> list[str]:
        # Acting uses f_θ (f_β when inv_temp == 0) and the QAM-F / QAM-E policy heads only.
        dropped = ["nets.critic", "nets.target_critic", "nets.target_actor_slow"]
        if self.hp.inv_temp > 0:
            dropped.append("nets.actor_slow")
        return dropped

    def _action_chunks(self, batch: dict) -> dict:
        obs = batch[Columns.OBS].float()
        if self._generator is None or self._generator.device != obs.device:
            # RLlib seeds each EnvRunner's torch with config.seed + worker index (+1e6 for evaluation), so the
            # acting noise differs between runners and is reproducible.
            self._generator = torch.Generator(device=obs.device).manual_seed(torch.initial_seed())
        chunks = sample_action_chunks(self.nets, self.hp, obs, self._generator)
        return {Columns.ACTIONS: chunks.reshape(obs.shape[0], -1)}

    def _forward_inference(self, batch: dict, **kwargs) -> dict:
        return self._action_chunks(batch)

    def _forward_exploration(self, batch: dict, **kwargs) -> dict:
        # QAM explores with its own stochastic policy (fresh noise per chunk), as the reference does online.
        return self._action_chunks(batch)

    def _forward_train(self, batch: dict, **kwargs) -> dict:
        raise NotImplementedError("QAM trains through QAMTorchLearner.run_steps, not forward_train")

"""AgentRLModule: owns a registered agent's networks; inference returns flattened action chunks.

``model_config`` holds ``method`` (a paper label) and the agent's hyperparameters except the dimensions, which come
from the spaces (observation (obs_dim,), action = one flattened chunk (horizon_length · action_dim,)).  It is a
plain dict, so it pickles into checkpoints and ``RLModule.from_checkpoint`` rebuilds the module.  On EnvRunners
(``inference_only``) only the agent's acting modules exist, so weight syncs stay small.
"""

from __future__ import annotations

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule

from qam_ray.agents import agent_class
from qam_ray.agents.base import field_names


class AgentRLModule(TorchRLModule, InferenceOnlyAPI):
    def setup(self):
        cls = agent_class(self.model_config["method"])
        values = {k: self.model_config[k] for k in field_names(cls.Hyperparams) if k in self.model_config}
        values["obs_dim"] = self.observation_space.shape[0]
        values["action_dim"] = self.action_space.shape[0] // values["horizon_length"]
        self.agent = cls(cls.Hyperparams(**values))
        self._generator = None  # created lazily on the module's device
        if self.inference_only:
            # Pruned here: Ray 2.60's TorchRLModule.__init__ deletes a nested attribute such as "agent.critic"
            # from the module itself instead of from its parent, so it cannot do this for us.
            for name in self.get_non_inference_attributes():
                delattr(self.agent, name.split(".", 1)[1])

    def get_non_inference_attributes(self) -> list[str]:
        acting = set(self.agent.acting_modules())
        return [f"agent.{name}" for name, _ in self.agent.named_children() if name not in acting]

    def _action_chunks(self, batch: dict) -> dict:
        obs = batch[Columns.OBS].float()
        if self._generator is None or self._generator.device != obs.device:
            # RLlib seeds each EnvRunner's torch with config.seed + worker index (+1e6 for evaluation), so the
            # acting noise differs between runners and is reproducible.
            self._generator = torch.Generator(device=obs.device).manual_seed(torch.initial_seed())
        chunks = self.agent.sample_actions(obs, self._generator)
        return {Columns.ACTIONS: chunks.reshape(obs.shape[0], -1)}

    def _forward_inference(self, batch: dict, **kwargs) -> dict:
        return self._action_chunks(batch)

    def _forward_exploration(self, batch: dict, **kwargs) -> dict:
        # Every agent explores with its own stochastic policy (fresh noise per chunk), as the references do online.
        return self._action_chunks(batch)

    def _forward_train(self, batch: dict, **kwargs) -> dict:
        raise NotImplementedError("agents train through AgentLearner.run_steps, not forward_train")

"""AgentLearner: any registered agent's update on a learner-resident dataset, many gradient steps per call.

RLlib's ``Learner.update`` path costs ~0.6 ms (local) to ~4 ms (remote) per call and converts a batch each time
(RAY_NOTES B6), so the learner instead holds the dataset on its own device, samples chunks there, and runs
``run_steps(n)`` updates per call with the agent's own ``update`` (for the QAM-repository agents the shared joint
step: one Adam over every online parameter, the optax global-norm clip, Polyak from the pre-step weights), with no
per-parameter host syncs and one metrics reduction per call.  With several learners each samples with its own seed and the raw gradients are averaged with one
all-reduce per step before clipping (the module is not DDP-wrapped: the loss calls sub-networks directly).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.learner.torch.torch_learner import TorchLearner

from qam_ray.data.ogbench_data import load_offline_dataset, sparse_rewards
from qam_ray.data.replay import ChunkReplayBuffer
from qam_ray.training import run_updates

GENERATOR_STATE = "sampling_generator_state"
ONLINE_ROWS = "online_transitions"  # the online part of the buffer, in checkpoints only
# The dataset info of an online-only agent's run (the keys ``load_dataset`` returns; no file behind it).
NO_DATASET = {"dataset_source": "none", "dataset_sha256": "", "name": "none", "path": None, "dataset_size": "none",
              "transitions": 0}


class AgentLearner(TorchLearner):
    def build(self) -> None:
        if self.config.num_learners > 0:  # a learner actor: size torch's threads to its CPU bundle (RAY_NOTES #15)
            cpus = self.config.num_cpus_per_learner
            torch.set_num_threads(max(1, int(cpus)) if isinstance(cpus, (int, float)) else 1)
        super().build()
        if self.config._is_online:  # a family that trains differently online (SAC Flow drops its BC update)
            self.agent_module.agent.begin_online_phase()
        self.agent_module.agent.compile_losses(self.config.compile)  # on its device by now (qam_ray.core.compile)
        self.buffer: ChunkReplayBuffer | None = None
        self.shards = None  # a ShardStream when training on a 100M dataset
        self.gradient_steps = 0
        rank = dist.get_rank() if dist.is_initialized() else 0
        self._generator = torch.Generator(device=self._device).manual_seed(self.config.agent_seed + 1_000_003 * rank)

    def _make_modules_ddp_if_necessary(self) -> None:
        # Gradients are averaged explicitly in _average_gradients; broadcast rank 0's initial weights instead.
        if dist.is_initialized() and dist.get_world_size() > 1:
            for tensor in self.agent_module.state_dict().values():
                dist.broadcast(tensor, src=0)

    @property
    def agent_module(self):
        return self.module[DEFAULT_MODULE_ID]

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        agent = self._module[module_id].agent  # already on self._device, so fused Adam is picked on GPU
        for name, optimizer in agent.make_optimizers().items():
            self.register_optimizer(
                module_id=module_id, optimizer_name=name, optimizer=optimizer,
                params=[p for group in optimizer.param_groups for p in group["params"]],
                lr_or_lr_schedule=optimizer.param_groups[0]["lr"],
            )

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        raise NotImplementedError("agents update through run_steps (learner-resident data), not Learner.update")

    def load_dataset(self, env_name: str, dataset_dir: str | None, sparse: bool, online_capacity: int = 0,
                     dataset_size: str = "1M", dataset_url: str | None = None,
                     shard_interval: int = 1000) -> dict:
        """Load the dataset by path onto this learner's device (never through the config), with room for
        ``online_capacity`` online transitions after it.  ``dataset_size="100M"``: the domain's shard folder, one
        shard at a time (``qam_ray.data.shards``); the standard file otherwise, downloaded from ``dataset_url``
        (a mirror) or OGBench's host if missing.  An agent without offline data (``OFFLINE_DATA = False``) gets an
        empty buffer of ``online_capacity`` transitions instead; the online phase samples it only once
        ``start_training`` transitions exist."""
        agent = self.agent_module.agent
        if not type(agent).OFFLINE_DATA:
            self.buffer = ChunkReplayBuffer.empty(agent.hp.obs_dim, agent.hp.action_dim, online_capacity, self._device)
            self.buffer.add_extras(type(agent).DATASET_EXTRAS, agent.hp.discount)
            self._offline_size, self._sparse = 0, sparse
            return dict(NO_DATASET)
        if dataset_size == "100M":
            from ogbench.utils import DEFAULT_DATASET_DIR

            from qam_ray.data.shards import ShardStream, open_shards

            shards = open_shards(env_name, dataset_dir or DEFAULT_DATASET_DIR, sparse)
            self.shards = ShardStream(shards, self._device, shard_interval)
            arrays = self.shards.first(self.gradient_steps)
            info = {"dataset_source": shards.source, "dataset_sha256": shards.digest, "name": os.path.basename(shards.folder),
                    "path": shards.folder, "shards": len(shards.paths), "dataset_size": "100M"}
        else:
            dataset = load_offline_dataset(env_name, dataset_dir, sparse=sparse, url=dataset_url)
            arrays = dataset.train
            info = {"dataset_source": dataset.source, "dataset_sha256": dataset.sha256, "name": dataset.dataset_name,
                    "path": dataset.train_path, "dataset_size": "1M"}
        size = len(arrays["rewards"])
        self.buffer = ChunkReplayBuffer.from_arrays(arrays, self._device, capacity=size + online_capacity)
        self.buffer.add_extras(type(agent).DATASET_EXTRAS, agent.hp.discount)  # over the offline rows only
        self._offline_size, self._sparse = size, sparse
        return {**info, "transitions": size}

    @property
    def online_transitions(self) -> int:
        return self.buffer.size - self._offline_size

    def add_online_transitions(self, transitions: dict, limit: int) -> dict[str, int]:
        """Append env transitions (``episode_transitions`` layout, raw env rewards) with the offline data's reward
        convention, up to ``limit`` online transitions in all (the phase's budget: the rest is dropped).

        Returns the online transitions held ``before`` and ``after``, and the ``gradient_steps`` so far: all the
        driver needs for the iteration, in one call.
        """
        before = self.online_transitions
        if transitions:
            keep = max(0, limit - before)
            transitions = {key: value[:keep] for key, value in transitions.items()}
            if self._sparse:
                transitions["rewards"] = sparse_rewards(transitions["rewards"])
            self.buffer.add_transitions(**transitions)
        return {"before": before, "after": self.online_transitions, "gradient_steps": self.gradient_steps}

    def run_steps(self, num_steps: int, batch_size: int) -> dict[str, float]:
        """``num_steps`` updates; returns the mean of every metric over them (one host sync)."""
        if self.buffer is None:
            raise RuntimeError("AgentLearner.run_steps before load_dataset: the algorithm's setup loads it")
        average = self._average_gradients if dist.is_initialized() and dist.get_world_size() > 1 else None
        means = run_updates(
            self.agent_module.agent, self.agent_optimizers(), self.buffer,
            self._generator, num_steps, batch_size, first_step=self.gradient_steps, on_raw_gradients=average,
            shards=self.shards,
        )
        self.gradient_steps += num_steps
        self._weights_seq_no += 1  # new weights for EnvRunner syncs
        return means

    def agent_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The agent's optimisers under the names ``make_optimizers`` gave them (as registered with RLlib)."""
        return dict(self.get_optimizers_for_module(DEFAULT_MODULE_ID))

    def _average_gradients(self) -> None:
        # The parameters this backward pass reached (all of them for the joint step, which gives each a gradient;
        # a subset per pass for a family that steps several optimisers in turn) — the same set on every rank.
        grads = [p.grad for p in self.agent_module.agent.online_parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, chunk in zip(grads, torch.split(flat, [g.numel() for g in grads])):
            g.copy_(chunk.view_as(g))

    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        state[GENERATOR_STATE] = self._generator.get_state()
        state["gradient_steps"] = self.gradient_steps
        # Online data cannot be reloaded by path, so a checkpoint carries it; weight syncs (which ask for the
        # rl_module component only) do not.
        if self.buffer is not None and self.online_transitions and self._check_component(
                ONLINE_ROWS, components, not_components):
            state[ONLINE_ROWS] = self.buffer.rows(self._offline_size)
        return state

    def set_state(self, state) -> None:
        super().set_state(state)
        if GENERATOR_STATE in state:
            self._generator.set_state(state[GENERATOR_STATE])
        self.gradient_steps = state.get("gradient_steps", self.gradient_steps)
        if ONLINE_ROWS in state:
            self.buffer.truncate(self._offline_size)
            self.buffer.add_transitions(**state[ONLINE_ROWS])
        if self.shards is not None:  # the shard this step trains on, as an uninterrupted run would hold it
            self.shards.reload(self.buffer, self.gradient_steps)

    def bump_weights_seq_no(self) -> None:
        """Make the next weight sync reach EnvRunners, which ignore weights not newer than theirs."""
        self._weights_seq_no += 1

"""Device-resident transition buffer that samples action chunks like the reference's ``Dataset.sample_sequence``.

The whole dataset lives on the learner's device, and start indices are drawn there with a ``torch.Generator``, so
a batch costs a few gathers and no host round trip (DESIGN.md: learner-resident data). Chunk semantics follow
QAM_SPEC §3; for a start t and step i = 0..H-1 (j = t + i):

    actions[i]           a_j (the raw window, which may run past an episode end)
    terminals[i]         max_{k<=i} terminal_{t+k}      (episode-boundary flags, not success)
    valid[i]             1, or 1 - terminals[i-1] for i >= 1
    rewards[i]           sum_{k<=i} discount^k * r_{t+k} * valid[k]
    masks[i]             min of mask_{t+k} over the valid k <= i (a success inside the chunk stops bootstrapping)
    next_observations[i] s'_j while valid, then repeated from the last valid step
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

TRANSITION_KEYS = ('observations', 'actions', 'next_observations', 'rewards', 'masks', 'terminals')
# Keys holding one scalar per transition; the others hold a vector per transition.
_SCALAR_KEYS = ('rewards', 'masks', 'terminals')


def returns_to_go(rewards: torch.Tensor, terminals: torch.Tensor, discount: float) -> torch.Tensor:
    """G_t = Σ_{j≥t, same episode} γ^{j−t}·r_j: the recurrence G_t = r_t + γ·(1 − terminal_t)·G_{t+1} (the last row
    ends an episode too), solved by a log-depth parallel scan in float64 (no per-row loop, no γ^t underflow)."""
    g = rewards.double().clone()
    a = discount * (1.0 - terminals.double())
    a[-1:] = 0.0
    shift = 1
    while shift < g.shape[0]:  # after this pass, (a_t, g_t) composes the rows [t, t + 2·shift)
        g[:-shift] = g[:-shift] + a[:-shift] * g[shift:]
        a[:-shift] = a[:-shift] * a[shift:]
        shift *= 2
    return g.float()


# Per-row columns an agent may ask for (``Agent.DATASET_EXTRAS``): name → f(storage, size, discount) over the offline
# rows [0, size).  Online rows keep 0; ``sample`` returns a column at each chunk's start.
EXTRA_COLUMNS = {
    'returns_to_go': lambda storage, size, discount: returns_to_go(
        storage['rewards'][:size], storage['terminals'][:size], discount),
}


class ChunkReplayBuffer:
    """Fixed-capacity float32 storage for TRANSITION_KEYS; rows [0, size) hold data in time order."""

    def __init__(self, storage: dict[str, torch.Tensor], size: int):
        self._storage = storage
        self._size = size
        self._extras: dict[str, float] = {}  # EXTRA_COLUMNS stored → the discount they were computed with

    def add_extras(self, names: tuple[str, ...], discount: float) -> None:
        """Compute the EXTRA_COLUMNS ``names`` over the rows held now (the offline data); rows added later get 0."""
        unknown = set(names) - set(EXTRA_COLUMNS)
        if unknown:
            raise ValueError(f'unknown dataset extras {sorted(unknown)}; known: {", ".join(EXTRA_COLUMNS)}.')
        for name in names:
            column = torch.zeros(self.capacity, dtype=torch.float32, device=self.device)
            if self._size:
                column[:self._size] = EXTRA_COLUMNS[name](self._storage, self._size, discount)
            self._storage[name] = column
            self._extras[name] = discount

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], device: torch.device | str,
                    capacity: int | None = None) -> ChunkReplayBuffer:
        """Copy a dataset onto ``device`` once; ``capacity`` > N leaves room for online transitions."""
        blocks = _as_block(arrays, 'cpu')
        size = blocks['observations'].shape[0]
        capacity = size if capacity is None else capacity
        if capacity < size:
            raise ValueError(f'capacity {capacity} is smaller than the dataset ({size} transitions).')
        storage = {}
        for key, block in blocks.items():
            storage[key] = torch.zeros((capacity, *block.shape[1:]), dtype=torch.float32, device=device)
            storage[key][:size].copy_(block)
        return cls(storage, size)

    @classmethod
    def empty(cls, obs_dim: int, action_dim: int, capacity: int, device: torch.device | str) -> ChunkReplayBuffer:
        """An empty buffer for ``capacity`` transitions (an online-only run: no offline dataset)."""
        dims = {'observations': obs_dim, 'next_observations': obs_dim, 'actions': action_dim}
        storage = {key: torch.zeros((capacity, *([dims[key]] if key in dims else [])), dtype=torch.float32,
                                    device=device) for key in TRANSITION_KEYS}
        return cls(storage, 0)

    @property
    def size(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return self._storage['observations'].shape[0]

    @property
    def device(self) -> torch.device:
        return self._storage['observations'].device

    @property
    def obs_dim(self) -> int:
        return self._storage['observations'].shape[1]

    @property
    def action_dim(self) -> int:
        return self._storage['actions'].shape[1]

    def add_transitions(self, **transitions: torch.Tensor | np.ndarray) -> None:
        """Append a block of n transitions (every key of TRANSITION_KEYS, leading dim n) after the current data.

        Online data marks ``terminals`` = episode done and ``masks`` = 1 - terminated (QAM_SPEC §3).
        """
        blocks = _as_block(transitions, self.device)
        count = blocks['observations'].shape[0]
        for key, block in blocks.items():
            if block.shape[1:] != self._storage[key].shape[1:]:
                raise ValueError(
                    f'{key!r} has per-transition shape {tuple(block.shape[1:])}, the buffer stores '
                    f'{tuple(self._storage[key].shape[1:])}.'
                )
        if self._size + count > self.capacity:
            raise RuntimeError(
                f'ChunkReplayBuffer is full: {self._size}/{self.capacity} transitions stored, cannot add {count}. '
                'Create it with capacity = offline transitions + online steps.'
            )
        for key, block in blocks.items():
            self._storage[key][self._size : self._size + count] = block
        self._size += count

    def overwrite_prefix(self, **transitions: torch.Tensor | np.ndarray) -> None:
        """Replace rows [0, n) with a block of n transitions (a 100M shard swapped in); rows after them stay."""
        blocks = _as_block(transitions, self.device)
        count = blocks['observations'].shape[0]
        if count > self._size:
            raise ValueError(f'cannot overwrite the first {count} rows of a buffer holding {self._size}.')
        for key, block in blocks.items():
            self._storage[key][:count].copy_(block, non_blocking=True)
        for name, discount in self._extras.items():  # the new rows' own columns
            self._storage[name][:count] = EXTRA_COLUMNS[name](self._storage, count, discount)

    def rows(self, start: int) -> dict[str, np.ndarray]:
        """Rows [start, size) of TRANSITION_KEYS as host arrays (e.g. the online part, for a checkpoint)."""
        return {key: self._storage[key][start:self._size].cpu().numpy() for key in TRANSITION_KEYS}

    def truncate(self, size: int) -> None:
        """Forget rows [size, current size); capacity is kept (a restore refills them with ``add_transitions``)."""
        if not 0 <= size <= self._size:
            raise ValueError(f'cannot truncate a buffer of {self._size} transitions to {size}.')
        self._size = size

    def sample(self, batch_size: int, horizon: int, discount: float,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A batch of chunks whose start is uniform over every full window, t in [0, size - horizon]."""
        self._check_horizon(horizon)
        if generator.device.type != self.device.type:
            raise ValueError(f'generator is on {generator.device}, the buffer on {self.device}; they must match.')
        starts = torch.randint(0, self._size - horizon + 1, (batch_size,), generator=generator, device=self.device)
        return self._gather(starts, horizon, discount)

    def gather_chunks(self, starts: torch.Tensor, horizon: int, discount: float) -> dict[str, torch.Tensor]:
        """The chunks starting at the given indices (each in [0, size - horizon])."""
        self._check_horizon(horizon)
        starts = torch.as_tensor(starts, dtype=torch.long, device=self.device)
        # sample() skips this check: it needs a device-to-host copy, and sample's starts are in range by construction.
        if starts.numel() and (starts.min() < 0 or starts.max() > self._size - horizon):
            raise IndexError(f'chunk starts must lie in [0, {self._size - horizon}] (size {self._size}, H {horizon}).')
        return self._gather(starts, horizon, discount)

    def _check_horizon(self, horizon: int) -> None:
        if not 1 <= horizon <= self._size:
            raise ValueError(f'horizon must be in [1, size={self._size}], got {horizon}.')

    def _gather(self, starts: torch.Tensor, horizon: int, discount: float) -> dict[str, torch.Tensor]:
        data = self._storage
        steps = torch.arange(horizon, device=self.device)
        index = starts[:, None] + steps  # (B, H)

        terminals = torch.cummax(data['terminals'][index], dim=1).values
        # valid[i] = 1 - terminals[i-1]: the step right after an episode end belongs to the next episode.
        valid = torch.ones_like(terminals)
        valid[:, 1:] = 1.0 - terminals[:, :-1]

        step_discounts = discount ** steps.to(torch.float32)
        rewards = torch.cumsum(data['rewards'][index] * step_discounts * valid, dim=1)
        # Invalid steps must not lower the running minimum; +inf drops them from it.
        masks = torch.cummin(torch.where(valid > 0, data['masks'][index], torch.inf), dim=1).values

        # valid is 1 on a prefix of the chunk, so "repeat the last valid s'" means clamping i to the prefix end.
        last_valid = valid.sum(dim=1, keepdim=True).long() - 1
        next_index = starts[:, None] + torch.minimum(steps, last_valid)

        return {
            'observations': data['observations'][starts],
            'actions': data['actions'][index],
            'next_observations': data['next_observations'][next_index],
            'rewards': rewards,
            'masks': masks,
            'terminals': terminals,
            'valid': valid,
            **{name: data[name][starts] for name in self._extras},
        }


def _as_block(arrays: Mapping[str, torch.Tensor | np.ndarray], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Check a block of transitions (exactly TRANSITION_KEYS, one leading length n) and make float32 tensors."""
    if set(arrays) != set(TRANSITION_KEYS):
        raise ValueError(f'expected exactly the keys {TRANSITION_KEYS}, got {sorted(arrays)}.')
    blocks = {key: torch.as_tensor(arrays[key], dtype=torch.float32, device=device) for key in TRANSITION_KEYS}
    for key, block in blocks.items():
        scalar = key in _SCALAR_KEYS
        if block.dim() != (1 if scalar else 2):
            raise ValueError(f"{key!r} has shape {tuple(block.shape)}; expected {'(n,)' if scalar else '(n, dim)'}.")
        if block.shape[0] != blocks['observations'].shape[0]:
            raise ValueError(f"{key!r} has {block.shape[0]} rows, observations {blocks['observations'].shape[0]}.")
    if blocks['next_observations'].shape[1:] != blocks['observations'].shape[1:]:
        raise ValueError('next_observations and observations must have the same dim.')
    return blocks


def synthetic_buffer(obs_dim: int, action_dim: int, device: torch.device | str, size: int = 3000,
                     episode_length: int = 1000, seed: int = 0) -> ChunkReplayBuffer:
    """Random transitions of the given sizes in episodes of ``episode_length`` rows, rewards in {−1, 0}: an update's
    cost does not depend on the data's values, so the benchmark and the tests train on this without ogbench."""
    rng = np.random.default_rng(seed)
    terminals = np.zeros(size, np.float32)
    terminals[episode_length - 1::episode_length] = 1.0
    arrays = {"observations": rng.standard_normal((size, obs_dim), np.float32),
              "actions": rng.uniform(-1, 1, (size, action_dim)).astype(np.float32),
              "next_observations": rng.standard_normal((size, obs_dim), np.float32),
              "rewards": -(rng.uniform(size=size) < 0.5).astype(np.float32), "masks": np.ones(size, np.float32),
              "terminals": terminals}
    return ChunkReplayBuffer.from_arrays(arrays, device)

"""The 100M-transition datasets as the paper trains on them (QAM_SPEC §9): a folder of shards, one on the learner's
device at a time, the next one swapped in every 1,000 gradient steps.

Layout: ``<dataset_dir>/<env>-<type>-100m-v0/`` (e.g. ``cube-quadruple-play-100m-v0/``; ``dataset_dir`` may also
be that folder itself, as the reference's ``--ogbench_dataset_dir`` is).  Every ``*.npz`` in it whose name does not
end in ``-val.npz`` is a training shard; shards are used in sorted name order, cyclically, shard
``(step // interval) % n`` at gradient step ``step`` (so a restored trial reloads exactly the shard it had).  Each
shard is an OGBench-format file (with ``qpos``, and ``button_states`` for puzzle) relabelled by ogbench for the
task, and **not** action-clipped (the reference does not clip these shards).  All shards must hold the same number
of rows: online, a shard overwrites the first N rows of the replay buffer and the online data after them stays.

The swap must not stall training: the next shard is read, relabelled and copied to the device on a background
thread while updates run (on CUDA through pinned memory on a side stream), so a swap costs one device-side copy
into the buffer's first rows plus any wait for the loader.  The device then holds two shards (buffer + staging).
"""

from __future__ import annotations

import glob
import hashlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import ogbench
import torch

from qam_ray.data.ogbench_data import (DatasetError, _check_raw_file, _checked_manifest, _npy_headers, _parse_name,
                                       _preprocess, load_relabelled_file)
from qam_ray.data.replay import ChunkReplayBuffer
from qam_ray.domains import SingletaskName

SHARD_INTERVAL = 1000  # gradient steps per shard (the reference's --dataset_replace_interval)


def shard_folder_name(dataset_name: str) -> str:
    """``cube-quadruple-play-v0`` → ``cube-quadruple-play-100m-v0``."""
    return dataset_name.removesuffix('-v0') + '-100m-v0'


def how_to_get_shards(name: SingletaskName, dataset_dir: str) -> str:
    folder = shard_folder_name(name.dataset_name)
    return (f'The 100M dataset of {name.domain_name} is a folder of shards: {os.path.join(dataset_dir, folder)}/ '
            f'with one OGBench .npz file per shard (names sorted in training order; *-val.npz files are skipped). '
            f'Download it from OGBench\'s host ({folder}/), or generate small shards in that layout: `python '
            f'experiments/generate_data.py --env {name.env_prefix} --type {name.dataset_type} --episodes 10 '
            f'--shards 4 --out {dataset_dir}`; or train on the standard 1M file with --dataset-size 1M.')


def shard_folder(env_name: str, dataset_dir: str) -> str:
    """The shard folder of ``env_name``'s dataset under (or at) ``dataset_dir``; raises DatasetError if absent."""
    name = _parse_name(env_name)
    dataset_dir = os.path.abspath(os.path.expanduser(dataset_dir))
    folder_name = shard_folder_name(name.dataset_name)
    for folder in (os.path.join(dataset_dir, folder_name), dataset_dir):
        if os.path.basename(folder) == folder_name and os.path.isdir(folder):
            return folder
    raise DatasetError(f'{os.path.join(dataset_dir, folder_name)}/ is missing. ' + how_to_get_shards(name, dataset_dir))


def shard_paths(folder: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(folder, '*.npz')) if not p.endswith('-val.npz'))


@dataclass(frozen=True)
class ShardedDataset:
    env_name: str
    dataset_name: str  # the 1M file stem, e.g. 'cube-quadruple-play-v0'
    folder: str
    paths: tuple[str, ...]
    rows: int  # per shard, on disk
    source: str  # 'official' or 'generated'
    digest: str  # sha256 of the shard names and byte sizes: identifies the folder without reading 100 GB
    sparse: bool

    @property
    def name(self) -> SingletaskName:
        return _parse_name(self.env_name)

    def load(self, index: int, env) -> dict[str, np.ndarray]:
        """Shard ``index`` relabelled for the task by ``env``, as float32 arrays (not action-clipped)."""
        return _preprocess(load_relabelled_file(self.paths[index], self.name, env), self.sparse, clip_actions=False)

    def make_env(self):
        return ogbench.make_env_and_datasets(self.env_name, env_only=True)


def open_shards(env_name: str, dataset_dir: str, sparse: bool = False) -> ShardedDataset:
    """Find and validate ``env_name``'s shard folder without loading any shard's arrays: every shard's keys,
    dtypes, shapes and episode ends, equal row counts, and generated shards' manifests against their files."""
    name = _parse_name(env_name)
    folder = shard_folder(env_name, dataset_dir)
    paths = shard_paths(folder)
    if not paths:
        raise DatasetError(f'{folder}/ holds no shard (*.npz other than *-val.npz). '
                           + how_to_get_shards(name, os.path.dirname(folder)))
    rows, generated = {}, 0
    for path in paths:
        _check_raw_file(path, name)
        rows[path] = _npy_headers(path)['observations'][0][0]
        stem = os.path.basename(path)[:-len('.npz')]
        val = os.path.join(folder, f'{stem}-val.npz')
        manifest = _checked_manifest(folder, name, [path, val], stem) if os.path.exists(val) else None
        generated += manifest is not None
    if len(set(rows.values())) > 1:
        counts = ', '.join(f'{os.path.basename(p)}: {r}' for p, r in rows.items())
        raise DatasetError(f'the shards in {folder} differ in length ({counts}); a swapped-in shard replaces the '
                           'previous one row for row, so every shard needs the same number of rows.')
    if generated not in (0, len(paths)):
        raise DatasetError(f'{folder} mixes generated shards (with a manifest) and official ones; keep one kind.')
    digest = hashlib.sha256('\n'.join(f'{os.path.basename(p)} {os.path.getsize(p)}' for p in paths).encode())
    return ShardedDataset(env_name, name.dataset_name, folder, tuple(paths), rows[paths[0]],
                          'generated' if generated else 'official', digest.hexdigest(), sparse)


class ShardStream:
    """Which shard the buffer holds at each gradient step, and a background loader for the next one."""

    def __init__(self, dataset: ShardedDataset, device: torch.device | str, interval: int = SHARD_INTERVAL):
        if interval < 1:
            raise ValueError(f'shard interval {interval}: must be >= 1 gradient step')
        self.dataset, self.device, self.interval = dataset, torch.device(device), interval
        self._env = dataset.make_env()  # the relabelling needs the task's env; only the loader thread touches it
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix='shard-loader')
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == 'cuda' else None
        self._next: tuple[int, Future] | None = None
        self.transitions = 0  # per shard, after OGBench's pairing of rows into transitions

    def shard_at(self, step: int) -> int:
        return (step // self.interval) % len(self.dataset.paths)

    def steps_to_swap(self, step: int) -> int:
        """Updates until the next swap boundary (a full interval when ``step`` is on one)."""
        return self.interval - step % self.interval

    def first(self, step: int) -> dict[str, np.ndarray]:
        """The arrays of the shard for ``step`` (loaded now, to build the buffer from); prefetching starts."""
        arrays = self._executor.submit(self.dataset.load, self.shard_at(step), self._env).result()
        self.transitions = len(arrays['rewards'])
        self._prefetch(step + self.steps_to_swap(step))
        return arrays

    def reload(self, buffer: ChunkReplayBuffer, step: int) -> None:
        """Put the shard for ``step`` into the buffer's first rows now (after a restore to another step)."""
        self._cancel()
        self._write(buffer, self._executor.submit(self._stage, self.shard_at(step)).result())
        self._prefetch(step + self.steps_to_swap(step))

    def swap(self, buffer: ChunkReplayBuffer, step: int) -> float:
        """At a swap boundary: the prefetched shard into the buffer's first rows; returns the seconds the caller
        waited (for the loader, plus the device copy)."""
        start = time.perf_counter()
        index = self.shard_at(step)
        if self._next is None or self._next[0] != index:
            self._cancel()
            self._prefetch(step)
        staged = self._next[1].result()
        self._next = None
        self._write(buffer, staged)
        self._prefetch(step + self.interval)
        if self.device.type == 'cuda':
            torch.cuda.current_stream(self.device).synchronize()  # the stall includes the copy
        return time.perf_counter() - start

    def close(self) -> None:
        self._cancel()
        self._executor.shutdown(wait=True)
        self._env.close()

    def _prefetch(self, step: int) -> None:
        index = self.shard_at(step)
        self._next = (index, self._executor.submit(self._stage, index))

    def _cancel(self) -> None:
        if self._next is not None:
            self._next[1].cancel() or self._next[1].result()
            self._next = None

    def _stage(self, index: int) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        """Shard ``index`` as tensors on the device (runs on the loader thread)."""
        arrays = self.dataset.load(index, self._env)
        if len(arrays['rewards']) != self.transitions:
            raise DatasetError(f'{self.dataset.paths[index]} gives {len(arrays["rewards"])} transitions, the first '
                               f'shard {self.transitions}; every shard needs the same episodes.')
        if self._copy_stream is None:
            return {key: torch.from_numpy(value) for key, value in arrays.items()}, None
        with torch.cuda.stream(self._copy_stream):
            block = {key: torch.from_numpy(value).pin_memory().to(self.device, non_blocking=True)
                     for key, value in arrays.items()}
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return block, event

    def _write(self, buffer: ChunkReplayBuffer, staged) -> None:
        block, event = staged
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for tensor in block.values():  # allocated on the copy stream, read on this one
                tensor.record_stream(current)
        buffer.overwrite_prefix(**block)

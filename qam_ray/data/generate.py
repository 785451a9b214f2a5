"""Generate OGBench datasets offline: manipulation with the oracles shipped in the ``ogbench`` package, locomotion
with a scripted random walk of the real env.

The official OGBench datasets are downloaded from the internet, which this project cannot rely on. The scripted
oracles that produced those datasets ship inside the ``ogbench`` pip package, so this module re-creates datasets
with the same recipe and writes them in the official on-disk format. ``ogbench.make_env_and_datasets(...,
dataset_dir=DIR)`` then loads them without attempting a download.

Recipe (the one used for the official files):

* ``play``: non-Markovian plan oracle with temporally smoothed noise (noise 0.1, smoothing 0.5).
* ``noisy``: Markovian oracle (min_norm 0.4) plus per-episode Gaussian action noise, plus uniformly random actions
  with probability 0.1 (cube, scene) or 0.2 (puzzle).

Locomotion (antmaze, humanoidmaze ``navigate``): the official files were collected by SAC experts whose checkpoints
are a download, so this module cannot reproduce them.  It writes format-valid datasets instead (the same keys,
dtypes, ``qpos``/``qvel`` of each row's state, episode length) whose behaviour is a temporally correlated random walk
of the real env: actions follow an Ornstein-Uhlenbeck process (``LOCOMOTION_OU_THETA``, ``LOCOMOTION_OU_SIGMA``),
clipped to [-1, 1].  The manifest records that behaviour, so such data can never pass as the official datasets.

Every generated dataset gets a manifest (``<name>.manifest.json``, ``"source": "generated"``) so that results computed
on generated data can always be told apart from results on the official files (which have no manifest). The physics
version differs from the one used for the official files, so trajectories are not bit-identical to them.

The output depends only on ``seed``: every episode gets its own seed derived from (seed, split, episode index), so
the number of worker processes does not change a single byte of the arrays.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import queue
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

MANIPULATION_ENVS = (
    'cube-single',
    'cube-double',
    'cube-triple',
    'cube-quadruple',
    'scene',
    'puzzle-3x3',
    'puzzle-4x4',
    'puzzle-4x5',
    'puzzle-4x6',
)
LOCOMOTION_ENVS = ('antmaze-medium', 'antmaze-large', 'antmaze-giant', 'humanoidmaze-medium', 'humanoidmaze-large',
                   'humanoidmaze-giant')
SUPPORTED_ENVS = MANIPULATION_ENVS + LOCOMOTION_ENVS
MANIPULATION_TYPES, LOCOMOTION_TYPES = ('play', 'noisy'), ('navigate',)
DATASET_TYPES = MANIPULATION_TYPES + LOCOMOTION_TYPES
# Rows per episode of the official files: 1001, except humanoidmaze navigate (2001) and the giant mazes (4001).
LOCOMOTION_EPISODE_LENGTH = {'humanoidmaze-medium': 2001, 'humanoidmaze-large': 2001, 'humanoidmaze-giant': 4001,
                             'antmaze-giant': 1001}
DEFAULT_EPISODE_LENGTH = 1001
# The locomotion behaviour: a_t = clip(x_t), x_{t+1} = x_t − θ·x_t + σ·N(0, I) with x_0 ~ N(0, σ²/(2θ − θ²) I)
# (stationary from the start): smooth enough to move the body across the maze, random enough to cover it.
LOCOMOTION_OU_THETA, LOCOMOTION_OU_SIGMA = 0.15, 0.3
LOCOMOTION_BEHAVIOUR = f'ornstein-uhlenbeck random walk (theta {LOCOMOTION_OU_THETA}, sigma {LOCOMOTION_OU_SIGMA})'

GENERATOR = 'qam_ray.data.generate'

# Plan oracle noise for 'play' data (scale of the plan noise and its Gaussian smoothing sigma, in plan steps).
PLAN_NOISE = 0.1
PLAN_NOISE_SMOOTHING = 0.5
# Markov oracle for 'noisy' data: minimum norm of the shaped position error (makes the oracle move decisively).
MARKOV_MIN_NORM = 0.4
# 'noisy' data draws one Gaussian noise level per episode from U(0, MARKOV_MAX_NOISE); the yaw and gripper
# dimensions get a proportionally larger noise because their action ranges map to larger physical changes.
MARKOV_MAX_NOISE = 0.1
MARKOV_NOISE_SCALE = np.array([1.0, 1.0, 1.0, 3.0, 10.0])
# Probability of replacing the oracle action with a uniformly random one in 'noisy' data, per env family.
NOISY_RANDOM_ACTION_PROB = {'cube': 0.1, 'scene': 0.1, 'puzzle': 0.2}
# Multi-cube envs draw a per-episode probability of stacking the next target cube on another cube from these
# ranges, so that a dataset mixes episodes with few and many stacks. Scene and puzzle use a fixed 0.5
# (scene has a single cube and puzzle ignores it, so it has no effect there).
STACK_PROB_RANGE = {
    'cube-single': (0.0, 0.0),
    'cube-double': (0.0, 0.25),
    'cube-triple': (0.05, 0.35),
    'cube-quadruple': (0.1, 0.5),
}
DEFAULT_STACK_PROB = 0.5
# Manipspace actions are normalised to [-1, 1] in all 5 dimensions (dx, dy, dz, dyaw, dgripper).
ACTION_DIM = 5
# Keys (in the official order) and dtypes of the .npz files; button_states only for scene and puzzle.
ON_DISK_DTYPES = {
    'observations': np.float32,
    'actions': np.float32,
    'terminals': bool,
    'qpos': np.float32,
    'qvel': np.float32,
    'button_states': np.int64,
}
# Numeric codes of the two splits, mixed into the per-episode seeds so train and val episodes never share a seed.
SPLIT_CODES = {'train': 0, 'val': 1}


@dataclass(frozen=True)
class _Spec:
    """What one worker needs to build its env and oracles (picklable, so it can be sent to a spawned process)."""

    env_name: str
    dataset_type: str
    episode_length: int

    @property
    def family(self) -> str:
        return self.env_name.split('-')[0]

    @property
    def has_buttons(self) -> bool:
        return self.family in ('scene', 'puzzle')

    @property
    def locomotion(self) -> bool:
        return self.env_name in LOCOMOTION_ENVS


def dataset_name(env_name: str, dataset_type: str) -> str:
    """File stem of a dataset, as ``ogbench.make_env_and_datasets`` expects it (e.g. ``cube-single-play-v0``)."""
    return f'{env_name}-{dataset_type}-v0'


def default_episode_length(env_name: str) -> int:
    """Rows per episode of the official files for ``env_name``."""
    return LOCOMOTION_EPISODE_LENGTH.get(env_name, DEFAULT_EPISODE_LENGTH)


def _validate(env_name: str, dataset_type: str, episodes: int, episode_length: int, workers: int) -> None:
    if env_name not in SUPPORTED_ENVS:
        raise ValueError(
            f'Unsupported env {env_name!r}; supported envs: {", ".join(SUPPORTED_ENVS)}. antsoccer, pointmaze, '
            'visual-* and powderworld are not implemented here.'
        )
    types = LOCOMOTION_TYPES if env_name in LOCOMOTION_ENVS else MANIPULATION_TYPES
    if dataset_type not in types:
        raise ValueError(f'Unsupported dataset type {dataset_type!r} for {env_name}; supported: {", ".join(types)}.')
    if episodes < 1:
        raise ValueError(f'episodes must be >= 1, got {episodes}.')
    # ogbench turns each episode into (rows - 1) transitions, so a 1-row episode would contribute nothing.
    if episode_length < 2:
        raise ValueError(f'episode_length must be >= 2, got {episode_length}.')
    if workers < 1:
        raise ValueError(f'workers must be >= 1, got {workers}.')


def _episode_seeds(seed: int, split: str, index: int) -> tuple[int, int]:
    """Two independent 32-bit seeds for one episode: one for the global np.random, one for env.reset."""
    np_seed, env_seed = np.random.SeedSequence([seed, SPLIT_CODES[split], index]).generate_state(2)
    return int(np_seed), int(env_seed)


def _make_env(spec: _Spec):
    import gymnasium

    if spec.locomotion:
        import ogbench.locomaze  # noqa: F401  (registers the maze envs with gymnasium)

        # Episodes run their full length whatever the agent reaches, as in the official navigate data.
        return gymnasium.make(f'{spec.env_name}-v0', terminate_at_goal=False, max_episode_steps=spec.episode_length)
    import ogbench.manipspace  # noqa: F401  (registers the manipspace envs with gymnasium)

    # 'data_collection' mode randomises the scene and exposes the oracle targets in info['privileged/...'];
    # terminate_at_goal=False because the data is task-agnostic and episodes must run for their full length.
    return gymnasium.make(
        f'{spec.env_name}-v0',
        terminate_at_goal=False,
        mode='data_collection',
        max_episode_steps=spec.episode_length,
    )


def _make_oracles(env, spec: _Spec) -> dict:
    """One oracle per target task the env can set (keys match info['privileged/target_task']); none for locomotion."""
    if spec.locomotion:
        return {}
    from ogbench.manipspace.oracles.markov.button_markov import ButtonMarkovOracle
    from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle
    from ogbench.manipspace.oracles.markov.drawer_markov import DrawerMarkovOracle
    from ogbench.manipspace.oracles.markov.window_markov import WindowMarkovOracle
    from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
    from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
    from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

    if spec.dataset_type == 'play':
        cube, button, drawer, window = CubePlanOracle, ButtonPlanOracle, DrawerPlanOracle, WindowPlanOracle
        kwargs = dict(env=env, noise=PLAN_NOISE, noise_smoothing=PLAN_NOISE_SMOOTHING)
        scene_cube_kwargs = {}
    else:
        cube, button, drawer, window = CubeMarkovOracle, ButtonMarkovOracle, DrawerMarkovOracle, WindowMarkovOracle
        kwargs = dict(env=env, min_norm=MARKOV_MIN_NORM)
        # The official scene recipe gives cube sub-tasks a 100-step budget. (ogbench 1.2.2's CubeMarkovOracle.reset
        # resets it to 200, so this only takes effect once that is fixed upstream.)
        scene_cube_kwargs = {'max_step': 100}

    if spec.family == 'cube':
        return {'cube': cube(**kwargs)}
    if spec.family == 'puzzle':
        # Puzzle buttons are pressed with the gripper closed.
        return {'button': button(gripper_always_closed=True, **kwargs)}
    return {
        'cube': cube(**scene_cube_kwargs, **kwargs),
        'button': button(**kwargs),
        'drawer': drawer(**kwargs),
        'window': window(**kwargs),
    }


def _select_action(oracle, ob, info, spec: _Spec, noise_level: float) -> np.ndarray:
    """Oracle action with the 'noisy' corruptions applied; all randomness comes from the global np.random."""
    noisy = spec.dataset_type == 'noisy'
    if noisy and np.random.rand() < NOISY_RANDOM_ACTION_PROB[spec.family]:
        return np.random.uniform(-1.0, 1.0, size=ACTION_DIM)
    action = np.asarray(oracle.select_action(ob, info), dtype=np.float64)
    if noisy:
        action = action + np.random.normal(0.0, noise_level * MARKOV_NOISE_SCALE)
    return np.clip(action, -1.0, 1.0)


def _locomotion_rollout(env, spec: _Spec, reset_seed: int | None) -> dict[str, np.ndarray]:
    """One episode of the Ornstein-Uhlenbeck random walk (all randomness from the global np.random)."""
    ob, _ = env.reset(seed=reset_seed)
    action_dim = env.action_space.shape[0]
    theta, sigma = LOCOMOTION_OU_THETA, LOCOMOTION_OU_SIGMA
    x = np.random.normal(0.0, sigma / np.sqrt(2 * theta - theta**2), size=action_dim)
    rows = {'observations': [], 'actions': [], 'qpos': [], 'qvel': []}
    for _ in range(spec.episode_length):
        action = np.clip(x, -1.0, 1.0)
        next_ob, _, _, _, info = env.step(action)
        rows['observations'].append(ob)
        rows['actions'].append(action)
        rows['qpos'].append(info['prev_qpos'])  # the state that matches `ob` on this row
        rows['qvel'].append(info['prev_qvel'])
        x = x - theta * x + sigma * np.random.normal(size=action_dim)
        ob = next_ob
    return _finish_episode(rows, spec)


def _finish_episode(rows: dict[str, list], spec: _Spec) -> dict[str, np.ndarray]:
    episode = {key: np.asarray(values, dtype=ON_DISK_DTYPES[key]) for key, values in rows.items()}
    episode['terminals'] = np.zeros(spec.episode_length, dtype=bool)
    episode['terminals'][-1] = True
    return episode


def _rollout(env, oracles: dict, spec: _Spec, reset_seed: int | None) -> dict[str, np.ndarray]:
    """Run one episode of exactly ``spec.episode_length`` rows and return it in the on-disk dtypes."""
    if spec.locomotion:
        return _locomotion_rollout(env, spec, reset_seed)
    ob, info = env.reset(seed=reset_seed)
    low, high = STACK_PROB_RANGE.get(spec.env_name, (DEFAULT_STACK_PROB, DEFAULT_STACK_PROB))
    p_stack = np.random.uniform(low, high)
    noise_level = np.random.uniform(0.0, MARKOV_MAX_NOISE) if spec.dataset_type == 'noisy' else 0.0
    oracle = oracles[info['privileged/target_task']]
    oracle.reset(ob, info)

    rows = {'observations': [], 'actions': [], 'qpos': [], 'qvel': []}
    if spec.has_buttons:
        rows['button_states'] = []
    for _ in range(spec.episode_length):
        action = _select_action(oracle, ob, info, spec, noise_level)
        next_ob, _, _, _, info = env.step(action)
        # The env keeps going after a sub-task: when the oracle is done, a new random target is set in place.
        if oracle.done:
            target_ob, target_info = env.unwrapped.set_new_target(p_stack=p_stack)
            oracle = oracles[target_info['privileged/target_task']]
            oracle.reset(target_ob, target_info)
        rows['observations'].append(ob)
        rows['actions'].append(action)
        # info['prev_*'] is the physical state before this step, i.e. the state that matches `ob` on this row;
        # ogbench's singletask reward relabelling reads it.
        rows['qpos'].append(info['prev_qpos'])
        rows['qvel'].append(info['prev_qvel'])
        if spec.has_buttons:
            rows['button_states'].append(info['prev_button_states'])
        ob = next_ob
    return _finish_episode(rows, spec)


def _scene_is_healthy(qpos: np.ndarray) -> bool:
    """Reject scene episodes where the cube leaves view other than into the drawer (goal images would be ambiguous)."""
    cube_xyz = qpos[:, 14:17]
    too_far_right = cube_xyz[:, 1] >= 0.29
    too_far_left_outside_drawer = (cube_xyz[:, 1] <= -0.3) & ((cube_xyz[:, 2] < 0.06) | (cube_xyz[:, 2] > 0.08))
    return not (too_far_right.any() or too_far_left_outside_drawer.any())


def _generate_episode(env, oracles: dict, spec: _Spec, seeds: tuple[int, int]) -> tuple[dict, int]:
    """One episode from its own seeds (oracles draw from the global np.random). Returns (episode, retries)."""
    np_seed, env_seed = seeds
    np.random.seed(np_seed)
    reset_seed = env_seed
    retries = 0
    while True:
        episode = _rollout(env, oracles, spec, reset_seed)
        if spec.family != 'scene' or _scene_is_healthy(episode['qpos']):
            return episode, retries
        # Retry without reseeding: the env and np.random streams continue, so the retry is a new but still
        # deterministic scene.
        reset_seed = None
        retries += 1


def _generate_episodes(spec: _Spec, jobs: list, on_episode_done: Callable[[], None]) -> tuple[list, int]:
    """Build the env once and generate the episodes for ``jobs`` (a list of seed pairs) in order."""
    env = _make_env(spec)
    oracles = _make_oracles(env, spec)
    # Per-episode seeding clobbers the global np.random; restore it so an in-process caller is not affected.
    saved_np_state = np.random.get_state()
    episodes, retries = [], 0
    try:
        for seeds in jobs:
            episode, episode_retries = _generate_episode(env, oracles, spec, seeds)
            episodes.append(episode)
            retries += episode_retries
            on_episode_done()
    finally:
        np.random.set_state(saved_np_state)
        env.close()
    return episodes, retries


def _worker(spec: _Spec, jobs: list, progress_queue) -> tuple[list, int]:
    """Entry point of a worker process: report each finished episode to the parent's progress bar."""
    return _generate_episodes(spec, jobs, lambda: progress_queue.put(1))


def _split_contiguous(items: list, parts: int) -> list[list]:
    bounds = np.linspace(0, len(items), parts + 1).astype(int)
    return [items[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]


def _drain_progress(progress_queue, progress_bar) -> None:
    while True:
        try:
            progress_bar.update(progress_queue.get_nowait())
        except queue.Empty:
            return


def _generate_parallel(spec: _Spec, jobs: list, workers: int, progress_bar) -> tuple[list, int]:
    """Run contiguous ranges of ``jobs`` in ``workers`` spawned processes; results keep the order of ``jobs``."""
    chunks = _split_contiguous(jobs, min(workers, len(jobs)))
    # 'spawn' rather than fork: MuJoCo/GL state and threads in the parent must not be inherited.
    context = multiprocessing.get_context('spawn')
    with context.Manager() as manager, concurrent.futures.ProcessPoolExecutor(len(chunks), mp_context=context) as pool:
        progress_queue = manager.Queue()
        futures = [pool.submit(_worker, spec, chunk, progress_queue) for chunk in chunks]
        pending = set(futures)
        while pending:
            _, pending = concurrent.futures.wait(pending, timeout=0.2)
            _drain_progress(progress_queue, progress_bar)
        results = [future.result() for future in futures]
    episodes = [episode for chunk_episodes, _ in results for episode in chunk_episodes]
    return episodes, sum(retries for _, retries in results)


def _concatenate(episodes: list[dict]) -> dict[str, np.ndarray]:
    # Official key order; button_states only exists for scene and puzzle.
    keys = [key for key in ON_DISK_DTYPES if key in episodes[0]]
    return {key: np.concatenate([episode[key] for episode in episodes]) for key in keys}


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # Write to a temporary name first: ogbench skips the download whenever the file exists, so a half-written
    # file must never appear under the final name.
    tmp_path = path.with_name(path.name + '.tmp')
    with open(tmp_path, 'wb') as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp_path, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _manifest_path(dataset_dir: Path, stem: str) -> Path:
    return dataset_dir / f'{stem}.manifest.json'


def _write_manifest(path: Path, spec: _Spec, episodes: int, val_episodes: int, seed: int, files: list[Path]) -> None:
    import mujoco

    manifest = {
        'source': 'generated',
        'generator': GENERATOR,
        'env': spec.env_name,
        'dataset_type': spec.dataset_type,
        'episodes': episodes,
        'val_episodes': val_episodes,
        'episode_length': spec.episode_length,
        'behaviour': LOCOMOTION_BEHAVIOUR if spec.locomotion else f'ogbench {spec.dataset_type} oracle',
        'seed': seed,
        'ogbench_version': metadata.version('ogbench'),
        'mujoco_version': mujoco.__version__,
        'created_utc': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'files': {file.name: _sha256(file) for file in files},
    }
    path.write_text(json.dumps(manifest, indent=2) + '\n')


def generate_dataset(
    env: str,
    dataset_type: str,
    episodes: int,
    seed: int,
    out_dir,
    episode_length: int | None = None,
    workers: int = 1,
    progress: bool = True,
    file_stem: str | None = None,
) -> dict:
    """Generate ``<env>-<dataset_type>-v0.npz`` (train) and ``...-v0-val.npz`` in ``out_dir``, plus a manifest.

    Args:
        env: One of SUPPORTED_ENVS, without the ``-v0`` suffix (e.g. ``'cube-double'``).
        dataset_type: ``'play'`` or ``'noisy'``.
        episodes: Number of train episodes; the val file gets ``max(1, episodes // 10)`` more.
        seed: Base seed. The arrays depend only on it (and the library versions), not on ``workers``.
        out_dir: Target directory (created if missing); pass it as ``dataset_dir`` to ogbench.
        episode_length: Rows per episode (default: the official files', 1001 or 2001/4001 for humanoid and giant).
        workers: Number of processes; 1 runs in the calling process. Workers are spawned, so a calling script
            needs the usual ``if __name__ == '__main__':`` guard.
        progress: Show a tqdm progress bar over episodes.
        file_stem: The files' stem (default ``<env>-<dataset_type>-v0``; shards have their own, see generate_shards).

    Returns:
        dict with ``train_path``, ``val_path``, ``manifest_path`` (str) and the stats ``episodes``, ``val_episodes``,
        ``train_rows``, ``val_rows``, ``scene_retries`` (unhealthy scene episodes regenerated), ``seconds`` and
        ``episodes_per_second``.
    """
    from tqdm import tqdm

    episode_length = episode_length or default_episode_length(env)
    _validate(env, dataset_type, episodes, episode_length, workers)
    spec = _Spec(env, dataset_type, episode_length)
    val_episodes = max(1, episodes // 10)
    jobs = [_episode_seeds(seed, 'train', i) for i in range(episodes)]
    jobs += [_episode_seeds(seed, 'val', i) for i in range(val_episodes)]

    stem = file_stem or dataset_name(env, dataset_type)
    start = time.perf_counter()
    with tqdm(total=len(jobs), desc=stem, unit='ep', disable=not progress) as progress_bar:
        if workers == 1:
            all_episodes, retries = _generate_episodes(spec, jobs, lambda: progress_bar.update(1))
        else:
            all_episodes, retries = _generate_parallel(spec, jobs, workers, progress_bar)
    seconds = time.perf_counter() - start

    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path = out_dir / f'{stem}.npz'
    val_path = out_dir / f'{stem}-val.npz'
    _save_npz(train_path, _concatenate(all_episodes[:episodes]))
    _save_npz(val_path, _concatenate(all_episodes[episodes:]))
    manifest_path = _manifest_path(out_dir, stem)
    _write_manifest(manifest_path, spec, episodes, val_episodes, seed, [train_path, val_path])

    return {
        'train_path': str(train_path),
        'val_path': str(val_path),
        'manifest_path': str(manifest_path),
        'episodes': episodes,
        'val_episodes': val_episodes,
        'train_rows': episodes * episode_length,
        'val_rows': val_episodes * episode_length,
        'scene_retries': retries,
        'seconds': seconds,
        'episodes_per_second': len(jobs) / seconds,
    }


def generate_shards(env: str, dataset_type: str, shards: int, episodes: int, seed: int, out_dir,
                    episode_length: int | None = None, workers: int = 1, progress: bool = True) -> dict:
    """A 100M-style shard folder ``<out_dir>/<env>-<dataset_type>-100m-v0/`` of ``shards`` generated datasets in
    the official layout (``qam_ray.data.shards``): shard k is ``<env>-<dataset_type>-v0-<k:03d>.npz`` (with its
    ``-val.npz`` and manifest), ``episodes`` episodes drawn with seed ``seed + k``.  Returns the folder and the
    per-shard results of ``generate_dataset``."""
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f'shards={shards!r}: must be an integer >= 1')
    stem = dataset_name(env, dataset_type)
    folder = Path(out_dir).expanduser() / (stem.removesuffix('-v0') + '-100m-v0')
    results = [generate_dataset(env, dataset_type, episodes, seed + k, folder, episode_length, workers, progress,
                                file_stem=f'{stem}-{k:03d}') for k in range(shards)]
    return {'folder': str(folder), 'shards': results}


def read_manifest(dataset_dir, dataset_file_stem: str) -> dict | None:
    """The manifest of a generated dataset (e.g. stem ``cube-single-play-v0``), or None (official data has none)."""
    path = _manifest_path(Path(dataset_dir).expanduser(), dataset_file_stem)
    if not path.exists():
        return None
    return json.loads(path.read_text())

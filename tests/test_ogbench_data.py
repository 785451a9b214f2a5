"""load_offline_dataset on tiny official-format files written here from real env steps (no download, no network)."""

import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request

import gymnasium
import numpy as np
import ogbench  # noqa: F401  (registers the OGBench envs with gymnasium)
import pytest

from qam_ray.data.ogbench_data import (
    ACTION_CLIP_EPS,
    DATASET_URL_ENV,
    TRANSITION_KEYS,
    DatasetError,
    DatasetUnavailableError,
    load_offline_dataset,
)

ROWS_PER_EPISODE = 6  # ogbench turns each episode into ROWS_PER_EPISODE - 1 transitions
TRAIN_EPISODES = 3


def record_episodes(env_id: str, episodes: int, seed: int) -> dict[str, np.ndarray]:
    """Random-action episodes in the official on-disk layout: the row's physical state is info['prev_*']."""
    env = gymnasium.make(env_id, terminate_at_goal=False, mode='data_collection', max_episode_steps=ROWS_PER_EPISODE)
    env.action_space.seed(seed)
    rows = {key: [] for key in ('observations', 'actions', 'terminals', 'qpos', 'qvel', 'button_states')}
    for episode in range(episodes):
        ob, _ = env.reset(seed=seed + episode)
        for step in range(ROWS_PER_EPISODE):
            action = env.action_space.sample()
            next_ob, _, _, _, info = env.step(action)
            rows['observations'].append(ob)
            rows['actions'].append(action)
            rows['terminals'].append(step == ROWS_PER_EPISODE - 1)
            rows['qpos'].append(info['prev_qpos'])
            rows['qvel'].append(info['prev_qvel'])
            if 'prev_button_states' in info:
                rows['button_states'].append(info['prev_button_states'])
            ob = next_ob
    env.close()
    arrays = {
        'observations': np.array(rows['observations'], dtype=np.float32),
        'actions': np.array(rows['actions'], dtype=np.float32),
        'terminals': np.array(rows['terminals'], dtype=bool),
        'qpos': np.array(rows['qpos'], dtype=np.float32),
        'qvel': np.array(rows['qvel'], dtype=np.float32),
    }
    if rows['button_states']:
        arrays['button_states'] = np.array(rows['button_states'], dtype=np.int64)
    return arrays


def write_dataset(directory, stem: str, train: dict, val: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(directory / f'{stem}.npz', **train)
    np.savez_compressed(directory / f'{stem}-val.npz', **val)


@pytest.fixture(scope='module')
def cube_arrays():
    train = record_episodes('cube-single-v0', TRAIN_EPISODES, seed=0)
    # Saturated actions, to see the clip at work.
    train['actions'][0] = [1.0, -1.0, 1.0, -1.0, 1.0]
    return train, record_episodes('cube-single-v0', 1, seed=100)


@pytest.fixture(scope='module')
def puzzle_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp('puzzle')
    write_dataset(directory, 'puzzle-3x3-play-v0', record_episodes('puzzle-3x3-v0', 2, seed=0),
                  record_episodes('puzzle-3x3-v0', 1, seed=50))
    return directory


@pytest.fixture
def no_network(monkeypatch):
    """ogbench downloads with urllib.request.urlopen; make any attempt fail like a machine without internet."""
    calls = []

    def unreachable(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError('[Errno -2] Name or service not known')

    monkeypatch.setattr(urllib.request, 'urlopen', unreachable)
    return calls


def test_loads_official_format_files_without_download(tmp_path, cube_arrays, no_network):
    train, val = cube_arrays
    write_dataset(tmp_path, 'cube-single-play-v0', train, val)
    data = load_offline_dataset('cube-single-play-singletask-task2-v0', dataset_dir=tmp_path)

    assert no_network == []
    assert (data.dataset_name, data.source, data.manifest) == ('cube-single-play-v0', 'official', None)
    assert data.sha256 == hashlib.sha256((tmp_path / 'cube-single-play-v0.npz').read_bytes()).hexdigest()
    assert (data.obs_dim, data.action_dim) == (28, 5)
    n_train = TRAIN_EPISODES * (ROWS_PER_EPISODE - 1)
    for split, length in ((data.train, n_train), (data.val, ROWS_PER_EPISODE - 1)):
        assert set(split) == set(TRANSITION_KEYS)
        assert all(array.dtype == np.float32 and len(array) == length for array in split.values())
    assert data.train['observations'].shape == data.train['next_observations'].shape == (n_train, 28)
    # terminals = one episode end per episode, on its last transition.
    assert np.flatnonzero(data.train['terminals']).tolist() == [4, 9, 14]
    # next_observations[t] = observations[t + 1] inside an episode.
    np.testing.assert_array_equal(data.train['next_observations'][:4], data.train['observations'][1:5])
    # cube-single singletask reward is (#cubes at target) - 1 and mask = 1 - success.
    assert set(np.unique(data.train['rewards'])) <= {-1.0, 0.0}
    np.testing.assert_array_equal(data.train['masks'], -data.train['rewards'])
    # Dataset actions are clipped to ±(1 - 1e-5) by default.
    np.testing.assert_array_equal(data.train['actions'][0], np.float32(1 - ACTION_CLIP_EPS) * train['actions'][0])
    assert np.abs(data.val['actions']).max() <= 1 - ACTION_CLIP_EPS

    unclipped = load_offline_dataset('cube-single-play-singletask-task2-v0', dataset_dir=tmp_path, clip_actions=False)
    np.testing.assert_array_equal(unclipped.train['actions'][0], train['actions'][0])


def describing_manifest(folder, stem: str, env: str, dataset_type: str) -> dict:
    """A generated-data manifest that agrees with the files beside it (rows and checksums), as the loader demands."""
    import hashlib

    files = {name: folder / name for name in (f'{stem}.npz', f'{stem}-val.npz')}
    rows = [len(np.load(path)['observations']) for path in files.values()]
    return {'source': 'generated', 'env': env, 'dataset_type': dataset_type, 'seed': 0, 'episodes': rows[0],
            'val_episodes': rows[1], 'episode_length': 1,
            'files': {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()}}


def test_sparse_rewards_and_generated_source(puzzle_dir, no_network):
    manifest = describing_manifest(puzzle_dir, 'puzzle-3x3-play-v0', 'puzzle-3x3', 'play')
    (puzzle_dir / 'puzzle-3x3-play-v0.manifest.json').write_text(json.dumps(manifest))
    dense = load_offline_dataset('puzzle-3x3-play-singletask-task1-v0', dataset_dir=puzzle_dir)
    sparse = load_offline_dataset('puzzle-3x3-play-singletask-task1-v0', dataset_dir=puzzle_dir, sparse=True)

    assert (dense.source, dense.manifest) == ('generated', manifest)
    # Dense puzzle-3x3 reward = (#buttons at target) - 9; random play leaves several buttons wrong.
    assert dense.train['rewards'].min() < -1
    for split in ('train', 'val'):
        expected = np.where(getattr(dense, split)['rewards'] != 0, -1.0, 0.0).astype(np.float32)
        np.testing.assert_array_equal(getattr(sparse, split)['rewards'], expected)
        np.testing.assert_array_equal(getattr(sparse, split)['masks'], getattr(dense, split)['masks'])
    assert sparse.sparse and not dense.sparse
    manifest['files']['puzzle-3x3-play-v0.npz'] = '0' * 64  # a manifest that contradicts its file is refused
    (puzzle_dir / 'puzzle-3x3-play-v0.manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match='does not match the checksum'):
        load_offline_dataset('puzzle-3x3-play-singletask-task1-v0', dataset_dir=puzzle_dir)


def test_missing_qpos_names_the_key_and_the_generator(tmp_path, cube_arrays):
    train, val = cube_arrays
    write_dataset(tmp_path, 'cube-single-play-v0', {k: v for k, v in train.items() if k != 'qpos'}, val)
    with pytest.raises(DatasetError, match="no 'qpos' array") as error:
        load_offline_dataset('cube-single-play-singletask-task1-v0', dataset_dir=tmp_path)
    message = str(error.value)
    assert 'cube-single-play-v0.npz' in message
    assert 'python experiments/generate_data.py --env cube-single --type play --episodes 100 --seed 0' in message


def test_missing_button_states_for_puzzle(tmp_path, puzzle_dir):
    shutil.copytree(puzzle_dir, tmp_path / 'data')
    with np.load(puzzle_dir / 'puzzle-3x3-play-v0-val.npz') as file:
        val = {k: file[k] for k in file.files if k != 'button_states'}
    np.savez_compressed(tmp_path / 'data' / 'puzzle-3x3-play-v0-val.npz', **val)
    with pytest.raises(DatasetError, match="-val.npz has no 'button_states' array.*'qpos', 'button_states'"):
        load_offline_dataset('puzzle-3x3-play-singletask-task1-v0', dataset_dir=tmp_path / 'data')


def test_wrong_dtype_is_rejected(tmp_path, cube_arrays):
    train, val = cube_arrays
    write_dataset(tmp_path, 'cube-single-play-v0', {**train, 'observations': train['observations'].astype(np.float64)},
                  val)
    with pytest.raises(DatasetError, match="'observations' has dtype float64, expected float32"):
        load_offline_dataset('cube-single-play-singletask-task1-v0', dataset_dir=tmp_path)


def test_nan_is_rejected(tmp_path, cube_arrays):
    train, val = cube_arrays
    actions = train['actions'].copy()
    actions[7, 2] = np.nan
    write_dataset(tmp_path, 'cube-single-play-v0', {**train, 'actions': actions}, val)
    # Row 7 of the file is transition 6 (the first episode's terminal row is dropped).
    with pytest.raises(DatasetError, match=r"cube-single-play-v0.npz: 'actions' contains NaN or inf \(first in row 6\)"):
        load_offline_dataset('cube-single-play-singletask-task1-v0', dataset_dir=tmp_path)


def test_files_of_another_env_and_truncated_files_are_rejected(tmp_path, cube_arrays):
    train, val = cube_arrays
    write_dataset(tmp_path / 'dims', 'cube-single-play-v0', {**train, 'actions': train['actions'][:, :4]}, val)
    with pytest.raises(DatasetError, match="'actions' has shape .* needs dim 5"):
        load_offline_dataset('cube-single-play-singletask-task1-v0', dataset_dir=tmp_path / 'dims')

    truncated = {key: value[:-2] for key, value in train.items()}
    write_dataset(tmp_path / 'cut', 'cube-single-play-v0', truncated, val)
    with pytest.raises(DatasetError, match='truncated'):
        load_offline_dataset('cube-single-play-singletask-task1-v0', dataset_dir=tmp_path / 'cut')

    write_dataset(tmp_path / 'rows', 'cube-single-play-v0', {**train, 'qpos': train['qpos'][:-1]}, val)
    with pytest.raises(DatasetError, match="'qpos' has shape"):
        load_offline_dataset('cube-single-play-singletask-task1-v0', dataset_dir=tmp_path / 'rows')


def test_unreachable_download_says_how_to_get_data(tmp_path, no_network, monkeypatch):
    monkeypatch.delenv(DATASET_URL_ENV, raising=False)
    with pytest.raises(DatasetUnavailableError) as error:
        load_offline_dataset('cube-double-play-singletask-task2-v0', dataset_dir=tmp_path / 'empty')
    message = str(error.value)
    assert no_network == ['https://rail.eecs.berkeley.edu/datasets/ogbench/cube-double-play-v0.npz']
    assert 'downloading it from https://rail.eecs.berkeley.edu/datasets/ogbench failed' in message
    assert 'Name or service not known' in message
    assert f'--dataset-url URL or {DATASET_URL_ENV}=URL' in message  # the way round a host that is down
    assert '--dataset-dir DIR' in message
    assert 'python experiments/generate_data.py --env cube-double --type play --episodes 100 --seed 0 --out DIR' in message

    # Locomotion data can be generated too, and the message says it is a random walk, not expert data.
    with pytest.raises(DatasetUnavailableError, match='--dataset-dir DIR') as error:
        load_offline_dataset('antmaze-large-navigate-singletask-task1-v0', dataset_dir=tmp_path / 'empty')
    assert '--env antmaze-large --type navigate' in str(error.value) and 'random walk' in str(error.value)


def test_bad_names_list_the_expected_form(tmp_path):
    with pytest.raises(DatasetError, match='expected <env>-<dataset type>-singletask-task<1-5>-v0'):
        load_offline_dataset('cube-double-play-v0', dataset_dir=tmp_path)
    with pytest.raises(DatasetError, match="no env 'cube-sextuple-singletask-task1-v0'"):
        load_offline_dataset('cube-sextuple-play-singletask-task1-v0', dataset_dir=tmp_path)


@pytest.fixture
def mirror(tiny_dataset_dir, tmp_path_factory):
    """A loopback HTTP server serving the generated cube-single files, as a mirror of OGBench's host would; it
    records the paths asked for."""
    import functools
    import http.server
    import threading

    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # quiet; the paths are kept instead
            requests.append(self.path)

    root = tmp_path_factory.mktemp('mirror')
    os.symlink(tiny_dataset_dir, root / 'ogbench')  # served under /ogbench/, like the official host's path
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}/ogbench', requests
    finally:
        server.shutdown()
        server.server_close()


def test_missing_files_come_from_a_mirror_given_by_flag_or_environment(mirror, tiny_dataset_dir, tmp_path,
                                                                      monkeypatch):
    url, requests = mirror
    env = 'cube-single-play-singletask-task2-v0'
    data = load_offline_dataset(env, dataset_dir=tmp_path / 'flag', url=url)
    for name in ('cube-single-play-v0.npz', 'cube-single-play-v0-val.npz'):  # byte for byte what it serves
        assert (tmp_path / 'flag' / name).read_bytes() == open(f'{tiny_dataset_dir}/{name}', 'rb').read()
    assert len(data.train['rewards']) > 0 and data.source == 'official'  # a mirror serves no manifest
    assert requests == ['/ogbench/cube-single-play-v0.npz', '/ogbench/cube-single-play-v0-val.npz']

    monkeypatch.setenv(DATASET_URL_ENV, url)
    load_offline_dataset(env, dataset_dir=tmp_path / 'environment')
    assert (tmp_path / 'environment' / 'cube-single-play-v0.npz').exists()

    import ogbench.utils  # the official host is restored after each download
    assert ogbench.utils.DATASET_URL == 'https://rail.eecs.berkeley.edu/datasets/ogbench'

    with pytest.raises(DatasetUnavailableError) as error:  # a mirror without the file names itself
        load_offline_dataset('cube-double-play-singletask-task2-v0', dataset_dir=tmp_path / 'absent', url=url)
    assert f'The mirror {url}' in str(error.value) and 'cube-double-play-v0.npz' in str(error.value)

"""Tests for the offline OGBench manipulation dataset generator (tiny episodes, so they stay fast on 2 cores)."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qam_ray.data.generate import _scene_is_healthy, generate_dataset, read_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
EPISODE_LENGTH = 60

# name -> (env, dataset type, train episodes, seed, ob_dim, number of buttons or None, objects counted by the reward)
CASES = {
    'cube': ('cube-single', 'play', 3, 0, 28, None, 1),
    'puzzle': ('puzzle-3x3', 'noisy', 2, 1, 55, 9, 9),
}


def _generate(out_dir, case, **overrides):
    env, dataset_type, episodes, seed, *_ = CASES[case]
    kwargs = dict(episode_length=EPISODE_LENGTH, progress=False, **overrides)
    kwargs.setdefault('seed', seed)
    return generate_dataset(env, dataset_type, episodes, out_dir=out_dir, **kwargs)


@pytest.fixture(scope='module')
def generated(tmp_path_factory):
    """One small dataset per case, generated once for the whole module."""
    return {case: _generate(tmp_path_factory.mktemp(case), case) for case in CASES}


def _load_arrays(path):
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _assert_identical(result_a, result_b):
    for key in ('train_path', 'val_path'):
        a, b = _load_arrays(result_a[key]), _load_arrays(result_b[key])
        assert list(a) == list(b)
        for name in a:
            assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
            assert a[name].tobytes() == b[name].tobytes(), f'{key}/{name} differs'


@pytest.mark.parametrize('case', CASES)
def test_files_have_official_keys_dtypes_and_shapes(generated, case):
    _, _, episodes, _, ob_dim, n_buttons, _ = CASES[case]
    result = generated[case]
    expected_keys = ['observations', 'actions', 'terminals', 'qpos', 'qvel'] + (['button_states'] if n_buttons else [])
    for key, n_episodes in (('train_path', episodes), ('val_path', max(1, episodes // 10))):
        arrays = _load_arrays(result[key])
        rows = n_episodes * EPISODE_LENGTH
        assert list(arrays) == expected_keys
        assert arrays['observations'].dtype == np.float32 and arrays['observations'].shape == (rows, ob_dim)
        assert arrays['actions'].dtype == np.float32 and arrays['actions'].shape == (rows, 5)
        assert np.abs(arrays['actions']).max() <= 1.0
        assert arrays['terminals'].dtype == bool and arrays['terminals'].shape == (rows,)
        for name in ('qpos', 'qvel'):
            assert arrays[name].dtype == np.float32 and arrays[name].ndim == 2 and len(arrays[name]) == rows
        if n_buttons:
            assert arrays['button_states'].dtype == np.int64 and arrays['button_states'].shape == (rows, n_buttons)
    assert result['train_rows'] == episodes * EPISODE_LENGTH


@pytest.mark.parametrize('case', CASES)
def test_terminals_mark_episode_ends(generated, case):
    episodes = CASES[case][2]
    terminals = _load_arrays(generated[case]['train_path'])['terminals']
    expected_ends = np.arange(1, episodes + 1) * EPISODE_LENGTH - 1
    np.testing.assert_array_equal(np.flatnonzero(terminals), expected_ends)


@pytest.mark.parametrize('case', CASES)
def test_loads_as_ogbench_singletask_dataset(generated, case):
    import ogbench

    env_name, dataset_type, episodes, _, _, _, n_objects = CASES[case]
    dataset_dir = Path(generated[case]['train_path']).parent
    # The singletask load relabels rewards from qpos (and button_states), so it fails if those are missing.
    _, train, val = ogbench.make_env_and_datasets(
        f'{env_name}-{dataset_type}-singletask-task1-v0', dataset_dir=str(dataset_dir)
    )
    assert len(train['observations']) == episodes * (EPISODE_LENGTH - 1)
    assert len(val['observations']) == EPISODE_LENGTH - 1
    assert train['rewards'].min() >= -n_objects and train['rewards'].max() <= 0
    assert set(np.unique(train['masks'])) <= {0.0, 1.0}


def test_same_seed_gives_identical_arrays_and_other_seed_differs(generated, tmp_path):
    _assert_identical(generated['cube'], _generate(tmp_path / 'again', 'cube'))
    other = _load_arrays(_generate(tmp_path / 'other', 'cube', seed=123)['train_path'])
    assert not np.array_equal(other['observations'], _load_arrays(generated['cube']['train_path'])['observations'])


def test_output_does_not_depend_on_worker_count(generated, tmp_path):
    _assert_identical(generated['cube'], _generate(tmp_path, 'cube', workers=2))


def test_unsupported_names_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"type 'play' for antmaze-large; supported: navigate"):
        generate_dataset('antmaze-large', 'play', 1, 0, tmp_path)
    with pytest.raises(ValueError, match=r'antsoccer, pointmaze'):
        generate_dataset('pointmaze-large', 'navigate', 1, 0, tmp_path)
    with pytest.raises(ValueError, match=r'play, noisy'):
        generate_dataset('cube-single', 'navigate', 1, 0, tmp_path)
    assert not any(tmp_path.iterdir())


def test_manifest_marks_data_as_generated_with_file_hashes(generated, tmp_path):
    result = generated['puzzle']
    dataset_dir = Path(result['train_path']).parent
    manifest = read_manifest(dataset_dir, 'puzzle-3x3-noisy-v0')
    assert manifest['source'] == 'generated'
    assert manifest['generator'] == 'qam_ray.data.generate'
    assert (manifest['env'], manifest['dataset_type'], manifest['seed']) == ('puzzle-3x3', 'noisy', 1)
    assert (manifest['episodes'], manifest['val_episodes'], manifest['episode_length']) == (2, 1, EPISODE_LENGTH)
    expected_files = {Path(result[key]).name for key in ('train_path', 'val_path')}
    assert set(manifest['files']) == expected_files
    for name, digest in manifest['files'].items():
        assert hashlib.sha256((dataset_dir / name).read_bytes()).hexdigest() == digest
    # Official data comes without a manifest.
    assert read_manifest(tmp_path, 'puzzle-3x3-noisy-v0') is None


def test_scene_health_check_rejects_cube_out_of_view():
    qpos = np.zeros((5, 25), dtype=np.float32)
    qpos[:, 14:17] = [0.4, 0.0, 0.02]
    assert _scene_is_healthy(qpos)
    in_drawer = qpos.copy()
    in_drawer[2, 14:17] = [0.4, -0.35, 0.07]
    assert _scene_is_healthy(in_drawer)
    left_outside_drawer = qpos.copy()
    left_outside_drawer[2, 14:17] = [0.4, -0.35, 0.02]
    assert not _scene_is_healthy(left_outside_drawer)
    too_far_right = qpos.copy()
    too_far_right[3, 15] = 0.3
    assert not _scene_is_healthy(too_far_right)


def test_cli_writes_dataset_and_prints_load_command(tmp_path):
    command = [
        sys.executable, 'experiments/generate_data.py', '--env', 'cube-single', '--type', 'play',
        '--episodes', '1', '--episode-length', '20', '--seed', '0', '--out', str(tmp_path),
    ]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert (tmp_path / 'cube-single-play-v0.npz').exists() and (tmp_path / 'cube-single-play-v0-val.npz').exists()
    assert "make_env_and_datasets('cube-single-play-singletask-task1-v0'" in completed.stdout

"""100M datasets as the paper trains on them: a folder of shards swapped in every N gradient steps (background
loading), online data kept after the swapped prefix, no action clipping, exact continuation after a restore, the
paper preset's choice of shards, and clear errors for a missing or inconsistent folder.  Shards are generated here
in the official layout (tiny puzzle-4x4 episodes: a 100M domain with sparse rewards)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qam_ray.data.generate import generate_shards
from qam_ray.data.ogbench_data import DatasetError, load_offline_dataset
from qam_ray.data.replay import ChunkReplayBuffer
from qam_ray.data.shards import ShardStream, open_shards
from qam_ray.training import OfflineTrainer

ENV = "puzzle-4x4-play-singletask-task1-v0"
FOLDER = "puzzle-4x4-play-100m-v0"
SHARDS = 3
TINY = dict(actor_hidden_dims=(16, 16), value_hidden_dims=(16, 16), num_qs=2, flow_steps=3)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    generate_shards("puzzle-4x4", "play", SHARDS, episodes=1, seed=0, out_dir=out, episode_length=41, progress=False)
    return str(out)


def shard_arrays(dataset, index):
    env = dataset.make_env()
    try:
        return dataset.load(index, env)
    finally:
        env.close()


def test_the_buffer_holds_shard_step_div_interval_and_online_rows_survive_a_swap(shard_dir):
    dataset = open_shards(ENV, shard_dir, sparse=True)
    assert (dataset.source, len(dataset.paths), dataset.rows) == ("generated", SHARDS, 41)
    assert [os.path.basename(p) for p in dataset.paths] == [f"puzzle-4x4-play-v0-{k:03d}.npz" for k in range(SHARDS)]
    expected = [shard_arrays(dataset, k) for k in range(SHARDS)]
    assert not np.array_equal(expected[0]["observations"], expected[1]["observations"])  # distinct seeds

    stream = ShardStream(dataset, "cpu", interval=3)
    try:
        first = stream.first(0)
        buffer = ChunkReplayBuffer.from_arrays(first, "cpu", capacity=stream.transitions + 7)
        online = {key: np.full_like(value[:7], 0.5) for key, value in first.items()}
        buffer.add_transitions(**online)  # an online phase's rows, after the offline prefix
        trainer = OfflineTrainer.for_env("FQL", ENV, buffer, overrides=TINY, batch_size=4, shards=stream)
        for steps, shard in ((2, 0), (1, 1), (4, 2), (2, 0)):  # boundaries at 3, 6, 9 crossed inside calls
            metrics = trainer.train(steps)
            assert metrics["data/shard"] == shard and metrics["data/shard_swap_stall_s"] >= 0.0
            held = buffer.rows(0)
            for key in expected[shard]:
                np.testing.assert_array_equal(held[key][:stream.transitions], expected[shard][key], err_msg=key)
                np.testing.assert_array_equal(held[key][stream.transitions:], online[key], err_msg=key)
    finally:
        stream.close()


def test_shards_are_not_action_clipped_and_the_folder_itself_may_be_passed(shard_dir, tmp_path):
    official = tmp_path / FOLDER  # an official-looking folder: no manifests
    official.mkdir()
    for index in range(2):
        with np.load(f"{shard_dir}/{FOLDER}/puzzle-4x4-play-v0-{index:03d}.npz") as file:
            arrays = dict(file)
        arrays["actions"][0] = 1.0  # at the bound: the 1M files would be clipped to 1 - 1e-5
        np.savez(official / f"puzzle-4x4-play-v0-{index:03d}.npz", **arrays)
    dataset = open_shards(ENV, str(official))  # the folder itself, as the reference's --ogbench_dataset_dir
    assert dataset.source == "official" and len(dataset.paths) == 2
    assert (shard_arrays(dataset, 0)["actions"][0] == 1.0).all()
    shutil.copy(official / "puzzle-4x4-play-v0-000.npz", tmp_path / "puzzle-4x4-play-v0.npz")
    shutil.copy(official / "puzzle-4x4-play-v0-001.npz", tmp_path / "puzzle-4x4-play-v0-val.npz")
    standard = load_offline_dataset(ENV, tmp_path)  # the same rows as a standard file: clipped
    assert standard.train["actions"][0].max() == pytest.approx(1 - 1e-5)


def test_a_missing_empty_or_uneven_shard_folder_is_refused_with_the_layout_and_the_generator(shard_dir, tmp_path):
    with pytest.raises(DatasetError) as missing:
        open_shards(ENV, str(tmp_path))
    message = str(missing.value)
    assert f"{tmp_path}/{FOLDER}/ is missing" in message and "generate_data.py" in message and "--shards" in message
    (tmp_path / FOLDER).mkdir()
    (tmp_path / FOLDER / "puzzle-4x4-play-v0-000-val.npz").write_bytes(b"")
    with pytest.raises(DatasetError, match="holds no shard"):
        open_shards(ENV, str(tmp_path))
    uneven = tmp_path / "uneven"
    shutil.copytree(f"{shard_dir}/{FOLDER}", uneven / FOLDER)
    with np.load(uneven / FOLDER / "puzzle-4x4-play-v0-001.npz") as file:
        cut = {key: value[:20] for key, value in file.items()}
    cut["terminals"][-1] = True
    for name in ("puzzle-4x4-play-v0-001.npz", "puzzle-4x4-play-v0-001.manifest.json"):
        os.remove(uneven / FOLDER / name)
    np.savez(uneven / FOLDER / "puzzle-4x4-play-v0-001.npz", **cut)
    with pytest.raises(DatasetError, match="same number of rows"):
        open_shards(ENV, str(uneven))


def test_the_learner_swaps_shards_and_a_restore_continues_on_the_shard_of_its_step(local_ray, shard_dir, tmp_path):
    from qam_ray.rllib import FQLConfig

    def config():
        return (FQLConfig().ogbench("puzzle-4x4-play", task=1, dataset_dir=shard_dir, dataset_size="100M")
                .training(**TINY, num_steps_per_iteration=6, train_batch_size_per_learner=8,
                          dataset_replace_interval=4)
                .debugging(seed=1))

    def losses(result):
        metrics = result["learners"]["default_policy"]
        return {k: float(v) for k, v in metrics.items() if k.endswith("loss")}, metrics["data/shard"]

    algo = config().build_algo()
    try:
        assert (algo.dataset_info["dataset_size"], algo.dataset_info["shards"]) == ("100M", SHARDS)
        assert algo.dataset_info["name"] == FOLDER
        assert losses(algo.train())[1] == 1  # swapped at step 4
        algo.save_to_path(str(tmp_path / "ckpt"))
        expected, shard = losses(algo.train())  # steps 6..12: swaps at 8 and 12
        assert shard == 0
    finally:
        algo.stop()
    restored = config().build_algo()  # loads shard 0 for step 0; the restore must bring back step 6's shard 1
    try:
        restored.restore_from_path(str(tmp_path / "ckpt"))
        assert losses(restored.train()) == (expected, 0)
    finally:
        restored.stop()


def test_the_paper_preset_trains_the_100m_domains_on_shards_and_says_so(shard_dir, tmp_path):
    from qam_ray.orchestration.presets import data_errors, off_protocol_domains, resolve

    flags = {"domains": ["puzzle-4x4-play", "cube-quadruple-play", "cube-double-play"], "dataset_dir": shard_dir}
    preset, specs, errors = resolve("paper", flags)
    assert not errors
    sizes = {spec["domain"]: spec["dataset_size"] for spec in specs}
    assert sizes == {"puzzle-4x4-play": "100M", "cube-quadruple-play": "100M", "cube-double-play": "1M"}
    assert off_protocol_domains(preset) == []
    problems = data_errors(preset, generate=False)
    assert any("cube-quadruple-play-100m-v0/ is missing" in p and "--shards" in p for p in problems)
    assert not any("puzzle-4x4" in p for p in problems)  # its shards are there and valid
    one_m, _, _ = resolve("paper", {**flags, "dataset_size": "1M"})
    assert off_protocol_domains(one_m) == ["puzzle-4x4-play", "cube-quadruple-play"]
    _, _, bad = resolve("paper", {**flags, "dataset_size": "10M"})
    assert any("--dataset-size '10M'" in e for e in bad)

    # As a user: the paper preset's dry run names every domain's dataset kind and warns about nothing.
    done = subprocess.run([sys.executable, "experiments/sweep.py", "--preset", "paper", "--dry-run",
                           "--dataset-dir", shard_dir], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"puzzle-4x4-play: 100M shards, {FOLDER}/ {SHARDS} generated shard(s) of 41 rows" in done.stdout
    assert "cube-quadruple-play: 100M shards, cube-quadruple-play-100m-v0/ MISSING" in done.stdout
    assert done.stdout.count("1M file") == 8 and "WARNING" not in done.stderr and "note:" not in done.stderr


def test_the_shard_generator_cli_writes_the_layout(tmp_path):
    done = subprocess.run([sys.executable, "experiments/generate_data.py", "--env", "cube-quadruple", "--type", "play",
                           "--episodes", "1", "--shards", "2", "--episode-length", "21", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    dataset = open_shards("cube-quadruple-play-singletask-task1-v0", str(tmp_path))
    assert (len(dataset.paths), dataset.rows, dataset.source) == (2, 21, "generated")
    assert "--dataset-size 100M" in done.stdout

"""Shared test data: a tiny but real OGBench dataset generated with the package's oracles."""

from __future__ import annotations

import os

# The library's default OMP_WAIT_POLICY=PASSIVE (qam_ray/__init__.py) keeps a contended loop from collapsing, but a
# tiny update on 2 threads pays for it on a quiet machine (QAM small: 47 vs 20 ms per update, README "Speed").  The
# suite is thousands of tiny updates, so it waits as libgomp does by default (spin 300,000 rounds, then sleep), set
# before anything loads torch and inherited by the Ray workers it starts; the tests of the defaults themselves look
# at OMP_WAIT_POLICY in fresh processes.
os.environ.setdefault("GOMP_SPINCOUNT", "300000")

import pytest  # noqa: E402

from qam_ray.data.generate import generate_dataset

TINY_ENV = "cube-single-play-singletask-task2-v0"


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory):
    """3 episodes of 60 rows of cube-single play data (+1 val episode) in the official format."""
    out = tmp_path_factory.mktemp("ogbench_data")
    generate_dataset("cube-single", "play", episodes=3, seed=0, out_dir=out, episode_length=60, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def tiny_puzzle_dataset_dir(tmp_path_factory):
    """2 episodes of 60 rows of puzzle-3x3 play data (a sparse-reward domain)."""
    out = tmp_path_factory.mktemp("ogbench_puzzle")
    generate_dataset("puzzle-3x3", "play", episodes=2, seed=0, out_dir=out, episode_length=60, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def local_ray():
    """A private local Ray instance (own temp dir, never an existing cluster); shut down after the session."""
    import tempfile

    import ray

    temp_dir = tempfile.mkdtemp(prefix="qr", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    yield ray
    ray.shutdown()

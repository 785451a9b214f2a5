"""Captured updates (issue 17): every family's losses run under torch.compile through one generic switch, a compiled
update computes what the eager one does, and the reference checks pass compiled.

Runs on ``QAM_RAY_TEST_DEVICE`` (default cpu; ``experiments/gpu_check.sh`` sets cuda) and needs only torch and
numpy (``gpu_check.sh`` runs this file with ``--noconftest`` on a bare GPU machine).  Inductor compiles for tens of
seconds per graph on a 2-core CPU, so the compiled cases are few and tiny: ``QAM_RAY_COMPILE_METHODS`` and
``QAM_RAY_COMPILE_FIXTURES`` (space-separated) widen them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qam_ray.agents import METHOD_NAMES, agent_class
from qam_ray.core.compile import COMPILE_MODES, compile_mode_error, disable_tf32
from qam_ray.data.replay import ChunkReplayBuffer, synthetic_buffer
from qam_ray.training import OfflineTrainer

from .bare_python import bare_command, bare_site

ROOT = Path(__file__).parents[1]
DEVICE = torch.device(os.environ.get("QAM_RAY_TEST_DEVICE", "cpu"))
ENV = "scene-play-singletask-task1-v0"
OBS, ACTION = 6, 2
# Small networks and 2 flow / diffusion steps: the graph (and so inductor's compile time) grows with the steps.
TINY = dict(actor_hidden_dims=(16, 16), value_hidden_dims=(16, 16), num_qs=2, flow_steps=2)
COMPILED_METHODS = os.environ.get("QAM_RAY_COMPILE_METHODS", "QAM").split()  # FQL: compiled against its fixture below
COMPILED_FIXTURES = os.environ.get("QAM_RAY_COMPILE_FIXTURES", "fql_small").split()
COMPILED_MODES = ["default", "reduce-overhead"] if DEVICE.type == "cuda" else ["default"]
FAMILIES = sorted({agent_class(m).name: m for m in METHOD_NAMES}.values())  # one method per agent family


@pytest.fixture(autouse=True)
def full_fp32():
    disable_tf32()  # eager and compiled are compared at fp32 tolerances


def random_buffer(size: int = 400) -> ChunkReplayBuffer:
    return synthetic_buffer(OBS, ACTION, DEVICE, size, episode_length=100)


def tiny_trainer(method: str, compile: str = "none") -> OfflineTrainer:
    known = set(agent_class(method).Hyperparams.__dataclass_fields__)
    overrides = {k: v for k, v in TINY.items() if k in known}
    return OfflineTrainer.for_env(method, ENV, random_buffer(), overrides, batch_size=8, seed=0, compile=compile)


def test_a_compile_mode_outside_the_list_is_refused_naming_the_allowed_ones():
    assert all(compile_mode_error(mode) is None for mode in COMPILE_MODES)
    message = compile_mode_error("fast")
    assert "compile='fast'" in message and all(repr(mode) in message for mode in COMPILE_MODES)


def test_the_rllib_config_refuses_a_bad_compile_mode_before_ray_starts():
    pytest.importorskip("ray")
    pytest.importorskip("ogbench")
    from qam_ray.rllib import AgentConfig
    from qam_ray.rllib.algorithm import InvalidConfigError

    config = AgentConfig().ogbench("scene-play", task=1, method="FQL").training(compile="fast")
    with pytest.raises(InvalidConfigError, match="compile='fast'"):
        config.validate()
    config.training(compile="default").validate()
    assert config.compile == "default"


def test_eager_mode_leaves_every_loss_function_a_plain_method():
    trainer = tiny_trainer("FQL", "none")
    assert "losses" not in vars(trainer.agent)  # no instance attribute shadows the class's method


@pytest.mark.parametrize("method", FAMILIES)
def test_every_family_updates_through_the_loss_functions_it_lists_eager(method, monkeypatch):
    """The generic switch compiles ``LOSS_FUNCTIONS``: each must be a method of the family and be called by its
    update (a family whose update calls other loss methods would silently stay eager).  Checked with a counting
    stand-in for torch.compile, so no compilation runs here."""
    calls: dict[str, int] = {}

    def counting(fn, mode, cuda_graphs):
        def run(*args, **kwargs):
            calls[fn.__name__] = calls.get(fn.__name__, 0) + 1
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr("qam_ray.agents.base.compiled_losses", counting)
    cls = agent_class(method)
    assert all(callable(getattr(cls, name, None)) for name in cls.LOSS_FUNCTIONS)
    trainer = tiny_trainer(method, "default")
    trainer.train(getattr(trainer.agent.hp, "policy_delay", 1) + 1)  # enough updates for every delayed branch
    assert set(calls) == set(cls.LOSS_FUNCTIONS), f"{method}: listed {cls.LOSS_FUNCTIONS}, called {sorted(calls)}"


@pytest.mark.parametrize("mode", COMPILED_MODES)
@pytest.mark.parametrize("method", COMPILED_METHODS)
def test_compiled_updates_match_eager_updates(method, mode):
    """Two updates from the same seed, eager and compiled: the same metrics and parameters to fp32 rounding
    (inductor may fuse and reorder reductions; it must not change the math)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # so the count below is this test's
    eager, compiled = tiny_trainer(method, "none"), tiny_trainer(method, mode)
    eager_metrics, compiled_metrics = eager.train(2), compiled.train(2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the compiled path really ran
    assert eager_metrics.keys() == compiled_metrics.keys()
    for key in eager_metrics:
        assert compiled_metrics[key] == pytest.approx(eager_metrics[key], rel=1e-4, abs=1e-5), key
    for (name, ours), theirs in zip(compiled.agent.state_dict().items(), eager.agent.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=lambda m: f"{method} {name}: {m}")


def test_the_eager_compiled_comparison_catches_a_changed_loss():
    """The comparison above can fail: an FQL whose distillation weight α is doubled (a plausible slip of a captured
    graph: a constant baked in from another config) ends two updates outside its tolerances (run eager: only the
    comparison's power is under test here)."""
    eager, wrong = tiny_trainer("FQL"), tiny_trainer("FQL")
    wrong.agent.hp = type(wrong.agent.hp)(**{**vars(wrong.agent.hp), "alpha": 2 * wrong.agent.hp.alpha})
    eager.train(2), wrong.train(2)
    differs = any(not torch.allclose(a, b, rtol=1e-4, atol=1e-5)
                  for a, b in zip(wrong.agent.state_dict().values(), eager.agent.state_dict().values()))
    assert differs


@pytest.mark.parametrize("fixture", COMPILED_FIXTURES)
def test_reference_checks_pass_with_the_losses_compiled(fixture):
    """The fixture check with ``--compile default`` on DEVICE (TF32 off): the tolerances of the eager check."""
    from qam_ray.reference_check import check_fixture

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # so the count below is this test's
    checks = check_fixture(str(ROOT / "tests" / "fixtures" / f"{fixture}.npz"), "default", str(DEVICE))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    failed = [f"{c.name}: {c.error:.2e} (tol {c.tol:.0e})" for c in checks if not c.ok]
    assert not failed, failed


def test_gpu_check_smoke_run_on_cpu_writes_its_records(tmp_path):
    """``make gpu-check DEVICE=cpu SMOKE=1`` with only torch, numpy and pytest importable: the GPU script's steps at
    their smallest, eager (its compiled steps are left out: inductor would take minutes on a small CPU)."""
    site = bare_site(tmp_path / "site", ("torch", "numpy", "pytest"))  # all a bare GPU machine has
    _, env = bare_command(site)
    env.update(DEVICE="cpu", SMOKE="1", OUT=str(tmp_path / "gpu"), PYTHON=f"{sys.executable} -S")
    result = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_check.sh")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["core_tests", "reference_checks", "benchmark_eager",
                                                      "benchmark_pack"]
    assert all(s["exit"] == 0 for s in summary["steps"])
    records = json.loads((tmp_path / "gpu" / "benchmark_small_eager.json").read_text())
    assert [(r["method"], r["compile"], r["device"]) for r in records] == [("FQL", "none", "cpu")]
    packed = json.loads((tmp_path / "gpu" / "benchmark_small_pack.json").read_text())
    assert [r["name"] for r in packed] == ["pack1", "pack2"]

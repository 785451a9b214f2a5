"""The library's CPU speed defaults (issue 17) are applied where they must be, and the benchmark's floor and phase
instruments measure what they say.  No timings here: those live in ``benchmark.py --profile / --contend / --pack``."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import qam_ray
from qam_ray.core.optim import make_adam, make_adamw

from .bare_python import ROOT


def _env_without(*names: str) -> dict:
    return {k: v for k, v in os.environ.items() if k not in names}


def _wait_policy_seen_by_libgomp(env: dict) -> str:
    """OMP_WAIT_POLICY as the process had it at its ``import torch`` (when libgomp reads it)."""
    code = "import os, qam_ray, torch; torch.ones(1); print(os.environ.get('OMP_WAIT_POLICY'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_importing_the_package_sets_a_passive_openmp_wait_policy_before_torch_loads():
    assert qam_ray.CPU_THREADING_ENV == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert _wait_policy_seen_by_libgomp(_env_without("OMP_WAIT_POLICY")) == "PASSIVE"


def test_a_wait_policy_the_user_set_is_kept():
    assert _wait_policy_seen_by_libgomp({**_env_without("OMP_WAIT_POLICY"), "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"


def _module_level_imports(path) -> list[str]:
    """Top-level module names in the order a script imports them (try/except blocks included, functions not)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.Import):
            names += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append((node.lineno, node.module.split(".")[0]))
    return [name for _, name in sorted(names)]


@pytest.mark.parametrize("script", sorted((ROOT / "experiments").glob("*.py")), ids=lambda p: p.name)
def test_every_entry_point_imports_qam_ray_before_anything_that_loads_torch(script):
    """The default only reaches libgomp if qam_ray is imported first (ray and numpy do not load libgomp; RLlib
    and torch do)."""
    names = _module_level_imports(script)
    loaders = [i for i, name in enumerate(names) if name in ("torch", "ray")]
    assert "qam_ray" in names
    assert not loaders or names.index("qam_ray") < loaders[0], names


def test_adam_is_fused_on_cpu():
    """The per-op Adam loop reads and writes every parameter several times; the fused kernel once."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert make_adam(params, 1e-3).defaults["fused"] is True
    assert make_adamw(params, 1e-3, 1e-4).defaults["fused"] is True


# --------------------------------------------------------------------------------------------------
# The benchmark's instruments
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_under_test", ROOT / "experiments" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matmul_recorder_counts_forward_and_backward_flops(benchmark):
    """A Linear B×i → o costs 2·B·i·o forward and twice that backward (input and weight gradients)."""
    batch, fan_in, fan_out = 7, 5, 3
    layer = torch.nn.Linear(fan_in, fan_out)
    x = torch.randn(batch, fan_in, requires_grad=True)
    with benchmark.MatmulRecorder() as recorder:
        layer(x).sum().backward()
    assert len(recorder.calls) == 3
    assert sum(benchmark.matmul_flops(shapes) for _, shapes in recorder.calls) == 3 * 2 * batch * fan_in * fan_out
    bmm = torch.randn(4, batch, fan_in), torch.randn(4, fan_in, fan_out)
    with benchmark.MatmulRecorder() as recorder:
        torch.baddbmm(torch.zeros(4, 1, fan_out), *bmm)
    assert sum(benchmark.matmul_flops(s) for _, s in recorder.calls) == 4 * 2 * batch * fan_in * fan_out
    assert benchmark.matmul_replay(recorder.calls, torch.device("cpu"))() > 0


def test_a_qam_update_reports_every_phase_the_profile_names(benchmark):
    from torch.profiler import ProfilerActivity, profile

    trainer = benchmark.OfflineTrainer.for_env(
        "QAM", benchmark.BENCH_ENV, benchmark.synthetic_buffer(torch.device("cpu"), size=1200),
        dict(actor_hidden_dims=(8,), value_hidden_dims=(8,), num_qs=2, flow_steps=3), batch_size=4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train(1)
    phases = {e.key for e in prof.key_averages() if e.key.startswith("phase:")}
    assert phases == {f"phase:{name}" for name in (
        "td_target", "critic_loss", "flow_matching", "am_sde_trajectory", "am_terminal_adjoint", "am_vjps",
        "am_loss", "backward", "clip_polyak", "adam")}

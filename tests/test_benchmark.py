"""The benchmark's plain path needs only torch and numpy, so it runs on a bare GPU machine, and writes one
record per method."""

from __future__ import annotations

import json
import subprocess

from .bare_python import ROOT, bare_command, bare_site


def test_plain_benchmark_runs_where_only_torch_and_numpy_are_installed(tmp_path):
    site = bare_site(tmp_path / "site")
    probe, env = bare_command(site, "-c", "import importlib.util as u; "
                              "print([m for m in ('ray', 'gymnasium', 'ogbench', 'mlflow', 'pandas') if u.find_spec(m)])")
    assert subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip() == "[]"
    out = tmp_path / "bench.json"
    argv, env = bare_command(site, str(ROOT / "experiments" / "benchmark.py"), "--plain-only", "--methods", "QAM",
                             "FQL", "--size", "small", "--steps", "2", "--repeats", "1", "--device", "cpu",
                             "--json", str(out))
    result = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(out.read_text())
    assert [(r["name"], r["method"], r["size"], r["device"]) for r in records] == [
        ("plain", "QAM", "small", "cpu"), ("plain", "FQL", "small", "cpu")]
    assert all(r["updates_per_s"] > 0 and r["steps"] == 2 for r in records)

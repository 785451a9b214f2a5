"""The port reproduces the official JAX update on the shipped fixtures, and the checker catches mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qam_ray import reference_check
from qam_ray.core import networks, qam

# Copies of shared/fixtures (FIXTURE_FORMAT.md): qam_small = QAM, qamf_alt = QAM-F.
FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("*.npz"))


def test_both_fixtures_are_present():
    assert [p.name for p in FIXTURES] == ["qam_small.npz", "qamf_alt.npz"]


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_port_matches_official_update(path):
    checks = reference_check.check_fixture(str(path))
    failed = [(c.name, c.error, c.tol) for c in checks if not c.ok]
    assert not failed
    names = {c.name for c in checks}
    # Every class of quantity of FIXTURE_FORMAT.md §7 is compared, for both updates.
    for update in ("update1", "update2"):
        for key in ("total_loss", "info/actor/adj_loss", "am_adjs", "next_actions", "grad_global_norm"):
            assert f"{update}/{key}" in names
        assert any(n.startswith(f"{update}/params/target_critic") for n in names)
    assert any(n.startswith("update1/adam_mu/") for n in names)
    if path.stem == "qamf_alt":
        assert "update2/info/actor/fql_q_loss" in names


def test_cli_exit_status(capsys):
    assert reference_check.main([str(p) for p in FIXTURES]) == 0
    assert "ALL CHECKS PASSED" in capsys.readouterr().out
    assert reference_check.main([str(FIXTURES[0].with_name("missing.npz"))]) == 1


def test_checker_catches_exact_erf_gelu(monkeypatch):
    monkeypatch.setattr(networks, "gelu", F.gelu)  # PyTorch's default GELU, not flax's tanh approximation
    checks = reference_check.check_fixture(str(FIXTURES[0]))
    assert any(not c.ok and "loss" in c.name for c in checks)


def test_checker_catches_missing_gradient_clip(monkeypatch):
    # Adam's first step is almost scale-free, so this shows up in the Adam moments (FIXTURE_FORMAT §7).
    monkeypatch.setattr(qam, "clip_grad_global_norm_", lambda grads, max_norm: torch.zeros(()))
    failed = {c.name.split("/")[1] for c in reference_check.check_fixture(str(FIXTURES[1])) if not c.ok}
    assert "adam_mu" in failed


def test_checker_rejects_unsupported_flags():
    config = {"residual": True, "full_action_dim": 4, "action_dim": 2, "horizon_length": 2}
    with pytest.raises(reference_check.FixtureError, match="residual"):
        reference_check.hyperparams_from_config(config)

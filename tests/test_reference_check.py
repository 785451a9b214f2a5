"""Every agent reproduces its official update on the shipped fixtures, and the checker catches mistakes: plausible
porting errors in our code, and fixtures with arrays removed or added."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qam_ray import reference_check
from qam_ray.agents import bam, ifql
from qam_ray.core import networks, optim

# Copies of the official fixtures (FIXTURE_FORMAT*.md): QAM, QAM-F, FQL, BAM, IFQL.
FIXTURE_DIR = Path(__file__).parent / "fixtures"
FIXTURES = sorted(FIXTURE_DIR.glob("*.npz"))


def fixture(name: str) -> str:
    return str(FIXTURE_DIR / f"{name}.npz")


def failed(path: str) -> set[str]:
    return {c.name for c in reference_check.check_fixture(path) if not c.ok}


def test_every_fixture_is_present():
    expected = ["bam_small", "fql_small", "ifql_small", "qam_small", "qamf_alt",
                "rebrac_small", "fedit_small", "dsrl_small", "fbrac_small", "fawac_small",
                "sacflow_g_small", "sacflow_t_small"]
    assert set(expected) <= {p.stem for p in FIXTURES}


@pytest.mark.parametrize("path", [p for p in FIXTURES if p.stem not in ("idql_small", "sacflow_g_small", "sacflow_t_small")],
                         ids=lambda p: p.stem)
def test_port_matches_official_update(path):  # (IDQL's three-optimiser format: tests/test_idql.py; SAC Flow's
    # online/offline updates, probes and init check: tests/test_sacflow.py)
    checks = reference_check.check_fixture(str(path))
    assert not [(c.name, c.error, c.tol) for c in checks if not c.ok]
    names = {c.name for c in checks}
    # Every class of quantity of the format documents is compared, for both updates.
    for update in ("update1", "update2"):
        for key in ("total_loss", "info/critic/critic_loss", "next_v" if path.stem != "ifql_small" else "v_pred",
                    "grad_global_norm", "target_q", "critic_q",
                    "fm_pred" if path.stem != "rebrac_small" else "actor_actions"):
            assert f"{update}/{key}" in names, key
        assert any(n.startswith(f"{update}/params/target_critic") for n in names)
        assert any(n.startswith(f"{update}/grads/critic") for n in names)
    assert any(n.startswith("update1/adam_mu/") for n in names)
    extra = {"qamf_alt": "update2/info/actor/fql_q_loss", "bam_small": "update2/sde_bc_terms",
             "fql_small": "update2/distill_flow_xs", "ifql_small": "acting/act/chosen_index",
             "qam_small": "update2/am_adjs", "rebrac_small": "update2/lam", "fedit_small": "update2/edit_log_probs",
             "dsrl_small": "update2/z_qs", "fbrac_small": "update2/bptt_flow_xs",
             "fawac_small": "update2/awr_weight"}[path.stem]
    assert extra in names


def test_cli_exit_status(capsys):
    assert reference_check.main([str(p) for p in FIXTURES]) == 0
    assert "ALL CHECKS PASSED" in capsys.readouterr().out
    assert reference_check.main([fixture("missing")]) == 1


def test_checker_catches_exact_erf_gelu(monkeypatch):
    monkeypatch.setattr(networks, "gelu", F.gelu)  # PyTorch's default GELU, not flax's tanh approximation
    for name in ("qam_small", "fql_small", "bam_small", "ifql_small"):
        assert any("loss" in n for n in failed(fixture(name))), name


def test_checker_catches_a_missing_gradient_clip(monkeypatch):
    # Adam's first step is almost scale-free, so this shows up in the Adam moments (FIXTURE_FORMAT §7).
    monkeypatch.setattr(optim, "clip_grad_global_norm_", lambda grads, max_norm: torch.zeros(()))
    for name in ("qamf_alt", "bam_small"):
        assert any("adam_mu" in n for n in failed(fixture(name))), name


def test_checker_catches_a_spurious_gradient_clip(monkeypatch):
    original = reference_check.hyperparams_from_config
    monkeypatch.setattr(reference_check, "hyperparams_from_config",
                        lambda agent, config: dataclasses.replace(original(agent, config), clip_grad_max_norm=1.0))
    for name in ("fql_small", "ifql_small"):  # the official FQL and IFQL use plain Adam
        assert any("adam_mu" in n for n in failed(fixture(name))), name


def test_checker_catches_polyak_from_post_step_weights_and_a_missing_target(monkeypatch):
    agent = bam.BAMAgent

    def post_step_update(self, optimizers, batch, draws, on_raw_gradients=None):
        optimizer = optimizers["adam"]
        optimizer.zero_grad(set_to_none=True)
        losses = self.losses(batch, draws)
        losses.total.backward()
        on_raw_gradients()
        optim.clip_grad_global_norm_([p.grad for p in self.online_parameters() if p.grad is not None], 1.0)
        optimizer.step()
        optim.polyak_update_(*self.target_pairs(), self.hp.tau)  # after the step: wrong
        return losses.metrics, losses.intermediates

    monkeypatch.setattr(agent, "update", post_step_update)
    assert any("params/target_critic" in n for n in failed(fixture("bam_small")))
    monkeypatch.undo()
    only_critic = lambda self: ([*self.target_critic.parameters()], [*self.critic.parameters()])  # noqa: E731
    monkeypatch.setattr(agent, "target_pairs", only_critic)
    assert any("params/target_actor_slow" in n for n in failed(fixture("bam_small")))


def test_checker_catches_ifql_acting_without_best_of_n(monkeypatch):
    monkeypatch.setattr(ifql, "best_of_n", lambda candidates, scores: candidates[:, 0])
    assert "acting/act/actions" in failed(fixture("ifql_small"))


def tampered(tmp_path, name: str, drop: tuple[str, ...] = (), add: dict | None = None) -> str:
    data = dict(np.load(fixture(name)))
    for key in drop:
        del data[key]
    data.update(add or {})
    path = tmp_path / f"{name}-tampered.npz"
    np.savez(path, **data)
    return str(path)


@pytest.mark.parametrize("key", ["total_loss", "next_actions", "step2/target_q", "info/critic/q_mean"])
def test_a_fixture_with_an_array_removed_fails(tmp_path, key):
    checks = reference_check.check_fixture(tampered(tmp_path, "fql_small", drop=(key,)))
    bad = [c.name for c in checks if not c.ok]
    assert bad and any(key.split("/")[-1] in n for n in bad), bad


def test_a_fixture_with_an_array_we_do_not_read_fails(tmp_path):
    path = tampered(tmp_path, "qam_small", add={"am_new_quantity": np.zeros(3, np.float32)})
    assert "fixture/am_new_quantity (not compared by our check)" in failed(path)


def test_checker_rejects_unsupported_flags_and_unknown_agents():
    config = {"residual": True, "full_action_dim": 4, "action_dim": 2, "horizon_length": 2, "variant": "QAM"}
    agent = reference_check.fixture_agent(config)
    with pytest.raises(reference_check.FixtureError, match="residual"):
        reference_check.hyperparams_from_config(agent, config)
    with pytest.raises(reference_check.FixtureError, match="known agents"):
        reference_check.fixture_agent({"agent": "cgql", "variant": "CGQL"})


SMALL = dict(actor_hidden_dims=(8, 8), value_hidden_dims=(6,), flow_steps=3)
CONFIGURATIONS = {  # configurations the public fixtures do not have; every size must come from the file
    "QAM-H1-rho0-E1-noclip": ("QAM", dict(obs_dim=4, action_dim=3, horizon_length=1, num_qs=1, rho=0.0,
                                          discount=0.9, inv_temp=2.0, clip_grad_max_norm=None)),
    "QAM-F-K1": ("QAM-F", dict(obs_dim=3, action_dim=2, horizon_length=3, num_qs=2, inv_temp=0.5, fql_alpha=7.0,
                               flow_steps=1)),
    "FQL-n2-H1": ("FQL", dict(obs_dim=5, action_dim=2, horizon_length=1, num_qs=3, alpha=3.0, best_of_n=2, rho=0.0)),
    "BAM-K1-noclip": ("BAM", dict(obs_dim=3, action_dim=2, horizon_length=2, num_qs=2, inv_temp=5.0, flow_steps=1,
                                  clip_grad_max_norm=None)),
    "BAM-n3": ("BAM", dict(obs_dim=3, action_dim=1, horizon_length=4, num_qs=4, inv_temp=1.0, best_of_n=3)),
    "IFQL-H3-N1": ("IFQL", dict(obs_dim=4, action_dim=2, horizon_length=3, num_qs=2, kappa=0.6, num_samples=1,
                                value_layer_norm=False)),
}


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_checker_reads_every_size_and_flag_from_the_file(tmp_path, name):
    """Fixtures in the official formats but other configurations (written from our own agents, so the errors are
    those of float32 replay): the checker must take every size from config_json and compare everything."""
    from .fixture_writer import write_fixture

    method, hyperparams = CONFIGURATIONS[name]
    path = tmp_path / f"{name}.npz"
    write_fixture(path, method, acting_observations=3 if method == "IFQL" else 0, **{**SMALL, **hyperparams})
    checks = reference_check.check_fixture(str(path))
    assert not [(c.name, c.error) for c in checks if not c.ok]
    assert any(c.name.startswith("update2/params/") for c in checks) and len(checks) > 50

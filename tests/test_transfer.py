"""Offline→online transfer metrics (the SMAC paper's drop and normalised regret) on closed-form curves."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from qam_ray.orchestration import analysis

DOMAIN, TASK = "cube-double-play", 1
# (method, seed) -> steps param, online_steps param, online/env_steps logged?, {step: success (fraction)}.
# Hand-off H = 1000 (the steps param) unless online/env_steps says otherwise.
RUNS = {
    # a drop: s₀ = 60, online curve 60, 30, 50, 80 → drop 30, mean 55
    ("A", 0): (1000, 300, False, {500: 0.2, 1000: 0.6, 1100: 0.3, 1200: 0.5, 1300: 0.8}),
    # no drop, last offline evaluation before H: s₀ = 60, curve 60, 70, 80, 90 → drop 0, mean 75
    ("A", 1): (1000, 300, False, {500: 0.4, 900: 0.6, 1100: 0.7, 1200: 0.8, 1300: 0.9}),
    # the minimum at the hand-off: s₀ = 20, curve 20, 40, 60, 60 → drop 0 (−20 if s₀ were not online), mean 45
    ("B", 0): (1000, 300, False, {500: 0.5, 1000: 0.2, 1100: 0.4, 1200: 0.6, 1300: 0.6}),
    # H = 1200 from online/env_steps (steps=1000, 4 iterations of 300): s₀ = 50 (at 1200, not 0.1 at 600),
    # curve 50, 30, 50, 70 → drop 20, mean 50
    ("B", 1): (1000, 300, True, {600: 0.1, 1200: 0.5, 1300: 0.3, 1400: 0.5, 1500: 0.7}),
    # no online phase: skipped, not zero
    ("A", 2): (1000, None, False, {500: 0.9, 1000: 0.0}),
}
# best on the task = 90 (A s1 at 1300; the offline-only A s2's 90 is not among the online runs').
# regret = 90 − mean: A0 35, A1 15, B0 45, B1 40; min-max over the task: (r − 15) / 30.
EXPECTED = {("A", 0): (60, 30, 35, 2 / 3), ("A", 1): (60, 0, 15, 0.0), ("B", 0): (20, 0, 45, 1.0),
            ("B", 1): (50, 20, 40, 5 / 6)}


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("qam_ray")
    for (method, seed), (steps, online_steps, log_env_steps, curve) in RUNS.items():
        tags = {"sweep": "t", "method": method, "domain": DOMAIN, "task": str(TASK), "seed": str(seed),
                "dataset_source": "generated"}
        with mlflow.start_run(experiment_id=experiment, tags=tags):
            mlflow.log_params({"steps": steps, **({"online_steps": online_steps} if online_steps else {})})
            handoff = 1200 if log_env_steps else steps
            for step, success in curve.items():
                mlflow.log_metric(analysis.SUCCESS_METRIC, success, step=step)
                if log_env_steps and step > handoff:
                    mlflow.log_metric(analysis.ONLINE_ENV_STEPS_METRIC, step - handoff, step=step)
    return uri


@pytest.fixture(scope="module")
def per_run(tracking_uri):
    runs = analysis.load_runs(["qam_ray"], tracking_uri, sweep="t")
    handoffs = analysis.handoff_steps(runs, tracking_uri)
    curves = analysis.learning_curves(list(runs["run_id"]), tracking_uri)
    return analysis.transfer_metrics(runs, curves, handoffs).set_index(["method", "seed"])


def test_hand_off_is_read_from_the_online_rows_and_offline_runs_are_skipped(tracking_uri):
    runs = analysis.load_runs(["qam_ray"], tracking_uri, sweep="t")
    handoffs = analysis.handoff_steps(runs, tracking_uri).merge(runs[["run_id", "method", "seed"]])
    assert handoffs.set_index(["method", "seed"])["handoff"].to_dict() == {
        ("A", 0): 1000, ("A", 1): 1000, ("B", 0): 1000, ("B", 1): 1200}


def test_drop_and_normalised_regret_by_hand(per_run):
    assert sorted(per_run.index) == sorted(EXPECTED)  # the run without an online phase is not a row
    for key, (offline_final, drop, regret, normalised) in EXPECTED.items():
        row = per_run.loc[key]
        assert row["offline_final"] == pytest.approx(offline_final), key
        assert row["drop"] == pytest.approx(drop), key  # a flipped sign makes A0's −30, B1's −20
        assert row["regret"] == pytest.approx(regret), key
        assert row["normalised_regret"] == pytest.approx(normalised), key  # unnormalised would be 15–45
        assert row["online_evaluations"] == 3
    assert per_run["normalised_regret"].min() == 0 and per_run["normalised_regret"].max() == 1


def test_aggregation_per_method_and_domain_is_mean_and_population_std_over_seeds(per_run):
    table = analysis.transfer_table(per_run.reset_index()).set_index(["method", "domain"])
    a, b = table.loc[("A", DOMAIN)], table.loc[("B", DOMAIN)]
    assert (a["seeds"], a["runs"], a["dropped"]) == (2, 2, 1) and (b["seeds"], b["dropped"]) == (2, 1)
    assert (a["drop_mean"], a["drop_std"]) == pytest.approx((15, 15))
    assert (b["drop_mean"], b["drop_std"]) == pytest.approx((10, 10))
    assert (a["regret_mean"], a["regret_std"]) == pytest.approx((25, 10))
    assert (a["normalised_regret_mean"], a["normalised_regret_std"]) == pytest.approx((1 / 3, 1 / 3))
    assert (b["normalised_regret_mean"], b["normalised_regret_std"]) == pytest.approx((11 / 12, 1 / 12))
    assert table.loc[("A", analysis.AGGREGATE), "drop_mean"] == pytest.approx(15)  # one domain: the same
    markdown = analysis.format_transfer_markdown(table.reset_index())
    assert "| 1/2 " in markdown and "15.0 ± 15.0" in markdown and "0.917 ± 0.083" in markdown
    assert markdown.strip().splitlines()[-1].startswith(f"| {analysis.AGGREGATE}")


def test_seed_means_over_tasks_then_domains_and_per_task_normalisation():
    rows = []
    for seed in (0, 1):  # per run mean online success m; regret = best − m with best = 100 on every task
        for domain, task, m in (("d1", 1, 50 + 10 * seed), ("d1", 2, 70), ("d2", 1, 20 + 40 * seed)):
            rows.append({"run_id": f"X{seed}{domain}{task}", "method": "X", "domain": domain, "task": task,
                         "seed": seed, "handoff": 0, "online_evaluations": 1, "offline_final": m, "online_min": m,
                         "online_final": m, "drop": 0.0, "regret": 100.0 - m, "normalised_regret": float("nan")})
    curves = pd.DataFrame([(r["run_id"], s, r["offline_final"]) for r in rows for s in (0, 1)],
                          columns=["run_id", "step", "success"])
    handoffs = pd.DataFrame({"run_id": [r["run_id"] for r in rows], "handoff": 0})
    per_run = analysis.transfer_metrics(pd.DataFrame(rows), curves, handoffs).set_index("run_id")
    # d1 task 2 has equal regrets in both seeds: min-max undefined, NaN; d1 task 1 and d2: seed 0 worst, seed 1 best
    assert per_run["normalised_regret"].isna().sum() == 2
    assert per_run.loc[["X0d11", "X1d11", "X0d21", "X1d21"], "normalised_regret"].tolist() == [1, 0, 1, 0]
    table = analysis.transfer_table(per_run.reset_index()).set_index("domain")
    # d1: seed 0 mean over tasks (50+70)/2 = 60, seed 1 (60+70)/2 = 65; d2: 20, 60; all: seed 0 40, seed 1 62.5
    assert (table.loc["d1", "online_final_mean"], table.loc["d1", "online_final_std"]) == pytest.approx((62.5, 2.5))
    assert (table.loc["all", "online_final_mean"], table.loc["all", "online_final_std"]) == pytest.approx(
        (51.25, 11.25))
    assert table.loc["all", "runs"] == 6 and table.loc["all", "normalised_regret_mean"] == pytest.approx(0.5)


def test_analyze_cli_writes_the_transfer_table_and_aligned_curves(tracking_uri, tmp_path, capsys):
    path = Path(__file__).parents[1] / "experiments" / "analyze.py"
    spec = importlib.util.spec_from_file_location("analyze_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "analysis"
    assert script.main(["--tracking-uri", tracking_uri, "--sweep", "t", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == set(analysis.REPORT_FILES) | set(analysis.TRANSFER_FILES)
    assert (out / "transfer_curves.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "Offline→online transfer" in printed and "15.0 ± 15.0" in printed
    table = pd.read_csv(out / "transfer.csv").set_index(["method", "domain"])
    assert table.loc[("B", DOMAIN), "drop_mean"] == pytest.approx(10)
    assert len(pd.read_csv(out / "transfer_runs.csv")) == 4


def test_aligned_curves_put_the_hand_off_at_zero(tracking_uri):
    runs = analysis.load_runs(["qam_ray"], tracking_uri, sweep="t")
    handoffs = analysis.handoff_steps(runs, tracking_uri)
    curves = analysis.learning_curves(list(handoffs["run_id"]), tracking_uri)
    aligned = analysis.aligned_curves(curves, handoffs).merge(runs[["run_id", "method", "seed"]])
    b1 = aligned[(aligned["method"] == "B") & (aligned["seed"] == 1)]
    assert b1["step"].tolist() == [-600, 0, 100, 200, 300]


def test_a_run_without_an_offline_evaluation_has_no_drop_but_a_regret():
    # online only (steps 0): evaluations after the hand-off only, 20 and 40 → regret 100 − 30 against a run
    # with a hand-off evaluation (s₀ = 100, curve 100, 100 → no drop, regret 0) on the same task
    curves = pd.DataFrame([("online", 100, 20.0), ("online", 200, 40.0),
                           ("transfer", 0, 100.0), ("transfer", 100, 100.0)], columns=["run_id", "step", "success"])
    runs = pd.DataFrame({"run_id": ["online", "transfer"], "method": ["SAC", "QAM"], "domain": "d", "task": 1,
                         "seed": 0})
    per_run = analysis.transfer_metrics(runs, curves, pd.DataFrame({"run_id": ["online", "transfer"],
                                                                    "handoff": 0})).set_index("run_id")
    assert per_run.loc["online", ["offline_final", "drop"]].isna().all()
    assert per_run.loc["online", "regret"] == pytest.approx(70) and per_run.loc["transfer", "regret"] == 0
    assert per_run["normalised_regret"].tolist() == [1.0, 0.0]
    table = analysis.transfer_table(per_run.reset_index()).set_index(["method", "domain"])
    assert table.loc[("SAC", "d"), ["runs", "with_drop", "dropped"]].tolist() == [1, 0, 0]
    markdown = analysis.format_transfer_markdown(table.reset_index())
    assert "| 0/0 " in markdown and "n/a" in markdown

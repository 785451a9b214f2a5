"""Results tables from MLflow runs follow the paper's protocol and line up with the published numbers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from qam_ray.orchestration import analysis

# success rates (fraction) of the last evaluation: (domain, task, seed) -> value
FINAL = {
    ("cube-double-play", 1, 0): 0.5, ("cube-double-play", 2, 0): 0.7,
    ("cube-double-play", 1, 1): 0.3, ("cube-double-play", 2, 1): 0.5,
    ("scene-play", 1, 0): 1.0, ("scene-play", 1, 1): 0.8,
}


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("qam_ray")
    with mlflow.start_run(experiment_id=experiment, tags={"sweep": "s1"}) as parent:  # the parent: no domain tag
        for (domain, task, seed), final in FINAL.items():
            tags = {"mlflow.parentRunId": parent.info.run_id, "sweep": "s1", "method": "QAM", "domain": domain,
                    "task": str(task), "seed": str(seed), "dataset_source": "generated"}
            with mlflow.start_run(experiment_id=experiment, tags=tags, nested=True):
                mlflow.log_metric(analysis.SUCCESS_METRIC, 0.1, step=1000)
                mlflow.log_metric(analysis.SUCCESS_METRIC, final, step=2000)
    with mlflow.start_run(experiment_id=experiment, tags={"sweep": "other", "method": "QAM", "domain": "scene-play",
                                                          "task": "1", "seed": "5", "dataset_source": "official"}):
        mlflow.log_metric(analysis.SUCCESS_METRIC, 0.0, step=10)
    return uri


def test_paper_protocol_per_seed_then_over_seeds(tracking_uri):
    runs = analysis.load_runs(["qam_ray"], tracking_uri, sweep="s1")
    assert len(runs) == len(FINAL) and set(runs["step"]) == {2000}
    table = analysis.paper_table(runs).set_index("domain")
    # cube-double: seed 0 → (50+70)/2 = 60, seed 1 → (30+50)/2 = 40: mean 50, population std 10.
    assert table.loc["cube-double-play", "mean"] == pytest.approx(50.0)
    assert table.loc["cube-double-play", "std"] == pytest.approx(10.0)
    # aggregate per seed: seed 0 → (60+100)/2 = 80, seed 1 → (40+80)/2 = 60: mean 70, std 10.
    assert table.loc["all", "mean"] == pytest.approx(70.0) and table.loc["all", "std"] == pytest.approx(10.0)
    assert table.loc["all", "seeds"] == 2 and bool(table.loc["all", "generated"])


def test_published_numbers_are_joined_and_shipped_with_the_package(tracking_uri):
    published = analysis.published_results("offline_1M")
    qam_all = published[(published["key"] == "all") & (published["method"] == "QAM")]
    assert float(qam_all["mean"].iloc[0]) == pytest.approx(44.39)
    runs = analysis.load_runs(["qam_ray"], tracking_uri, sweep="s1")
    comparison = analysis.compare_with_published(analysis.paper_table(runs)).set_index("domain")
    assert comparison.loc["cube-double-play", "paper_mean"] == pytest.approx(64.2)
    markdown = analysis.format_markdown(comparison.reset_index())
    assert "50.0 ± 10.0 (2 seeds, 2,000 steps) [generated data] / paper 64.2 ± 3.6" in markdown
    assert markdown.strip().splitlines()[-1].startswith("| all")
    assert "(2 seeds, 2,000 steps, 2 of 10 domains) [generated data] / paper 44.4 ± 1.4" in markdown
    with pytest.raises(ValueError, match="stage"):
        analysis.published_results("online")


def test_analyze_cli_writes_table_csv_and_curves(tracking_uri, tmp_path):
    path = Path(__file__).parents[1] / "experiments" / "analyze.py"
    spec = importlib.util.spec_from_file_location("analyze_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "analysis"
    assert script.main(["--tracking-uri", tracking_uri, "--sweep", "s1", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"table.md", "table.csv", "learning_curves.png", "comparison.png"}
    assert (out / "learning_curves.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="no trial runs"):
        script.main(["--tracking-uri", tracking_uri, "--sweep", "missing", "--out", str(out)])


def test_a_100m_domain_trained_on_its_1m_file_is_marked_and_on_shards_is_not():
    rows = [{"run_id": f"{method}{seed}", "method": method, "domain": "puzzle-4x4-play", "task": 1, "seed": seed,
             "dataset_source": "official", "dataset_size": size, "success": 40.0, "step": 1000}
            for method, size in (("QAM", "100M"), ("FQL", "1M")) for seed in (0, 1)]
    rows.append({**rows[0], "run_id": "c", "domain": "cube-double-play", "dataset_size": "1M"})  # a 1M paper domain
    comparison = analysis.compare_with_published(analysis.paper_table(pd.DataFrame(rows)))
    marked = comparison.set_index(["method", "domain"])["small_data"]
    assert marked.to_dict() == {("FQL", "all"): True, ("FQL", "puzzle-4x4-play"): True, ("QAM", "all"): False,
                                ("QAM", "cube-double-play"): False, ("QAM", "puzzle-4x4-play"): False}
    markdown = analysis.format_markdown(comparison)
    assert markdown.count("[1M data; paper: 100M]") == 2  # FQL's cell and FQL's aggregate

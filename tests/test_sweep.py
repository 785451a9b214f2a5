"""The sweep: presets, validation before Ray, a real smoke sweep logged to MLflow, resume without duplicates."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from qam_ray import analysis

ROOT = Path(__file__).parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sweep = load_script("sweep")


def test_paper_preset_dry_run_lists_every_trial(capsys):
    assert sweep.main(["--preset", "paper", "--dry-run", "--dataset-dir", "/data/ogbench"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "1800 trials" in out  # 10 domains × 5 tasks × 12 seeds × 3 variants
    assert "cube-quadruple-play, puzzle-4x4-play on their 100M-transition datasets" in captured.err
    assert "humanoidmaze-large-navigate" in out and "120012" in out


def test_bad_options_fail_before_ray(capsys):
    for argv, message in ((["--tasks", "6"], "tasks are 1..5"), (["--set", "inv_temperature=1"], "unknown hyperparameter"),
                          (["--eval-every", "300"], "must be a multiple"),
                          (["--preset", "search", "--variants", "QAM", "QAM-E"], "one domain, task and variant")):
        with pytest.raises(SystemExit):
            sweep.main(["--preset", "smoke", "--dry-run", *argv])
        assert message in capsys.readouterr().err


def test_missing_dataset_names_the_generator(tmp_path):
    with pytest.raises(SystemExit, match="generate_data.py --env cube-double --type play"):
        sweep.main(["--preset", "paper", "--domains", "cube-double-play", "--dataset-dir", str(tmp_path),
                    "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])


@pytest.fixture(scope="module")
def smoke_sweep(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root}/mlflow.db"
    argv = ["--preset", "smoke", "--dataset-dir", str(root / "data"), "--storage-path", str(root / "results"),
            "--tracking-uri", uri, "--name", "smoke-test"]
    assert sweep.main(argv) == 0
    return root, uri, argv


def trial_runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("qam_ray")
    return client, client.search_runs([experiment.experiment_id], filter_string="tags.sweep = 'smoke-test'")


def test_smoke_sweep_logs_parent_and_child_runs(smoke_sweep):
    _, uri, _ = smoke_sweep
    client, runs = trial_runs(uri)
    parents = [r for r in runs if r.data.tags["qam_ray.role"] == "sweep"]
    children = [r for r in runs if r.data.tags["qam_ray.role"] == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 2
    for run in children:
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id and run.info.status == "FINISHED"
        assert {tags[k] for k in ("algo", "variant", "domain", "task", "dataset_source")} == {
            "QAM", "cube-single-play", "2", "generated"}
        assert tags["env_name"] == "cube-single-play-singletask-task2-v0" and tags["git_commit"]
        assert run.data.params["inv_temp"] == "1.0" and run.data.params["num_qs"] == "2"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/total_loss")] == [4, 8]
        assert [m.step for m in client.get_metric_history(run.info.run_id, analysis.SUCCESS_METRIC)] == [8]
        assert "perf/updates_per_s" in run.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"learning_curve.png", "checkpoint_reference.json", "config"} <= artifacts
    assert sorted(r.data.tags["seed"] for r in children) == ["0", "1"]


def test_resume_adds_no_runs_and_analysis_reads_the_sweep(smoke_sweep, tmp_path):
    root, uri, argv = smoke_sweep
    assert sweep.main([*argv, "--resume"]) == 0
    _, runs = trial_runs(uri)
    assert len(runs) == 3  # still one parent and two trials
    analyze = load_script("analyze")
    assert analyze.main(["--tracking-uri", uri, "--sweep", "smoke-test", "--out", str(tmp_path / "a")]) == 0
    assert "cube-single-play" in (tmp_path / "a" / "table.md").read_text()


def test_search_preset_runs_optuna_trials_with_distinct_hyperparameters(local_ray, tiny_dataset_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["--preset", "search", "--domains", "cube-single-play", "--tasks", "2", "--variants", "QAM-E",
            "--num-samples", "2", "--max-concurrent", "2", "--steps", "8", "--steps-per-iteration", "4",
            "--eval-every", "4", "--eval-episodes", "1", "--dataset-dir", tiny_dataset_dir,
            "--storage-path", str(tmp_path / "results"), "--tracking-uri", uri, "--name", "search-test"]
    for key, value in sweep.TINY.items():
        argv += ["--set", f"{key}={value!r}"]
    assert sweep.main(argv) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("qam_ray")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string="tags.sweep = 'search-test' and tags.`qam_ray.role` = 'trial'")
    assert len(runs) == 2
    sampled = {(r.data.params["inv_temp"], r.data.params["edit_scale"]) for r in runs}
    assert len(sampled) == 2  # Optuna proposed two different configurations
    assert all(r.data.tags["variant"] == "QAM-E" for r in runs)

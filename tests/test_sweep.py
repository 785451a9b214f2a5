"""The sweep: presets, validation before Ray, a real smoke sweep logged to MLflow, resume without duplicates."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from qam_ray.orchestration import analysis
from qam_ray.orchestration.presets import TINY

ROOT = Path(__file__).parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sweep = load_script("sweep")
SMOKE_METHODS = ("QAM", "FQL", "BAM", "IFQL")
AGENTS = {"QAM": "qam", "FQL": "fql", "BAM": "bam", "IFQL": "ifql"}
OWN_PARAM = {"QAM": ("inv_temp", "1.0"), "FQL": ("alpha", "300.0"), "BAM": ("inv_temp", "10.0"), "IFQL": ("kappa", "0.9")}


def test_paper_preset_dry_run_lists_every_trial(capsys):
    assert sweep.main(["--preset", "paper", "--dry-run", "--dataset-dir", "/data/ogbench"]) == 0
    assert "600 trials" in capsys.readouterr().out  # QAM by default: 10 domains × 5 tasks × 12 seeds
    methods = ["QAM", "QAM-E", "QAM-F", "FQL", "BAM", "IFQL"]
    assert sweep.main(["--preset", "paper", "--methods", *methods, "--dry-run", "--dataset-dir", "/data/ogbench"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "3600 trials" in out  # × 6 methods
    # The paper preset trains cube-quadruple and puzzle-4x4 on their 100M shards (tests/test_shards.py): no note.
    assert "puzzle-4x4-play: 100M shards" in out and captured.err == ""
    header = next(line for line in out.splitlines() if line.startswith("method"))
    assert header.split()[1:] == sorted(methods)  # trials per method × domain
    row = next(line for line in out.splitlines() if line.startswith("humanoidmaze-large-navigate"))
    assert row.split()[1:] == ["60"] * 6 and "120012" in out
    assert sweep.main(["--preset", "paper", "--methods", "FQL", "--dry-run", "-v", "--dataset-dir", "/d"]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if " FQL " in line]) == 600  # one row each


def test_bad_options_fail_before_ray(capsys):
    for argv, message in ((["--tasks", "6"], "tasks are 1..5"), (["--set", "inv_temperature=1"], "unknown hyperparameter"),
                          (["--eval-every", "300"], "must be a multiple"),
                          (["--preset", "search", "--methods", "QAM", "QAM-E"], "one domain, task and method"),
                          (["--methods", "QAM", "CQL"], "known methods are QAM, QAM-E"),
                          (["--methods", "QAM", "FQL", "--set", "BAM.inv_temp=3"], "'BAM' is not a method of this sweep"),
                          (["--methods", "FQL", "--set", "FQL.kappa=0.9"], "FQL has no hyperparameter 'kappa'"),
                          (["--methods", "FQL", "--set", "alpha=-1"], "alpha=-1: must be a finite number >= 0")):
        with pytest.raises(SystemExit):
            sweep.main(["--preset", "smoke", "--dry-run", *argv])
        assert message in capsys.readouterr().err


def test_missing_dataset_names_the_generator(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--preset", "paper", "--domains", "cube-double-play", "--dataset-dir", str(tmp_path),
                    "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert "generate_data.py --env cube-double --type play" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smoke_sweep(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root}/mlflow.db"
    argv = ["--preset", "smoke", "--methods", *SMOKE_METHODS, "--dataset-dir", str(root / "data"), "--generate",
            "--storage-path", str(root / "results"), "--tracking-uri", uri, "--name", "smoke-test"]
    assert sweep.main(argv) == 0
    return root, uri, argv


def trial_runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("qam_ray")
    return client, client.search_runs([experiment.experiment_id], filter_string="tags.sweep = 'smoke-test'")


def test_smoke_sweep_logs_one_child_run_per_method_and_seed(smoke_sweep):
    _, uri, _ = smoke_sweep
    client, runs = trial_runs(uri)
    parents = [r for r in runs if r.data.tags["qam_ray.role"] == "sweep"]
    children = [r for r in runs if r.data.tags["qam_ray.role"] == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted((r.data.tags["method"], r.data.tags["seed"]) for r in children) == sorted(
        (m, s) for m in SMOKE_METHODS for s in ("0", "1"))
    for run in children:
        tags, method = run.data.tags, run.data.tags["method"]
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id and run.info.status == "FINISHED"
        assert (tags["agent"], tags["domain"], tags["task"], tags["dataset_source"]) == (
            AGENTS[method], "cube-single-play", "2", "generated")
        assert run.info.run_name == f"{method} cube-single-play t2 s{tags['seed']}"
        assert tags["env_name"] == "cube-single-play-singletask-task2-v0" and tags["git_commit"]
        key, value = OWN_PARAM[method]  # the method's own per-domain value (cube-single takes cube-double's)
        assert run.data.params[key] == value and run.data.params["num_qs"] == "2"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/total_loss")] == [4, 8]
        assert [m.step for m in client.get_metric_history(run.info.run_id, analysis.SUCCESS_METRIC)] == [8]
        assert "perf/updates_per_s" in run.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"learning_curve.png", "checkpoint_reference.json", "config"} <= artifacts


def test_resume_adds_no_runs_and_analysis_reads_the_sweep(smoke_sweep, tmp_path):
    root, uri, argv = smoke_sweep
    assert sweep.main([*argv, "--resume"]) == 0
    _, runs = trial_runs(uri)
    assert len(runs) == 1 + 2 * len(SMOKE_METHODS)  # still one parent and one trial per method and seed
    analyze = load_script("analyze")
    assert analyze.main(["--tracking-uri", uri, "--sweep", "smoke-test", "--out", str(tmp_path / "a")]) == 0
    table = (tmp_path / "a" / "table.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| domain"))
    assert [cell.strip() for cell in header.strip("|").split("|")][1:] == sorted(SMOKE_METHODS)  # a column each
    row = next(line for line in table if line.startswith("| cube-single-play"))
    assert row.count("(2 seeds, 8 steps) [generated data] / paper") == 4


NEW_METHODS = ("IDQL", "ReBRAC", "FEdit", "DSRL", "FBRAC", "FAWAC", "SAC-Flow-G", "SAC-Flow-T")


def test_every_later_method_runs_in_one_smoke_sweep_and_the_table_sets_it_beside_the_paper(local_ray,
                                                                                             tiny_dataset_dir,
                                                                                             tmp_path):
    """IDQL, the five further QAM-paper baselines and SAC Flow in one sweep with QAM: one finished child run each
    with eval/success_rate, and a results-table column each, with the published number where the paper has one."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert sweep.main(["--preset", "smoke", "--methods", "QAM", *NEW_METHODS, "--seeds", "0", "--dataset-dir",
                       tiny_dataset_dir, "--storage-path", str(tmp_path / "results"), "--tracking-uri", uri,
                       "--name", "later-methods"]) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("qam_ray")
    children = client.search_runs([experiment.experiment_id],
                                  filter_string="tags.sweep = 'later-methods' and tags.`qam_ray.role` = 'trial'")
    assert sorted(r.data.tags["method"] for r in children) == sorted(("QAM", *NEW_METHODS))
    for run in children:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, analysis.SUCCESS_METRIC)] == [8]
    analyze = load_script("analyze")
    assert analyze.main(["--tracking-uri", uri, "--sweep", "later-methods", "--out", str(tmp_path / "a")]) == 0
    table = (tmp_path / "a" / "table.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| domain"))
    columns = [cell.strip() for cell in header.strip("|").split("|")][1:]
    assert columns == sorted(("QAM", *NEW_METHODS))
    row = dict(zip(columns, next(line for line in table if line.startswith("| all")).strip("|").split("|")[1:]))
    published = analysis.published_results("offline_1M").set_index(["method", "key"])["mean"]
    for method in ("QAM", "ReBRAC", "FEdit", "DSRL", "FBRAC", "FAWAC"):  # the paper's aggregate beside ours
        assert f"/ paper {published[method, 'all']:.1f}" in row[method]
    for method in ("IDQL", "SAC-Flow-G", "SAC-Flow-T"):  # not in the QAM paper
        assert "/ paper not published" in row[method]


def test_search_preset_runs_optuna_trials_with_distinct_hyperparameters(local_ray, tiny_dataset_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["--preset", "search", "--domains", "cube-single-play", "--tasks", "2", "--methods", "QAM-E",
            "--num-samples", "2", "--max-concurrent", "2", "--steps", "8", "--steps-per-iteration", "4",
            "--eval-every", "4", "--eval-episodes", "1", "--dataset-dir", tiny_dataset_dir,
            "--storage-path", str(tmp_path / "results"), "--tracking-uri", uri, "--name", "search-test"]
    for key, value in TINY.items():
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
    assert all(r.data.tags["method"] == "QAM-E" for r in runs)


def test_mlflow_is_ready_for_comparing_methods(smoke_sweep):
    """The experiment opens on training runs; each child run has its dataset as an input and its final policy as a
    model that loads with mlflow.pyfunc and maps observations to action chunks; the parent carries the summary."""
    import mlflow
    import numpy as np

    _, uri, _ = smoke_sweep
    client, runs = trial_runs(uri)
    experiment = client.get_experiment_by_name("qam_ray")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    children = [r for r in runs if r.data.tags["qam_ray.role"] == "trial"]
    mlflow.set_tracking_uri(uri)
    for run in children:
        (dataset_input,) = run.inputs.dataset_inputs
        assert dataset_input.dataset.name == "cube-single-play-v0 (generated)"
        assert dataset_input.dataset.digest == run.data.tags["dataset_sha256"][:16]
        assert {t.key: t.value for t in dataset_input.tags}["source"] == "generated"
    for method in SMOKE_METHODS:  # one policy per agent family is enough to load
        run = next(r for r in children if r.data.tags["method"] == method)
        policy = mlflow.pyfunc.load_model(run.data.tags["policy_model_uri"])
        chunks = policy.predict(np.zeros((3, 28), np.float32))
        assert chunks.shape == (3, 5, 5) and np.abs(chunks).max() <= 1.0
    (parent,) = [r for r in runs if r.data.tags["qam_ray.role"] == "sweep"]
    assert {f"{m}/final_success_mean" for m in SMOKE_METHODS} <= set(parent.data.metrics)
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/table.md", "report/comparison.png", "report/learning_curves.png"} <= report

"""experiments/finetune.py and the online sweep presets: offline → online in one Tune trial on one MLflow
timeline, and the online phase of an existing sweep trial continuing that trial's run."""

from __future__ import annotations

import pytest

from tests.test_sweep import load_script

sweep = load_script("sweep")
finetune = load_script("finetune")


def trial_runs(uri, sweep_name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("qam_ray")
    return client, client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.sweep = '{sweep_name}' and tags.`qam_ray.role` = 'trial'")


def history(client, run, key):
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


def test_paper_online_dry_run_lists_every_trial(capsys):
    assert sweep.main(["--preset", "paper-online", "--methods", "QAM", "FQL", "BAM", "--dry-run",
                       "--dataset-dir", "/data/ogbench"]) == 0
    out = capsys.readouterr().out
    assert "1800 trials" in out and "+ 500,000 online env steps" in out


def test_online_flags_are_validated_before_ray(capsys, tmp_path):
    cases = ((["--utd-ratio", "0"], "--utd-ratio 0.0: must be a finite number > 0"),
             (["--seeds", "0", "1", "--offline-checkpoint", str(tmp_path)], "belongs to one trial"),
             (["--seeds", "0", "--offline-checkpoint", str(tmp_path)], "no learner_group/ folder"))
    for argv, message in cases:
        with pytest.raises(SystemExit):
            sweep.main(["--preset", "smoke-online", "--dry-run", *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.main(["--checkpoint", str(tmp_path)])
    assert "--checkpoint needs --env" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.main(["--checkpoint", str(tmp_path), "--env", "cube-single-play-singletask-task2-v0",
                       "--methods", "QAM", "FQL"])
    assert "one method" in capsys.readouterr().err


def test_finetune_smoke_runs_each_method_offline_then_online_in_one_run(local_ray, tiny_dataset_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert finetune.main(["--preset", "smoke", "--methods", "QAM", "FQL", "IDQL", "SMAC", "--dataset-dir", tiny_dataset_dir,
                          "--tracking-uri", uri, "--storage-path", str(tmp_path / "results"), "--name", "ft"]) == 0
    client, runs = trial_runs(uri, "ft")
    assert sorted(r.data.tags["method"] for r in runs) == ["FQL", "IDQL", "QAM", "SMAC"]
    for run in runs:
        assert run.info.status == "FINISHED"
        # offline: gradient steps 4, 8; online: 8 + env steps (2 EnvRunners × 5 chunks × 5 steps = 50 per iteration)
        assert [s for s, _ in history(client, run, "train/total_loss")] == [4, 8, 108]  # updates after 50 steps
        assert history(client, run, "online/env_steps") == [(58, 50.0), (108, 100.0)]
        assert [s for s, _ in history(client, run, "eval/success_rate")] == [8, 108]  # end of each phase
        buffer = history(client, run, "online/buffer_size")
        assert buffer[-1][1] == buffer[0][1] + 50
        assert {"perf/env_steps_per_s", "perf/sample_s", "perf/update_s"} <= set(run.data.metrics)
        assert run.data.params["online_steps"] == "100" and run.data.params["env_runners"] == "2"
    # The transfer metrics logged to each run, recomputed from its two evaluations (hand-off at 8, online at 108):
    # drop = s₀ − min(s₀, s₁); regret = best success of any of these runs − mean(s₀, s₁); in percentage points.
    evals = {r.info.run_id: [100 * v for _, v in history(client, r, "eval/success_rate")] for r in runs}
    best = max(max(curve) for curve in evals.values())
    for run in runs:
        curve = evals[run.info.run_id]
        assert history(client, run, "transfer/drop") == [(108, pytest.approx(curve[0] - min(curve)))]
        assert history(client, run, "transfer/regret") == [(108, pytest.approx(best - sum(curve) / 2))]


def test_finetune_continues_a_finished_offline_trial_run(local_ray, tiny_dataset_dir, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["--dataset-dir", tiny_dataset_dir, "--tracking-uri", uri, "--storage-path", str(tmp_path / "results")]
    assert sweep.main(["--preset", "smoke", "--methods", "FQL", "--seeds", "0", "--name", "offline",
                       "--set", "FQL.alpha=7.0", *common]) == 0
    client, (offline_run,) = trial_runs(uri, "offline")
    assert finetune.main(["--preset", "smoke", "--mlflow-run", offline_run.info.run_id, "--tracking-uri", uri,
                          "--storage-path", str(tmp_path / "results"), "--online-steps", "50",
                          "--start-training", "0"]) == 0
    _, new_runs = trial_runs(uri, f"finetune-{offline_run.info.run_id[:8]}")
    assert new_runs == []  # no new trial run: the offline one continues
    run = client.get_run(offline_run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.params["online_steps"] == "50"
    assert run.data.tags["method"] == "FQL" and run.data.params["alpha"] == "7.0"  # the run's own hyperparameters
    assert [s for s, _ in history(client, run, "train/total_loss")] == [4, 8, 58]  # one timeline
    assert [s for s, _ in history(client, run, "eval/success_rate")] == [8, 58]
    with pytest.raises(SystemExit):  # fine-tuned once: it cannot start another online phase
        finetune.main(["--preset", "smoke", "--mlflow-run", offline_run.info.run_id, "--tracking-uri", uri])
    assert "already has an online phase" in capsys.readouterr().err

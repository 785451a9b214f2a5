"""End to end as a user runs it on a cluster: `ray start --head`, a real `mlflow server`, and
`ray job submit --working-dir . -- python experiments/sweep.py --preset smoke`, all on loopback.

The test gives its Ray head its own temp dir and ports, and its MLflow server its own store and port. Afterwards
it stops exactly the processes it started: the Ray processes carrying its temp dir, and the server's process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_for(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop_processes_with(marker: str) -> None:
    """SIGTERM, then SIGKILL, every process whose command line names ``marker`` (this test's Ray temp dir)."""
    mine = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    for proc in mine:
        proc.terminate()
    _, alive = psutil.wait_procs(mine, timeout=10)
    for proc in alive:
        proc.kill()


def test_ray_job_submit_smoke_sweep_to_an_mlflow_server(tiny_dataset_dir, tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="qj", dir="/tmp")  # short: Ray's socket paths have a length limit
    (gcs, dashboard, client, node_manager, object_manager, metrics, agent_listen, agent_grpc, runtime_env,
     mlflow_port) = free_ports(10)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}", "MUJOCO_GL": "egl"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art"),
         "--workers", "1"],
        env=env, stdout=open(tmp_path / "mlflow.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    tracking_uri = f"http://127.0.0.1:{mlflow_port}"
    try:
        wait_for(f"{tracking_uri}/health", 90)
        subprocess.run(
            [str(BIN / "ray"), "start", "--head", f"--temp-dir={ray_tmp}", f"--port={gcs}", "--num-cpus=2",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
             f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
             f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent_listen}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
             "--disable-usage-stats"],
            env=env, check=True, capture_output=True, timeout=120)
        address = f"http://127.0.0.1:{dashboard}"
        runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1"}}
        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
             "--runtime-env-json", json.dumps(runtime_env), "--",
             "python", "experiments/sweep.py", "--preset", "smoke", "--dataset-dir", tiny_dataset_dir,
             "--storage-path", str(tmp_path / "results"), "--name", "job-test"],
            env=env, capture_output=True, text=True, timeout=600)
        job_id = next(line.split("'")[1] for line in submit.stdout.splitlines() if "submitted successfully" in line)
        status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, job_id],
                                env=env, capture_output=True, text=True, timeout=60)
        assert "succeeded" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr + submit.stdout[-3000:]
    finally:
        stop_processes_with(ray_tmp)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=120)  # a loaded machine takes a while to wind the server's workers down

    from mlflow.tracking import MlflowClient

    # The server is gone; its store is a sqlite file we can read directly.
    client = MlflowClient(f"sqlite:///{tmp_path}/server.db")
    experiment = client.get_experiment_by_name("qam_ray")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.sweep = 'job-test'")
    roles = sorted(r.data.tags["qam_ray.role"] for r in runs)
    assert roles == ["sweep", "trial", "trial"]
    for run in runs:
        if run.data.tags["qam_ray.role"] == "trial":
            assert run.info.status == "FINISHED" and "eval/success_rate" in run.data.metrics
    # Artifacts went through the server into its artifact store.
    assert list((tmp_path / "art").rglob("learning_curve.png"))

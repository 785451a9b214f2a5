"""MLflow's basic-auth app as the cluster configs run it, on loopback.

- The launcher's own head commands (cluster/ray-cluster-gpu.yaml: write auth.env, write basic_auth.ini, start the
  server unless an authenticated one answers) are run with the paths and the port moved into a temp folder.
- A server started with tests/mlflow_server.py and the auth config of the KubeRay ConfigMap
  (cluster/kuberay/mlflow-server.yaml, with its database moved into the temp folder) serves the rest: requests
  without credentials or with a wrong password are refused (401), a user without a grant reads but cannot write
  (403); a real smoke sweep (`experiments/sweep.py` in a subprocess with its own local Ray) logs everything as a
  non-admin sweep user; no secret reaches a param, a tag, an artifact, the sweep's log or Ray's session folder;
  and the sweep's preflight stops at once, with exit status 2 and no traceback, when the credentials are wrong.

Every secret is random per run, so finding one in MLflow's data can only mean that it leaked there.  Each test
stops exactly the processes it started (the server's own process group, the sweep's own process group).
"""

from __future__ import annotations

import base64
import configparser
import http.server
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.mlflow_server import BIN, MlflowServer, free_port
from tests.test_cluster_configs import LAUNCHER, configmap_auth_ini, launcher_mlflow_commands, load_yaml

ROOT = Path(__file__).resolve().parents[1]
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"
CREATE = "/api/2.0/mlflow/experiments/create"
PREFLIGHT_LIMIT_S = 30  # the refused sweep's whole run, imports included; a sweep that trains takes longer


def request(uri: str, path: str, body: dict | None = None, auth: tuple[str, str] | None = None) -> int:
    """HTTP status of a GET (``body`` None) or JSON POST, with optional basic auth."""
    req = urllib.request.Request(uri + path, data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def env_file(path: Path) -> dict[str, str]:
    """KEY=value lines, as `set -a; . file` reads the ones the launcher writes (no quoting needed)."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def client_env(user: str | None, password: str | None) -> dict[str, str]:
    """This process's environment with exactly the given credentials (none when ``user`` is None)."""
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS and k != "MLFLOW_TRACKING_URI"}
    if user is not None:
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    return env


def as_user(monkeypatch, user: str | None, password: str | None = None) -> None:
    """MLflow's clients read the credentials from the environment at every request."""
    for name in CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    if user is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def stop_group(pgid: int) -> None:
    """SIGTERM to one process group (a session this test started), SIGKILL to what is left after 30 s."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    _, alive = psutil.wait_procs(members, timeout=30)
    for proc in alive:
        proc.kill()


# ----------------------------------------------------------------------------------------------------------------
# The launcher's head commands, run for real (first in this file: its server is gone before the module's starts)
# ----------------------------------------------------------------------------------------------------------------


class _Unauthenticated(http.server.BaseHTTPRequestHandler):
    """What an MLflow server without auth answers to the guard's probe: 200."""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"experiments": []}')

    def log_message(self, *args):
        pass


def wait_for_process(matches, timeout: float = 60.0) -> psutil.Process:
    """The first process whose argv ``matches``, polled: the launcher returns once it has forked the server, which
    on a loaded machine can take a moment to exec its command line."""
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in psutil.process_iter(["cmdline"]) if matches(p.info["cmdline"] or [])]
        if found or time.monotonic() > deadline:
            assert found, f"no process started within {timeout} s"
            return found[0]
        time.sleep(0.5)


def test_the_launchers_head_commands_start_an_authenticated_server(tmp_path):
    write_env, write_ini, start = launcher_mlflow_commands(load_yaml(LAUNCHER))
    data = tmp_path / "data" / "mlflow"
    data.mkdir(parents=True)
    port = free_port()

    def local(command: str, port: int = port) -> str:
        # Only where the head has its files and its port differ here; loopback instead of every interface.
        command = command.replace("/data/mlflow", str(data)).replace("/tmp/mlflow-server.log",
                                                                      str(tmp_path / "server.log"))
        return command.replace("5000", str(port)).replace("--host 0.0.0.0", "--host 127.0.0.1")

    env = {**client_env(None, None), "PATH": f"{BIN}:{os.environ['PATH']}"}
    for name in ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                 "MLFLOW_AUTH_CONFIG_PATH"):
        env.pop(name, None)  # the server must get these from auth.env and nowhere else

    sessions = []  # every command runs in its own session: stopping that group stops whatever it started

    def bash(command: str) -> subprocess.CompletedProcess:
        # A timeout here also means a background job still holds the command's output open: `ray up` would hang.
        process = subprocess.Popen(["bash", "-c", command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
        sessions.append(process.pid)
        out, err = process.communicate(timeout=60)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    try:
        # 1. auth.env: random values, mode 0600, written once (a second start keeps them: the admin exists by then).
        assert bash(local(write_env)).returncode == 0
        auth_env = data / "auth.env"
        assert auth_env.stat().st_mode & 0o777 == 0o600
        values = env_file(auth_env)
        assert sorted(values) == ["MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_ADMIN_USERNAME",
                                  "MLFLOW_FLASK_SERVER_SECRET_KEY"]
        assert len(values["MLFLOW_AUTH_ADMIN_PASSWORD"]) >= 12  # MLflow refuses a shorter admin password
        assert bash(local(write_env)).returncode == 0 and env_file(auth_env) == values
        # 2. basic_auth.ini (its settings are compared with the ConfigMap's in test_cluster_configs.py).
        assert bash(local(write_ini)).returncode == 0
        ini = configparser.ConfigParser()
        ini.read(data / "basic_auth.ini")
        assert ini["mlflow"]["database_uri"] == f"sqlite:///{data}/basic_auth.db"

        # 3. The server: it returns at once (the server runs on in the background, in that session).
        admin = (values["MLFLOW_AUTH_ADMIN_USERNAME"], values["MLFLOW_AUTH_ADMIN_PASSWORD"])
        started = bash(local(start))
        assert started.returncode == 0, started.stderr
        server = wait_for_process(lambda cmdline: str(data) in " ".join(cmdline) and "server" in cmdline)
        assert os.getpgid(server.pid) == sessions[-1]
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if request(uri, "/health") == 200:
                    break
            except OSError:  # not listening yet
                pass
            assert time.monotonic() < deadline and server.is_running(), (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        assert request(uri, CREATE, {"name": "nobody"}) == 401
        assert request(uri, CREATE, {"name": "admin"}, auth=admin) == 200
        assert (data / "basic_auth.db").stat().st_mode & 0o077 == 0  # umask 077: the user store is private

        # Started again (ray up on a running head): the guard sees the authenticated server and starts none.
        again = bash(local(start))
        assert again.returncode == 0, again.stderr
        time.sleep(2)
        servers = [p for p in psutil.process_iter(["cmdline"])
                   if str(data) in " ".join(p.info["cmdline"] or []) and "server" in (p.info["cmdline"] or [])]
        assert servers == [server]
    finally:
        for session in sessions:
            stop_group(session)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(data) in " ".join(p.info["cmdline"] or [])]

    # A server WITHOUT auth on the port (one started by the old config): fail loudly, start nothing.
    fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unauthenticated)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        refused = bash(local(start, fake.server_address[1]))
        time.sleep(1)
        assert refused.returncode == 1 and "WITHOUT authentication" in refused.stderr, refused
        assert not [p for p in psutil.process_iter(["cmdline"]) if str(data) in " ".join(p.info["cmdline"] or [])]
    finally:
        fake.shutdown()
        for session in sessions:
            stop_group(session)


# ----------------------------------------------------------------------------------------------------------------
# One basic-auth server for the rest of the module
# ----------------------------------------------------------------------------------------------------------------


def test_the_auth_app_refuses_to_start_without_a_secret_key(tmp_path, monkeypatch):
    """What the configs rely on: without MLFLOW_FLASK_SERVER_SECRET_KEY the basic-auth server does not start at all
    (so a missing Secret or auth.env can never yield a server that runs with a guessable key)."""
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path}/auth.db\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
           "MLFLOW_AUTH_ADMIN_PASSWORD": secrets.token_urlsafe(18)}
    monkeypatch.delenv("MLFLOW_FLASK_SERVER_SECRET_KEY", raising=False)  # the server inherits this environment
    with pytest.raises(RuntimeError, match="MLFLOW_FLASK_SERVER_SECRET_KEY"):
        MlflowServer(tmp_path, workers=1, extra_args=("--app-name", "basic-auth"), env=env).start()


class AuthServer:
    def __init__(self, server: MlflowServer, secret_key: str, admin, sweeper, reader):
        self.server, self.uri, self.secret_key = server, server.uri, secret_key
        self.admin, self.sweeper, self.reader = admin, sweeper, reader

    def secrets(self) -> dict[str, str]:
        """Everything that must never be stored in MLflow, also as the basic-auth header value carrying it."""
        found = {"secret key": self.secret_key}
        for role in ("admin", "sweeper", "reader"):
            user, password = getattr(self, role)
            found[f"{role} password"] = password
            found[f"{role} basic-auth token"] = base64.b64encode(f"{user}:{password}".encode()).decode()
        return found


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A basic-auth server with the ConfigMap's auth config, a random secret key and admin, and two non-admin
    users created by the admin the way cluster/README.md §3 does it: a sweep user and a user with no grant."""
    from mlflow.server.auth.client import AuthServiceClient

    root = tmp_path_factory.mktemp("mlflow_auth")
    ini = configparser.ConfigParser()
    ini.read_string(configmap_auth_ini())
    ini["mlflow"]["database_uri"] = f"sqlite:///{root}/basic_auth.db"  # the ConfigMap's is on the pod's volume
    with open(root / "basic_auth.ini", "w") as f:
        ini.write(f)
    secret_key = secrets.token_hex(32)
    admin = ("qam-admin", secrets.token_urlsafe(18))
    sweeper, reader = ("qam-sweeps", secrets.token_urlsafe(18)), ("qam-reader", secrets.token_urlsafe(18))
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key,
           "MLFLOW_AUTH_ADMIN_USERNAME": admin[0], "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1]}
    # One worker, warmed up below: every authenticated request pays a scrypt hash of the password, and the first
    # ones of a worker also its lazy start-up, seconds on a loaded machine; the sweep's preflight probe allows 5 s.
    server = MlflowServer(root, workers=1, extra_args=("--app-name", "basic-auth"), env=env).start()
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            as_user(monkeypatch, *admin)
            users = AuthServiceClient(server.uri)
            for user, password in (sweeper, reader):
                assert not users.create_user(user, password).is_admin
        for user in (admin, sweeper):
            assert request(server.uri, SEARCH, auth=user) == 200
        yield AuthServer(server, secret_key, admin, sweeper, reader)
    finally:
        server.stop()


def unauthenticated(error) -> bool:
    """The server's 401, as MLflow's client reports it."""
    return error.error_code == "UNAUTHENTICATED" and "error code 401" in str(error)


def forbidden(error) -> bool:
    """The server's 403: a valid user without the permission."""
    return error.error_code == "PERMISSION_DENIED" and "error code 403" in str(error)


def test_writes_without_credentials_are_refused(auth_server, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = auth_server.uri
    assert request(uri, CREATE, {"name": "anonymous-raw"}) == 401
    as_user(monkeypatch, None)
    with pytest.raises(MlflowException) as error:
        MlflowClient(uri).create_experiment("anonymous")
    assert unauthenticated(error.value), error.value
    # Nor can an anonymous client log into a run that exists.
    as_user(monkeypatch, *auth_server.admin)
    run_id = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("admin-owned")).info.run_id
    as_user(monkeypatch, None)
    with pytest.raises(MlflowException) as error:
        MlflowClient(uri).log_metric(run_id, "x", 1.0)
    assert unauthenticated(error.value), error.value
    as_user(monkeypatch, *auth_server.admin)  # the refused writes left nothing behind
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("anonymous") is None and client.get_experiment_by_name("anonymous-raw") is None
    assert "x" not in client.get_run(run_id).data.metrics


@pytest.mark.parametrize("who", ["wrong-password", "unknown-user"])
def test_writes_with_wrong_credentials_are_refused(auth_server, monkeypatch, who):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    user = auth_server.sweeper[0] if who == "wrong-password" else "qam-nobody"
    password = auth_server.sweeper[1] + "x"
    assert request(auth_server.uri, CREATE, {"name": f"{who}-raw"}, auth=(user, password)) == 401
    assert request(auth_server.uri, SEARCH, auth=(user, password)) == 401  # reads too: what the preflight probes
    as_user(monkeypatch, user, password)
    with pytest.raises(MlflowException) as error:
        MlflowClient(auth_server.uri).create_experiment(who)
    assert unauthenticated(error.value), error.value
    as_user(monkeypatch, *auth_server.admin)
    assert MlflowClient(auth_server.uri).get_experiment_by_name(who) is None


def test_a_user_without_a_grant_reads_but_cannot_write_others_experiments(auth_server, monkeypatch):
    """default_permission = READ (the configs' choice): a valid user who owns nothing here can read, not write."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    as_user(monkeypatch, *auth_server.admin)
    experiment_id = MlflowClient(auth_server.uri).create_experiment("admin-only")
    as_user(monkeypatch, *auth_server.reader)
    client = MlflowClient(auth_server.uri)
    assert client.get_experiment(experiment_id).name == "admin-only"
    with pytest.raises(MlflowException) as error:
        client.create_run(experiment_id)
    assert forbidden(error.value), error.value
    with pytest.raises(MlflowException) as error:
        client.delete_experiment(experiment_id)
    assert forbidden(error.value), error.value


# ----------------------------------------------------------------------------------------------------------------
# A real sweep as the sweep user
# ----------------------------------------------------------------------------------------------------------------


def files_containing(root: str, values: dict[str, str]) -> list[str]:
    """'<name> in <file>' for every value found in a regular file under ``root``."""
    found = []
    for path in Path(root).rglob("*"):
        try:
            if not path.is_file() or path.is_symlink() or path.stat().st_size > 64 << 20:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        found += [f"{name} in {path}" for name, value in values.items() if value.encode() in data]
    return found


def run_sweep(tmp_path: Path, dataset_dir: str, uri: str, user: str, password: str, name: str, timeout: float,
              look_for: dict[str, str] | None = None) -> tuple[int, str, float, list[str]]:
    """experiments/sweep.py --preset smoke in its own session with its own local Ray: (exit status, its log,
    seconds, where any value of ``look_for`` occurs in Ray's session folder: its logs, its runtime-env data)."""
    ray_tmp = tempfile.mkdtemp(prefix="qa", dir="/tmp")  # this sweep's own Ray temp dir (short: socket paths)
    env = {**client_env(user, password), "RAY_ADDRESS": "local", "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, str(ROOT / "experiments" / "sweep.py"), "--preset", "smoke", "--dataset-dir", dataset_dir,
            "--tracking-uri", uri, "--storage-path", str(tmp_path / "results"), "--name", name]
    log_path = tmp_path / f"{name}.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        sweep = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            status = sweep.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            if sweep.poll() is None or status is None:  # exactly this sweep's process group (its Ray included)
                stop_group(sweep.pid)
    seconds = time.monotonic() - start
    in_ray = files_containing(ray_tmp, look_for or {})
    shutil.rmtree(ray_tmp, ignore_errors=True)
    text = log_path.read_text()
    assert status is not None, f"the sweep ran past {timeout} s:\n{text[-3000:]}"
    return status, text, seconds, in_ray


def all_artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    paths = []
    for info in client.list_artifacts(run_id, path):
        paths += all_artifacts(client, run_id, info.path) if info.is_dir else [info.path]
    return paths


def test_a_sweep_with_credentials_logs_everything_and_stores_no_secret(auth_server, tiny_dataset_dir, tmp_path,
                                                                      monkeypatch, record_property):
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    status, log, seconds, in_ray = run_sweep(tmp_path, tiny_dataset_dir, auth_server.uri, *auth_server.sweeper,
                                             name="auth-smoke", timeout=420, look_for=auth_server.secrets())
    record_property("sweep_seconds", round(seconds, 1))
    assert status == 0, log[-4000:]

    as_user(monkeypatch, *auth_server.admin)
    client = MlflowClient(auth_server.uri)
    experiment = client.get_experiment_by_name("qam_ray")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.sweep = 'auth-smoke'")
    parents = [r for r in runs if r.data.tags.get("qam_ray.role") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("qam_ray.role") == "trial"]
    assert len(parents) == 1 and len(trials) == 2 and len(runs) == 3, [r.data.tags for r in runs]
    assert sorted(r.data.params["seed"] for r in trials) == ["0", "1"]
    assert all(run.info.status == "FINISHED" for run in runs), [run.info for run in runs]
    # The sweep user created the experiment, so it owns it (MANAGE: a resumed sweep can write on); any other
    # user falls back to default_permission and can only read it.
    users = AuthServiceClient(auth_server.uri)
    assert users.get_user_permission(auth_server.sweeper[0], "experiment", experiment.experiment_id).permission == "MANAGE"
    assert users.get_user_permission(auth_server.reader[0], "experiment", experiment.experiment_id).permission == "READ"
    for trial in trials:
        assert trial.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert "eval/success_rate" in trial.data.metrics
        assert client.get_metric_history(trial.info.run_id, "eval/success_rate")

    # No secret in a param, a tag, any artifact (config/resolved_config.json included) or the sweep's own log.
    for trial in trials:
        assert "config/resolved_config.json" in all_artifacts(client, trial.info.run_id)
    leaks = stored_secrets(client, runs, auth_server.secrets(), tmp_path / "artifacts")
    leaks += [f"{what} in the sweep's log" for what, value in auth_server.secrets().items() if value in log]
    # Ray's own logs stay clean too: the credentials reach the trials through the environment that Ray started
    # in (as on the cluster: ray start / the pod env), never through a runtime_env, which Ray would log.
    assert not leaks + in_ray, leaks + in_ray


def stored_secrets(client, runs, secrets: dict[str, str], directory: Path) -> list[str]:
    """Where any of ``secrets`` (name -> value) occurs in the params, tags and artifacts of ``runs``."""
    leaks = []
    for run in runs:
        stored = {f"param {k}": f"{k}={v}" for k, v in run.data.params.items()}
        stored |= {f"tag {k}": f"{k}={v}" for k, v in run.data.tags.items()}
        for path in all_artifacts(client, run.info.run_id):
            local = client.download_artifacts(run.info.run_id, path, str(directory / run.info.run_id))
            stored[f"artifact {path}"] = Path(local).read_bytes().decode("utf-8", errors="replace")
        leaks += [f"{what} in {where} of run {run.info.run_name!r}" for what, value in secrets.items()
                  for where, text in stored.items() if value in text]
    return leaks


def test_the_leak_search_finds_planted_secrets(auth_server, monkeypatch, tmp_path):
    """The search above can fail: a secret planted in a param, a tag and a nested artifact is found in each."""
    from mlflow.tracking import MlflowClient

    as_user(monkeypatch, *auth_server.admin)
    client = MlflowClient(auth_server.uri)
    run_id = client.create_run(client.create_experiment("planted")).info.run_id
    found = auth_server.secrets()
    client.log_param(run_id, "uri", f"http://u:{auth_server.sweeper[1]}@host:5000")
    client.set_tag(run_id, "header", f"Basic {found['admin basic-auth token']}")
    client.log_dict(run_id, {"env": {"MLFLOW_FLASK_SERVER_SECRET_KEY": auth_server.secret_key}}, "config/deep/x.json")
    leaks = stored_secrets(client, [client.get_run(run_id)], found, tmp_path)
    assert sorted(leaks) == sorted([
        "sweeper password in param uri of run " + repr(client.get_run(run_id).info.run_name),
        "admin basic-auth token in tag header of run " + repr(client.get_run(run_id).info.run_name),
        "secret key in artifact config/deep/x.json of run " + repr(client.get_run(run_id).info.run_name),
    ]), leaks


@pytest.mark.parametrize("who", ["wrong-password", "no-credentials"])
def test_the_sweep_refuses_to_start_with_wrong_credentials(auth_server, tiny_dataset_dir, tmp_path, monkeypatch,
                                                           who, record_property):
    """The preflight's probe (qam_ray/orchestration/checks.py) gets the server's 401: exit 2, a message naming
    the fix, no traceback, before Ray starts or anything is written."""
    from mlflow.tracking import MlflowClient

    user, password = (auth_server.sweeper[0], auth_server.sweeper[1][::-1]) if who == "wrong-password" else (None,
                                                                                                        None)
    name = f"refused-{who}"
    status, log, seconds, _ = run_sweep(tmp_path, tiny_dataset_dir, auth_server.uri, user, password, name=name,
                                        timeout=120)
    record_property("refused_seconds", round(seconds, 1))
    assert status == 2, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    who_text = f"user {auth_server.sweeper[0]!r}" if user else "no credentials"
    assert f"the server refuses {who_text} (401)" in log and "MLFLOW_TRACKING_PASSWORD" in log, log
    assert seconds < PREFLIGHT_LIMIT_S, f"the refusal took {seconds:.0f} s"
    assert "Started a local Ray instance" not in log
    assert not (tmp_path / "results" / name).exists()  # nothing written: the name stays free
    as_user(monkeypatch, *auth_server.admin)
    client = MlflowClient(auth_server.uri)
    experiment = client.get_experiment_by_name("qam_ray")
    if experiment is not None:
        assert not client.search_runs([experiment.experiment_id], filter_string=f"tags.sweep = '{name}'")
    if password is not None:
        assert password not in log  # the message names the user, never the password

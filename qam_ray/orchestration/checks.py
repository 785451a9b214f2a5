"""Checks of everything outside the command line that a sweep needs, made before Ray starts and before anything is
written: the tracking URI (and its server), the Ray address, the storage path, the resources a trial asks for, and
the dataset files themselves.  Each returns a list of problems, each naming what is wrong and how to fix it, so a
bad setup costs seconds, not a night.
"""

from __future__ import annotations

import base64
import math
import os
import socket
import urllib.error
import urllib.parse
import urllib.request

PROBE_TIMEOUT_S = 5.0
RAY_PROBE_TIMEOUT_S = 30.0
API_PROBE_TIMEOUT_S = 30.0
URI_FORMS = ("sqlite:////absolute/path/mlflow.db", "http(s)://host:port of an MLflow server",
             "postgresql://… / mysql://… (a database MLflow supports)")
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql", "postgresql+psycopg2", "mysql+pymysql")


def tracking_uri_errors(uri: str, source: str) -> list[str]:
    """``source`` says where the URI came from (``--tracking-uri`` or ``MLFLOW_TRACKING_URI``)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        if not uri.startswith("sqlite:///") or uri == "sqlite:///":
            return [f"{source}={uri!r}: a sqlite URI is sqlite:///<path> (sqlite:////abs/path/mlflow.db)"]
        path = os.path.abspath(uri[len("sqlite:///"):])
        folder = os.path.dirname(path)
        if os.path.isdir(path):
            return [f"{source}={uri!r}: {path} is a folder; name the database file, e.g. {path}/mlflow.db"]
        existing = _existing_parent(folder)
        if not _writable(existing):
            return [f"{source}={uri!r}: cannot write in {existing}; pick a writable folder for mlflow.db"]
        if os.path.exists(path):
            with open(path, "rb") as f:
                if os.path.getsize(path) and f.read(16) != b"SQLite format 3\x00":
                    return [f"{source}={uri!r}: {path} exists but is not a sqlite database; move it away or "
                            "point the URI at another file"]
        return []
    if parsed.scheme in ("http", "https"):
        if not parsed.hostname:
            return [f"{source}={uri!r}: no host; expected {URI_FORMS[1]}"]
        return _probe_server(uri, source)
    if parsed.scheme in DATABASE_SCHEMES:
        return []
    if parsed.scheme in ("", "file"):
        return [f"{source}={uri!r}: MLflow 3's file store is in maintenance mode; use "
                f"sqlite:///{os.path.abspath(parsed.path or uri)}/mlflow.db or a tracking server"]
    return [f"{source}={uri!r}: unknown scheme {parsed.scheme!r}; expected one of: {'; '.join(URI_FORMS)}"]


def _existing_parent(folder: str) -> str:
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder or "/"


def _writable(folder: str) -> bool:
    """Whether a file can be created in ``folder`` (tried, then removed: ``os.access`` says yes to root in /proc)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _probe_server(uri: str, source: str) -> list[str]:
    """The server answers /health, and (with MLFLOW_TRACKING_USERNAME / _PASSWORD set) accepts the credentials."""
    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(base + "/health", timeout=PROBE_TIMEOUT_S) as response:
            if response.status != 200:
                return [f"{source}={uri!r}: /health answered {response.status}; is this an MLflow server?"]
    except (urllib.error.URLError, OSError) as error:
        return [f"{source}={uri!r}: no MLflow server answers within {PROBE_TIMEOUT_S:g} s ({_reason(error)}); start "
                "one (mlflow server --host ... --port ...) or unset it to track to sqlite:///<cwd>/mlflow.db"]
    request = urllib.request.Request(base + "/api/2.0/mlflow/experiments/search?max_results=1")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user is not None:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:  # a basic-auth server hashes the password (scrypt) per request: seconds on a loaded machine
        urllib.request.urlopen(request, timeout=API_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            who = f"user {user!r}" if user is not None else "no credentials"
            return [f"{source}={uri!r}: the server refuses {who} ({error.code}); set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD to an account of its basic-auth app"]
        return [f"{source}={uri!r}: the server's API answered {error.code}; is it an MLflow 3 tracking server?"]
    except (urllib.error.URLError, OSError) as error:
        return [f"{source}={uri!r}: the server's API did not answer ({_reason(error)})"]
    return []


def _reason(error: Exception) -> str:
    return str(getattr(error, "reason", error))


def ray_address_errors(address: str | None) -> list[str]:
    """A RAY_ADDRESS naming a head must reach it; ``ray.init`` would otherwise retry silently for minutes."""
    if not address or address in ("local", "auto"):
        return []
    parsed = urllib.parse.urlparse(address if "://" in address else f"gcs://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        return [f"RAY_ADDRESS={address!r}: expected host:port (the head's GCS), ray://host:10001 (Ray client) or "
                "'auto'; unset it to start a local Ray"]
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as error:
        return [f"RAY_ADDRESS={address!r}: nothing answers at {host}:{port} within {PROBE_TIMEOUT_S:g} s ({error}); "
                "start the head (ray start --head) or unset RAY_ADDRESS to start a local Ray"]
    return _probe_ray(address)


def _probe_ray(address: str) -> list[str]:
    """Connect to the head from a short-lived process with a deadline.  ray.init retries a head that accepts TCP
    but does not answer for minutes, and Ray's core replaces the driver's SIGTERM handler while it does: here the
    driver only waits on a child it can stop."""
    import subprocess
    import sys

    code = "import ray; ray.init(address=%r, log_to_driver=False, include_dashboard=False); ray.shutdown()" % address
    env = {**os.environ, "RAY_gcs_server_port_wait_time_s": "5"}  # a few attempts, not Ray's default minutes
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=RAY_PROBE_TIMEOUT_S, start_new_session=True)
    except subprocess.TimeoutExpired:
        return [f"RAY_ADDRESS={address!r}: the Ray head did not answer within {RAY_PROBE_TIMEOUT_S:g} s; check that "
                "it runs (ray status) or unset RAY_ADDRESS to start a local Ray"]
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return [f"RAY_ADDRESS={address!r}: cannot connect to Ray ({lines[-1] if lines else done.returncode}); "
                "check that the head runs (ray status) or unset RAY_ADDRESS to start a local Ray"]
    return []


def storage_path_errors(path: str) -> list[str]:
    if "://" in path:
        return [f"--storage-path {path}: trials write their checkpoints there directly, so it must be a folder "
                "every node can reach (local, or a shared mount such as /data/ray_results), not a URI"]
    absolute = os.path.abspath(path)
    if os.path.exists(absolute) and not os.path.isdir(absolute):
        return [f"--storage-path {path}: {absolute} is a file; pass a folder"]
    existing = _existing_parent(absolute)
    if not _writable(existing):
        return [f"--storage-path {path}: cannot write in {existing}; pass a writable folder"]
    return []


def resource_errors(cpus_per_trial: float, gpus_per_trial: float, runner_cpus: float, local: bool) -> list[str]:
    """What a trial asks for against what Ray can ever give it (a request that can never fit stays PENDING)."""
    errors = []
    for flag, value in (("--cpus-per-trial", cpus_per_trial), ("--gpus-per-trial", gpus_per_trial)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            errors.append(f"{flag} {value}: must be a finite number >= 0")
    if errors:
        return errors
    if cpus_per_trial <= 0:
        errors.append(f"--cpus-per-trial {cpus_per_trial}: a trial needs a CPU for its learner; pass > 0")
    if gpus_per_trial > 1 and gpus_per_trial != int(gpus_per_trial):
        errors.append(f"--gpus-per-trial {gpus_per_trial}: Ray shares a GPU only in fractions <= 1; pass a "
                      "fraction (0.25: four trials per GPU) or a whole number")
    if local:
        cpus = os.cpu_count() or 1
        if cpus_per_trial + runner_cpus > cpus:
            errors.append(f"a trial asks for {cpus_per_trial + runner_cpus:g} CPUs (--cpus-per-trial "
                          f"{cpus_per_trial:g} + its EnvRunners' {runner_cpus:g}) but this machine has {cpus}; lower "
                          "them, or set RAY_ADDRESS to a cluster")
        if gpus_per_trial > 0:
            import torch

            gpus = torch.cuda.device_count()
            if gpus_per_trial > gpus:
                errors.append(f"--gpus-per-trial {gpus_per_trial:g} but this machine has {gpus} GPU(s) torch can "
                              "use; pass 0 to train on the CPU, or set RAY_ADDRESS to a GPU cluster")
    return errors

"""A private `mlflow server` on loopback for tests: its own port, its own sqlite store and artifact folder.

The server runs in its own session (``start_new_session``), so stopping it means signalling exactly that process
group (the server and its uvicorn workers) and nothing else on this shared machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``with MlflowServer(tmp_path) as server: ... server.uri ...``; the store stays readable after the block."""

    def __init__(self, root: Path, *, workers: int | None = None, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, startup_timeout: float = 120.0):
        self.root = Path(root)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db_path = self.root / "server.db"
        self.backend_uri = f"sqlite:///{self.db_path}"
        self.artifacts = self.root / "artifacts"
        self.log_path = self.root / "mlflow-server.log"
        self.workers, self.extra_args, self.startup_timeout = workers, tuple(extra_args), startup_timeout
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", self.backend_uri, "--artifacts-destination", str(self.artifacts)]
        if self.workers is not None:
            argv += ["--workers", str(self.workers)]
        env = {**os.environ, **(self.env or {}), "PATH": f"{BIN}:{os.environ['PATH']}"}
        # A tracking URI or credentials of the caller's own environment must not leak into the server.
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            if name not in (self.env or {}):
                env.pop(name, None)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([*argv, *self.extra_args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:  # died at startup: say why instead of waiting for the timeout
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{self.uri}/health did not answer within {self.startup_timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text()[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the server's own process group, SIGKILL if it has not exited after 30 s; then any of its
        worker processes still alive, by PID (never by name: other servers may run on this machine)."""
        import psutil

        if self.process is None or self.process.poll() is not None:
            return
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        except ProcessLookupError:
            pass
        _, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:
            child.kill()

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

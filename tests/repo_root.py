"""The repository root, defined once for the tests and their helpers (`from repo_root import REPO_ROOT`).

Test helpers are imported as top-level modules (`from pipeline_repo import ...`): pytest puts tests/ on sys.path,
and conftest.py puts REPO_ROOT first on it so that `stages` is this checkout's."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

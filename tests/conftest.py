"""Shared test setup: tests import `stages` from the repository root and run offline on the CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Never let a test reach the network or a GPU by accident, and keep DVC quiet.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PIPELINE_DEVICE", "cpu")


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT

"""Stages of the image-classification pipeline; each module is one DVC stage (`python -m stages.<name>`).

Importing the package tunes the CPU runtime before torch loads, because both settings are read once at start-up:
- OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads otherwise spin-wait, and any other busy process (a parallel
  DVC stage, a second queued experiment) then cuts 2-thread throughput 7-10x (measured on the 2-core machines).
- glibc's mmap threshold: multi-MB temporaries were mmap'd and unmapped on every step, doubling small-batch step
  time; keeping them on the heap avoids the churn. Done with mallopt() so it works under `dvc repro`/`dvc exp`.
A value the user already set in the environment wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _raise_malloc_thresholds() -> None:
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        pass


_raise_malloc_thresholds()

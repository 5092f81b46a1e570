"""Benchmark helpers: a scratch copy of the pipeline whose data source is the real CIFAR-10 JPEG copy beside the
checkout (../shared/datasets/cifar10-jpeg.zip, linked into data/sources/, never copied), and stage runs timed as
subprocesses exactly as `dvc repro` runs them."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CIFAR_JPEG_ZIP = (REPO_ROOT / ".." / "shared" / "datasets" / "cifar10-jpeg.zip").resolve()
sys.path.insert(0, str(REPO_ROOT))

from stages.base.config import set_dotted  # noqa: E402


def machine() -> str:
    """The CPU model and its bf16/AMX flags (numbers compare only between runs on the same kind of host)."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == (platform.processor() or platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    present = ", ".join(flag for flag in wanted if flag in flags) or "none of " + ", ".join(wanted)
    return (f"{cpu} (flags: {present}), {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, python {platform.python_version()}")


def members_by_split_and_class(archive: zipfile.ZipFile) -> dict[tuple[str, str], list[str]]:
    """The JPEG copy's image members grouped by (split, class), each group in name order."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in sorted(name for name in archive.namelist() if name.lower().endswith(".jpg")):
        *_, split, cls, _file = name.split("/")
        groups.setdefault((split, cls), []).append(name)
    return groups


def header(title: str) -> None:
    print(f"# {title}\nmachine: {machine()}\ncommand: {' '.join([Path(sys.executable).name] + sys.argv)}\n"
          f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)


def set_params(root: Path, overrides: dict[str, Any]) -> None:
    """The repository's params.yaml with `overrides` ({"train.lr": 0.1}: keys it has) written into `root`."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        set_dotted(params, dotted, value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_workspace() -> Path:
    if not CIFAR_JPEG_ZIP.is_file():
        sys.exit(f"skipped: {CIFAR_JPEG_ZIP} not found (benchmarks need the real CIFAR-10 JPEG copy)")
    root = Path(tempfile.mkdtemp(prefix="cifar-bench-"))
    shutil.copytree(REPO_ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "data" / "sources").mkdir(parents=True)
    (root / "data" / "sources" / "cifar10-jpeg.zip").symlink_to(CIFAR_JPEG_ZIP)
    return root


def run_stage(root: Path, name: str, overrides: dict[str, Any] | None = None, quiet: bool = False) -> float:
    """Run `python -m stages.<name>` in `root` with the repo's params plus overrides; returns wall seconds."""
    set_params(root, {"data.source": "data/sources/cifar10-jpeg.zip", **(overrides or {})})
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=root, text=True,
                            stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"stage {name} failed ({result.returncode}){': ' + result.stdout[-2000:] if quiet else ''}")
    return seconds


def read_metrics(root: Path) -> dict[str, Any]:
    metrics = {}
    for name in ("train.json", "train_time.json", "test.json"):
        path = root / "metrics" / name
        if path.exists():
            metrics.update(json.loads(path.read_text()))
    return metrics

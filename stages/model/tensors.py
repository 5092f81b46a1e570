"""torch I/O and process set-up shared by the stages: deterministic atomic torch.save, weights-only loading with
one clear error, the prepared splits normalize writes, the device choice and seeding."""

from __future__ import annotations

import io
import os
import random
import re
from pathlib import Path
from typing import Any

import torch

from stages.base.runtime import PipelineError, write_bytes


def save_torch(obj: Any, path: str | Path) -> None:
    """torch.save, deterministically and atomically. torch names the archive's inner folder after the file it
    writes to, so saving into memory (always named 'archive') keeps the bytes independent of temp names."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def load_torch(path: str | Path, what: str) -> Any:
    """torch.load with weights_only=True (no code runs on unpickling) and a clear error for a wrong file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or zipfile errors by case
        raise PipelineError(f"{path}: cannot load {what}: not a file of plain tensors and values "
                            f"(refused or unreadable: {_load_failure_reason(error)})") from None


def _load_failure_reason(error: Exception) -> str:
    """The informative line of torch.load's error, without its terminal colour codes and without its advice to
    load the file unsafely."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip()
        if "unsupported GLOBAL" in line or "Unsupported global" in line:
            return line
    if lines and lines[0].startswith("Weights only load failed"):
        return "it holds objects other than tensors and plain values, which are never unpickled"
    return next((line for line in lines if line), type(error).__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA


def pick_device() -> torch.device:
    """cuda, then mps, then cpu. PIPELINE_DEVICE=cpu (or cuda:1, ...) overrides."""
    forced = os.environ.get("PIPELINE_DEVICE")
    if forced:
        try:
            device = torch.device(forced)
        except RuntimeError:
            raise PipelineError(f"PIPELINE_DEVICE={forced!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise PipelineError(f"PIPELINE_DEVICE={forced!r}, but this machine has no usable CUDA GPU")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_split(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A prepared split written by normalize: uint8 images N x 3 x H x W and int64 labels."""
    split = load_torch(path, "prepared data split")
    if not isinstance(split, dict) or "images" not in split or "labels" not in split:
        raise PipelineError(f"{path}: not a prepared data split (expected 'images' and 'labels')")
    return split["images"], split["labels"]


# ---------------------------------------------------------------- code

"""Helpers every stage needs: clear errors, atomic and deterministic writes, checksums, seeding, device choice,
the self-describing model checkpoint, and the code each stage runs (its import closure)."""

from __future__ import annotations

import ast
import contextlib
import glob
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

CHECKPOINT_FORMAT = "cifar-pipeline/checkpoint/2"  # 2: "state_dicts", one per ensemble member
CHECKPOINT_FORMAT_1 = "cifar-pipeline/checkpoint/1"  # one "state_dict"; still loaded
_UMASK = os.umask(0)
os.umask(_UMASK)


class PipelineError(Exception):
    """A mistake a user can make (bad params, bad data, wrong file): printed as one clear message, no traceback."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(), turning PipelineError into a one-line message and exit status 2."""
    try:
        main()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on failure removed.
    Readers therefore see either the old file or the complete new one, never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a killed earlier write
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files owner-only; outputs get normal permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield a fresh folder beside `target`; on success it replaces `target`, on failure it is removed. Two
    renames (the old folder is moved aside first), so readers see the previous complete folder or the new complete
    one, never a mixture; a run killed mid-way leaves `.NAME.new-*`/`.NAME.old-*` folders that the next call
    removes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("new", "old"):
        for stale in target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"):
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes it private; an output folder should look like any other
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    previous = trash / target.name
    if target.exists() or target.is_symlink():
        os.replace(target, previous)
    try:
        os.replace(staging, target)
    except BaseException:
        if previous.exists() or previous.is_symlink():  # put the previous folder back rather than leave none
            os.replace(previous, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: {what} not found; run the stage that writes it first (dvc repro)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PipelineError(f"{path}: {what} is not valid JSON ({error})") from None


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


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- runtime


def derived_seed(seed: int, purpose: str) -> int:
    """An independent generator seed per purpose (synthetic train/test images, val/test splits), so changing one
    size or fraction leaves what the other purposes draw unchanged."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:8], "little") >> 1


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


def cpu_supports_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ---------------------------------------------------------------- checkpoint


def make_checkpoint(*, model: str, model_config: dict[str, Any], classes: list[str], image_size: int,
                    mean: list[float], std: list[float], state_dicts: list[dict[str, torch.Tensor]],
                    train: dict[str, Any] | None = None, pretrained: dict[str, str] | None = None,
                    epochs_completed: float | None = None) -> dict[str, Any]:
    """The self-describing checkpoint that train writes and load_checkpoint reads: everything needed to rebuild
    the model and feed it (architecture and its config, class names, input size, normalization), the weights of
    each ensemble member, and how it was trained. Key order is fixed, so the same run saves the same bytes."""
    return {"format": CHECKPOINT_FORMAT, "model": model, "model_config": model_config, "classes": classes,
            "image_size": image_size, "mean": mean, "std": std, "state_dicts": state_dicts, "train": train,
            "pretrained": pretrained, "epochs_completed": epochs_completed,
            "torch_version": torch.__version__.split("+")[0]}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a model checkpoint written by the train stage (see make_checkpoint)."""
    checkpoint = load_torch(path, "model checkpoint")
    if not isinstance(checkpoint, dict) or "format" not in checkpoint:
        raise PipelineError(f"{path}: not a checkpoint of this pipeline (no 'format' field)")
    if checkpoint["format"] == CHECKPOINT_FORMAT_1 and "state_dict" in checkpoint:
        # format 1 (before train.ensemble) held one model: the same as a one-member ensemble
        state_dict = checkpoint.pop("state_dict")
        checkpoint = {**checkpoint, "format": CHECKPOINT_FORMAT, "state_dicts": [state_dict]}
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise PipelineError(
            f"{path}: checkpoint format {checkpoint['format']!r} is not supported; expected {CHECKPOINT_FORMAT!r}"
        )
    missing = [key for key in ("model", "model_config", "classes", "image_size", "mean", "std", "state_dicts")
               if key not in checkpoint]
    if missing:
        raise PipelineError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if not isinstance(checkpoint["state_dicts"], list) or not checkpoint["state_dicts"]:
        raise PipelineError(f"{path}: checkpoint 'state_dicts' must be a non-empty list of model weights")
    return checkpoint


def load_split(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A prepared split written by normalize: uint8 images N x 3 x H x W and int64 labels."""
    split = load_torch(path, "prepared data split")
    if not isinstance(split, dict) or "images" not in split or "labels" not in split:
        raise PipelineError(f"{path}: not a prepared data split (expected 'images' and 'labels')")
    return split["images"], split["labels"]


# ---------------------------------------------------------------- code


PACKAGE_DIR = Path(__file__).resolve().parent


def code_closure(module: str) -> list[Path]:
    """The files of `stages` that running `python -m <module>` executes: the module, the package's __init__, and
    every stages module they import, transitively (read from the source with ast, nothing is imported). Paths are
    relative to the repository root, as dvc.yaml lists them; the resume fingerprint hashes the same list."""
    root = PACKAGE_DIR.parent
    package = PACKAGE_DIR.name
    seen: set[str] = set()
    pending = [module, package]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        path = root / (name.replace(".", "/") + ".py") if name != package else PACKAGE_DIR / "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                pending += [alias.name for alias in node.names if alias.name.split(".")[0] == package]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == package:  # from stages import x
                    pending += [f"{package}.{alias.name}" for alias in node.names]
                elif node.module.split(".")[0] == package:
                    pending.append(node.module)
    files = [Path(package) / "__init__.py" if name == package else Path(name.replace(".", "/") + ".py")
             for name in seen]
    return sorted(files, key=lambda p: (p.name != "__init__.py", str(p)))

"""Helpers every stage needs: clear errors, atomic and deterministic writes, checksums, seeding, device choice,
the self-describing model checkpoint, and the code each stage runs (its import closure).

A stage never ends in a traceback for a user's mistake or its machine's state: run_stage prints a PipelineError,
and a failed file operation (OSError: disk full, no permission, ...), as one line `error: <file>: <reason>` and
exits with status 2. The atomic writers name the output in such an error, not their temporary file, and remove
that temporary file, so a failed write leaves the previous output as it was."""

from __future__ import annotations

import ast
import contextlib
import errno
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
    """Run a stage's main(), turning a mistake (PipelineError) and a failed file operation (OSError: disk full, no
    permission, read-only file system...) into one line `error: ...` and exit status 2."""
    try:
        main()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as error:
        print(f"error: {describe_os_error(error)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


# What to do about the failures a user can fix; any other OSError is reported with its own reason only.
_OS_ERROR_ADVICE = {
    errno.ENOSPC: "free some disk space and rerun",
    errno.EACCES: "check the permissions of the file and its folder",
    errno.EPERM: "check the permissions of the file and its folder",
    errno.EROFS: "the file system is read-only: run the pipeline in a writable copy",
}


def describe_os_error(error: OSError) -> str:
    """`<file>: <reason>; <what to do>` for a failed file operation (the file part only where the error names
    one)."""
    reason = error.strerror or str(error) or type(error).__name__
    advice = _OS_ERROR_ADVICE.get(error.errno) if error.errno is not None else None
    text = f"{reason}; {advice}" if advice else reason
    names = [os.fsdecode(name) if isinstance(name, bytes) else str(name)
             for name in (error.filename, error.filename2) if name is not None]
    if len(names) == 2 and names[0] == names[1]:
        names = names[:1]
    return f"{' -> '.join(names)}: {text}" if names else text


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
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:  # it names a random temporary file that was never made
        error.filename = str(path)
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files owner-only; outputs get normal permissions
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            _name_output(error, tmp, path)
        raise


def _name_output(error: OSError, temporary: Path, output: Path) -> None:
    """Make `error` name the output where it names the temporary path or a file inside it, or no file at all (a
    write that runs out of space names none): the user knows the output, and the temporary file is gone."""
    def renamed(name: Any) -> Any:
        if name is None:
            return str(output)
        if not isinstance(name, (str, bytes, os.PathLike)):
            return name  # a file descriptor
        try:
            return str(output / Path(os.fsdecode(name)).relative_to(temporary))
        except ValueError:  # some other file
            return name
    error.filename = renamed(error.filename)
    if error.filename2 is not None:
        error.filename2 = renamed(error.filename2)


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
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    except OSError as error:  # it names a random temporary folder that was never made
        error.filename = str(target)
        raise
    os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes it private; an output folder should look like any other
    try:
        yield staging
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            _name_output(error, staging, target)
        raise
    try:
        _swap_in(staging, target)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)  # nothing left to remove once it has become `target`
        if isinstance(error, OSError):  # moving folders aside or in: about `target`, whatever temporary names
            error.filename, error.filename2 = str(target), None
        raise


def _swap_in(staging: Path, target: Path) -> None:
    """Replace `target` by the complete folder `staging` (see atomic_folder)."""
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    previous = trash / target.name
    if target.exists() or target.is_symlink():
        os.replace(target, previous)
    try:
        os.replace(staging, target)
    except BaseException:
        if previous.exists() or previous.is_symlink():  # put the previous folder back rather than leave none
            os.replace(previous, target)
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
                    epochs_completed: float | None = None,
                    selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """The self-describing checkpoint that train writes and load_checkpoint reads: everything needed to rebuild
    the model and feed it (architecture and its config, class names, input size, normalization), the weights of
    each ensemble member, and how it was trained: the params, the epochs trained and, in `selection`, which epoch
    each member's weights come from and why (stages/selection.py). Key order is fixed, so the same run saves the
    same bytes."""
    return {"format": CHECKPOINT_FORMAT, "model": model, "model_config": model_config, "classes": classes,
            "image_size": image_size, "mean": mean, "std": std, "state_dicts": state_dicts, "train": train,
            "pretrained": pretrained, "epochs_completed": epochs_completed, "selection": selection,
            "torch_version": torch.__version__.split("+")[0]}


def human_size(nbytes: int) -> str:
    """A byte count as messages show it: 1.5 GB, 2.0 MB or 65,232 bytes (binary units)."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:,.1f} GB"
    return f"{nbytes / 2**20:.1f} MB" if nbytes >= 2**20 else f"{nbytes:,} bytes"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a model checkpoint written by the train stage (see make_checkpoint): its format, the weights
    (tensors by name), and every field that rebuilds and feeds the model (stages.config.check_checkpoint_fields),
    so a wrong or crafted file gets one error naming the file and the field, never a crash later."""
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
    for index, state_dict in enumerate(checkpoint["state_dicts"]):
        if not isinstance(state_dict, dict) or not state_dict or not all(
                isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in state_dict.items()):
            raise PipelineError(f"{path}: checkpoint 'state_dicts' item {index} must map parameter names to tensors")
    from stages.config import check_checkpoint_fields  # imported here: stages.config imports this module
    try:
        check_checkpoint_fields(checkpoint)  # before any model is built: a crafted size is refused, not allocated
    except PipelineError as error:
        raise PipelineError(f"{path}: {error}") from None
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

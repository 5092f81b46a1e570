"""The runtime every entry point shares, without torch or numpy (so the YAML tools and the ONNX deployment side
start fast and need neither): clear errors, atomic and deterministic writes, JSON, checksums, derived seeds,
messages and progress.

A stage never ends in a traceback for a user's mistake or its machine's state: run_stage prints a PipelineError,
and a failed file operation (OSError: disk full, no permission, ...), as one line `error: <file>: <reason>` and
exits with status 2. The atomic writers name the output in such an error, not their temporary file, and remove
that temporary file, so a failed write leaves the previous output as it was."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import reprlib
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)
_BOUNDED_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_BOUNDED_REPR.maxlevel, _BOUNDED_REPR.maxstring, _BOUNDED_REPR.maxother, _BOUNDED_REPR.maxlong = 4, 120, 120, 120
_BOUNDED_REPR.maxlist = _BOUNDED_REPR.maxtuple = _BOUNDED_REPR.maxdict = _BOUNDED_REPR.maxset = 16


class PipelineError(Exception):
    """A mistake a user can make (bad params, bad data, wrong file): printed as one clear message, no traceback."""


class ParamsError(PipelineError):
    """A params.yaml (or preset) value that breaks a rule of the schema (stages/base/config.py)."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(), turning a mistake (PipelineError) and a failed file operation (OSError: disk full, no
    permission, read-only file system...) into one line `error: ...` and exit status 2."""
    try:
        main()
    except PipelineError as error:
        _say_on_stderr(f"error: {error}")
        sys.exit(2)
    except OSError as error:
        _say_on_stderr(f"error: {describe_os_error(error)}")
        sys.exit(2)
    except KeyboardInterrupt:
        _say_on_stderr("interrupted")
        sys.exit(130)


def _say_on_stderr(line: str) -> None:
    """One line in one write: print() writes the text and its newline separately, so two processes sharing
    stderr (the ranks under torchrun) could glue their lines together."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


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
    names = [shorten(os.fsdecode(name) if isinstance(name, bytes) else str(name))
             for name in (error.filename, error.filename2) if name is not None]
    if len(names) == 2 and names[0] == names[1]:
        names = names[:1]
    return f"{' -> '.join(names)}: {text}" if names else text


def log(message: str) -> None:
    print(message, flush=True)


def brief(value: Any, limit: int = 120) -> str:
    """repr(value) for a message, cut to about `limit` characters. A crafted file's field may be huge or, through
    YAML aliases, a structure that expands to billions of items, so it is rendered with reprlib's bounds (a few
    items per level, a few levels) rather than repr'd whole and then cut; and Python refuses to print an integer
    of more than 4300 digits at all."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4000:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        return shorten(repr(value[:limit + 1]), limit) if len(value) <= limit else \
            f"{repr(value[:limit])[:-1]}... (str, {len(value):,} characters)"
    return shorten(_BOUNDED_REPR.repr(value), limit)


def shorten(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters for a one-line message, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def first_line(error: BaseException) -> str:
    """The informative first line of a library's error, without terminal colour codes."""
    lines = [strip_ansi(line).strip() for line in str(error).splitlines()]
    return next((line for line in lines if line), type(error).__name__)


def strip_ansi(text: str) -> str:
    """`text` without terminal colour codes (torch and ONNX Runtime colour their messages)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


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


def human_size(nbytes: int) -> str:
    """A byte count as messages show it: 1.5 GB, 2.0 MB or 65,232 bytes (binary units)."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:,.1f} GB"
    return f"{nbytes / 2**20:.1f} MB" if nbytes >= 2**20 else f"{nbytes:,} bytes"


# ---------------------------------------------------------------- long work


def decode_workers() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class _NoProgress:
    """What progress() returns where tqdm is not installed (a deployment needs only onnxruntime, numpy, Pillow)."""

    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, count: int) -> None:
        return None

    def close(self) -> None:
        return None


def progress(total: int, desc: str, unit: str = "img", **kwargs: Any) -> Any:
    """A tqdm bar on stderr; in CI logs (no terminal) it updates at most every 30 s instead of flooding them."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, desc=desc, unit=unit, mininterval=0.5 if sys.stderr.isatty() else 30,
                dynamic_ncols=True, **kwargs)

"""download stage: fetch or generate the raw dataset into data/raw/ (written atomically: built beside it, then
renamed into place), with data/raw/source.json describing what it holds.

data.source:
- `cifar10`: the official python tarball from data.url (http, https or file), streamed with a progress bar into
  data/.download/ (outside data/raw, so DVC's clean-up before a rerun does not delete it), resumed with an HTTP
  Range request when a partial file is there, retried on transient errors, checked against its MD5 and extracted
  safely to data/raw/cifar-10-batches-py/. A verified archive stays in data/.download/ and is reused.
- `synthetic`: a small generated, learnable dataset in exactly the CIFAR-10 python-pickle format (offline).
- an image folder: a directory or a .zip/.tar/.tar.gz/.tgz archive inside data/sources/, or an http(s):// or
  file:// URL of such an archive. Layout `train/<class>/*` + `test/<class>/*` or only `<class>/*` (one wrapping
  top folder allowed). It is copied, without decoding, into one canonical uncompressed data/raw/images.zip
  (members `train|test|all/<class>/<path>`, sorted, fixed dates), so the same pictures always give the same bytes
  whatever the archive type, file order or timestamps. data.sha256, when set, must match the archive file; it
  applies to archives only (a folder's content is tracked by DVC, since data/sources is a dependency).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import http.client
import lzma
import os
import pickle
import posixpath
import re
import shutil
import socket
import ssl
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import numpy as np
import torch

from stages.common import PipelineError, file_digest, log, run_stage, write_json
from stages.config import load_params
from stages.images import IMAGE_EXTENSIONS, is_image_name, progress

RAW_DIR = Path("data/raw")
DOWNLOAD_DIR = Path("data/.download")
SOURCES_DIR = Path("data/sources")

CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # module attributes so tests can serve their own tarball
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FILES = ("batches.meta", *CIFAR10_TRAIN_BATCHES, "test_batch")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

RETRIES = 4          # extra attempts after a transient error (connection reset, timeout, HTTP 5xx)
BACKOFF_S = 1.0      # first wait between attempts; doubles each time (1, 2, 4, 8 s)
TIMEOUT_S = 60.0     # per socket operation, not for the whole transfer
CHUNK_BYTES = 1 << 20
_sleep = time.sleep  # tests replace it to retry without waiting

IMAGES_ZIP = "images.zip"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_JUNK_FILES = frozenset({"thumbs.db", "desktop.ini"})
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_EXPECTED_LAYOUT = ("train/<class>/<images> and test/<class>/<images> (optionally inside one top folder), "
                    "or only <class>/<images> folders")
SYNTHETIC_VERSION = 1  # bump when the generator changes, so source.json tells old and new data apart


def main() -> None:
    params = load_params()
    download(params["data"])


def download(data: dict[str, Any]) -> dict[str, Any]:
    """Build data/raw for data.source and return what source.json holds."""
    started = time.perf_counter()
    source = data["source"]
    with _staging_dir(RAW_DIR) as staging:
        if source == "cifar10":
            info = _cifar10(data["url"], staging)
        elif source == "synthetic":
            info = _synthetic(data, staging)
        else:
            info = _image_source(source, data["sha256"], staging)
        write_json(staging / "source.json", info)
    log(f"download: {source} -> {RAW_DIR}/ in {time.perf_counter() - started:.1f} s")
    return info


@contextlib.contextmanager
def _staging_dir(target: Path) -> Iterator[Path]:
    """A fresh folder beside `target` that replaces it on success and disappears on failure, so data/raw is
    always either the previous complete dataset or the new complete one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("new", "old"):  # folders left by a killed run
        for stale in target.parent.glob(f".{target.name}.{kind}-*"):
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; data/raw should look like any other folder
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
        if previous.exists() or previous.is_symlink():
            os.replace(previous, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------- cifar10


_CIFAR_OFFLINE = (
    "To run offline: `dvc exp run -S data.source=synthetic` (generated data in the CIFAR-10 format); "
    "or put an image folder or archive in data/sources/ and run `dvc exp run -S data.source=data/sources/NAME`; "
    "or point data.url at a mirror or a local copy: "
    "`dvc exp run -S data.url=file:///path/to/cifar-10-python.tar.gz`."
)


def _cifar10(url: str, staging: Path) -> dict[str, Any]:
    archive = _fetch(url, DOWNLOAD_DIR / CIFAR10_ARCHIVE, ("md5", CIFAR10_MD5), offline_hint=_CIFAR_OFFLINE)
    _extract_cifar(archive, staging)
    return {"kind": "cifar10", "source": "cifar10", "url": url, "md5": CIFAR10_MD5,
            "classes": list(CIFAR10_CLASSES)}


def _extract_cifar(archive: Path, staging: Path) -> None:
    """Extract cifar-10-batches-py/ from the tarball into the staging folder. Each member is checked before it is
    extracted (a refused one fails the stage, and the staging folder goes); links are refused when they point
    outside and otherwise skipped (the format has none); tarfile's 'data' filter guards the rest."""
    safe_filter = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for name, member in checked_members(tar, archive):
                if member.issym() or member.islnk():
                    continue
                if _parts(name)[:1] == [CIFAR10_DIR] and (member.isfile() or member.isdir()):
                    tar.extract(member, staging, **safe_filter)
    except tarfile.FilterError as error:
        raise PipelineError(f"{archive}: refused to extract member {error.tarinfo.name!r} ({error})") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as error:
        raise PipelineError(f"{archive}: cannot extract the CIFAR-10 archive ({error})") from None
    missing = [name for name in CIFAR10_FILES if not (staging / CIFAR10_DIR / name).is_file()]
    if missing:
        raise PipelineError(f"{archive}: not the CIFAR-10 python archive: {CIFAR10_DIR}/{missing[0]} is missing "
                            f"(expected {', '.join(CIFAR10_FILES)})")


def checked_members(tar: tarfile.TarFile, label: str | Path) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """Each member with its checked relative name; PipelineError for a name or link that points outside."""
    for member in tar:
        name = check_member_name(member.name, label)
        if member.issym() or member.islnk():
            check_link_target(name, member.linkname, label, hard=member.islnk())
        yield name, member


def check_member_name(name: str, archive: str | Path) -> str:
    """An archive member's name as a relative posix path; PipelineError if it could land outside the target."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"[A-Za-z]:", posix):
        raise PipelineError(f"{archive}: member {name!r} has an absolute path; refusing an archive that would "
                            f"write outside its target folder")
    if ".." in posix.split("/"):
        raise PipelineError(f"{archive}: member {name!r} contains '..'; refusing an archive that would write "
                            f"outside its target folder")
    return posix


def check_link_target(name: str, target: str, archive: str | Path, hard: bool = False) -> None:
    """Refuse a link member pointing outside the archive (a symlink is relative to its folder, a tar hardlink
    to the archive root)."""
    posix = target.replace("\\", "/")
    resolved = posixpath.normpath(posixpath.join("" if hard else posixpath.dirname(name), posix))
    if posix.startswith("/") or re.match(r"[A-Za-z]:", posix) or resolved == ".." or resolved.startswith("../"):
        raise PipelineError(f"{archive}: member {name!r} is a link to {target!r}, outside the archive; "
                            f"refusing it")


# ---------------------------------------------------------------- fetching


class _Transient(Exception):
    """A network failure worth retrying (the partial download is kept and resumed)."""


class _Offline(Exception):
    """The host cannot be reached at all (no DNS, connection refused, no route): retrying would not help."""


def _fetch(url: str, target: Path, checksum: tuple[str, str] | None, offline_hint: str) -> Path:
    """A local, verified copy of `url`: a file:// URL is used in place; http(s) is downloaded to `target`."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise PipelineError(f"{url}: file:// URLs must name a local file (file:///path), not host "
                                f"{parsed.netloc!r}")
        path = Path(urllib.request.url2pathname(parsed.path))
        if not path.is_file():
            raise PipelineError(f"{url}: file not found")
        if checksum:
            _verify(path, checksum, url, delete=False)
        return path
    if parsed.scheme not in ("http", "https"):
        raise PipelineError(f"{url}: unsupported URL scheme {parsed.scheme!r}; use http, https or file")
    if checksum and target.is_file():
        if file_digest(target, checksum[0]) == checksum[1]:
            log(f"download: using the verified {target} (delete it to download again)")
            return target
        target.unlink()
    try:
        _download(url, target, checksum)
    except _Offline as error:
        raise PipelineError(f"cannot download {url}: {parsed.hostname} is unreachable ({error}). "
                            f"{offline_hint}") from None
    return target


def _download(url: str, target: Path, checksum: tuple[str, str] | None) -> None:
    part = target.with_name(target.name + ".part")
    for attempt in range(RETRIES + 1):
        try:
            _transfer(url, part)
            break
        except _Transient as error:
            if attempt == RETRIES:
                raise PipelineError(f"downloading {url} failed after {RETRIES + 1} attempts ({error}); the partial "
                                    f"download {part} is kept and resumes on the next run") from None
            delay = BACKOFF_S * 2 ** attempt
            log(f"download: {error}; retrying in {delay:g} s")
            _sleep(delay)
    if checksum:
        _verify(part, checksum, url, delete=True)
    os.replace(part, target)
    _validator_file(part).unlink(missing_ok=True)


def _verify(path: Path, checksum: tuple[str, str], url: str, delete: bool) -> None:
    algorithm, expected = checksum
    actual = file_digest(path, algorithm)
    if actual != expected.lower():
        if delete:
            path.unlink(missing_ok=True)
            _validator_file(path).unlink(missing_ok=True)
        what = "deleted it; the next run downloads afresh" if delete else "left the file as it is"
        raise PipelineError(f"{path}: {algorithm.upper()} {actual} does not match the expected {expected} "
                            f"(from {url}): the file is corrupt or not the expected one; {what}")


def _validator_file(part: Path) -> Path:
    """Beside a partial download: the server's ETag or Last-Modified, sent as If-Range when resuming so that a
    file that changed on the server is downloaded afresh instead of being spliced onto the old part."""
    name = part.name[:-len(".part")] if part.name.endswith(".part") else part.name
    return part.with_name(name + ".validator")


def _transfer(url: str, part: Path) -> None:
    """One attempt: download `url` into `part`, resuming from its current size. Raises _Transient or _Offline."""
    part.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "cifar-pipeline-download"}
    validator = _validator_file(part)
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator.is_file():
            headers["If-Range"] = validator.read_text(encoding="utf-8").strip()
    response = _open(url, headers, part)
    if response is None:  # 416 with a part that is already complete
        return
    with response:
        total = None
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Transient(f"the server's answer (Content-Range {response.headers.get('Content-Range')!r}) "
                                 f"does not continue at byte {offset}; starting over")
            mode = "ab"
        else:  # 200: the server ignored Range, or the file changed (If-Range): start from zero
            if offset:
                log("download: the server does not resume this file; starting over")
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            etag = response.headers.get("ETag") or ""
            tag = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified") or ""
            if tag:
                validator.write_text(tag, encoding="utf-8")
            else:
                validator.unlink(missing_ok=True)
        with open(part, mode) as handle, progress(total, "download", unit="B", initial=offset, unit_scale=True,
                                                  unit_divisor=1024) as bar:
            while True:
                try:
                    block = response.read(CHUNK_BYTES)
                except (http.client.HTTPException, OSError) as error:
                    raise _Transient(f"transfer interrupted after {offset} bytes ({_reason(error)})") from None
                if not block:
                    break
                handle.write(block)
                offset += len(block)
                bar.update(len(block))
    # http.client does not raise when a connection closes early; the announced length is the only way to know.
    if total is not None and offset < total:
        raise _Transient(f"connection closed after {offset} of {total} bytes")
    if total is not None and offset > total:
        part.unlink(missing_ok=True)
        raise _Transient(f"received {offset} bytes, more than the {total} announced; starting over")


def _open(url: str, headers: dict[str, str], part: Path) -> http.client.HTTPResponse | None:
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and "Range" in headers:
            _, total = _content_range(error.headers.get("Content-Range"), allow_unsatisfied=True)
            if total is not None and headers["Range"] == f"bytes={total}-":
                return None
            # The partial file does not fit the server's file (it changed, or the part is too long): drop it so
            # the next attempt starts from zero instead of sending the same Range request forever.
            part.unlink(missing_ok=True)
            _validator_file(part).unlink(missing_ok=True)
            raise _Transient("the server cannot resume the partial file; starting over") from None
        if error.code in (408, 429) or error.code >= 500:
            raise _Transient(f"HTTP {error.code} {error.reason}") from None
        raise PipelineError(f"{url}: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise PipelineError(f"{url}: TLS certificate check failed ({reason.verify_message or reason})") from None
        if isinstance(reason, (socket.gaierror, ConnectionRefusedError)) or (
                isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)):
            raise _Offline(_reason(reason)) from None
        raise _Transient(_reason(reason if isinstance(reason, BaseException) else error)) from None
    except (http.client.HTTPException, OSError) as error:  # e.g. RemoteDisconnected, timeouts after connecting
        raise _Transient(_reason(error)) from None


def _reason(error: BaseException) -> str:
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host name: {error.strerror or error}"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, (TimeoutError, socket.timeout)):
        return "timed out"
    text = str(error).strip()
    return text or type(error).__name__


def _content_range(header: str | None, allow_unsatisfied: bool = False) -> tuple[int | None, int | None]:
    """(first byte, total size) from 'bytes 100-199/200' (or 'bytes */200' in a 416 answer)."""
    match = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", (header or "").strip())
    if not match or (match.group(1) is None and not allow_unsatisfied):
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


# ---------------------------------------------------------------- synthetic


def _synthetic(data: dict[str, Any], staging: Path) -> dict[str, Any]:
    sizes, seed = data["synthetic"], data["seed"]
    train_images, train_labels = synthetic_images(sizes["train_size"], seed, "train")
    test_images, test_labels = synthetic_images(sizes["test_size"], seed, "test")
    write_cifar_batches(staging / CIFAR10_DIR, train_images, train_labels, test_images, test_labels)
    return {"kind": "synthetic", "source": "synthetic", "generator": SYNTHETIC_VERSION, "seed": seed,
            "train_size": sizes["train_size"], "test_size": sizes["test_size"], "classes": list(CIFAR10_CLASSES)}


def derived_seed(seed: int, purpose: str) -> int:
    """Independent generator seeds for each purpose, so e.g. a different test_size leaves the training images
    unchanged."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:8], "little") >> 1


def synthetic_images(count: int, seed: int, split: str) -> tuple[torch.Tensor, list[int]]:
    """`count` 32x32 RGB images (uint8 N x 3 x 32 x 32) of the 10 classes, balanced, in a seeded order.

    Class = pattern (label % 5: horizontal stripes, vertical stripes, rings, blob, checkerboard) x colour family
    (label // 5: warm or cool). Each image varies its offset (+-3 px), stripe frequency and phase, blob size,
    colours and background, plus pixel noise, so neither colour alone (2 groups) nor pattern alone (5 groups)
    separates the classes. A horizontally flipped or slightly shifted image is another sample of the same class,
    so training augmentation keeps the labels true."""
    generator = torch.Generator().manual_seed(derived_seed(seed, f"synthetic-{split}"))

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, *shape, generator=generator, dtype=torch.float64)

    labels = (torch.arange(count) % 10)[torch.randperm(count, generator=generator)]
    offset_y, offset_x = uniform(-3, 3, 1, 1), uniform(-3, 3, 1, 1)
    freq, phase, sigma = uniform(0.10, 0.18, 1, 1), uniform(0, 2 * torch.pi, 1, 1), uniform(4, 8, 1, 1)
    warm = torch.tensor([0.85, 0.45, 0.20], dtype=torch.float64)
    cool = torch.tensor([0.20, 0.50, 0.85], dtype=torch.float64)
    foreground = torch.where((labels // 5 == 0).view(-1, 1), warm, cool) + 0.12 * torch.randn(
        count, 3, generator=generator, dtype=torch.float64)
    background = uniform(0.1, 0.6, 1) + 0.06 * torch.randn(count, 3, generator=generator, dtype=torch.float64)
    axis = torch.arange(32, dtype=torch.float64) - 15.5
    pixels = torch.empty((count, 3, 32, 32), dtype=torch.uint8)
    for start in range(0, count, 1024):  # in chunks: the float64 temporaries of 50,000 images would take GBs
        part = slice(start, start + 1024)
        y = (axis.view(1, 32, 1) - offset_y[part]).expand(-1, 32, 32)
        x = (axis.view(1, 1, 32) - offset_x[part]).expand(-1, 32, 32)
        wave, radius = 2 * torch.pi * freq[part], torch.sqrt(x * x + y * y)
        shapes = torch.stack([
            0.5 + 0.5 * torch.sin(wave * y + phase[part]),
            0.5 + 0.5 * torch.sin(wave * x + phase[part]),
            0.5 + 0.5 * torch.cos(wave * radius),
            torch.exp(-radius ** 2 / (2 * sigma[part] ** 2)),
            0.5 + 0.5 * torch.sin(wave * x) * torch.sin(wave * y),
        ], dim=1)  # n x 5 x 32 x 32
        mask = shapes[torch.arange(len(y)), labels[part] % 5].unsqueeze(1)
        images = background[part].view(-1, 3, 1, 1) * (1 - mask) + foreground[part].view(-1, 3, 1, 1) * mask
        images += 0.08 * torch.randn(images.shape, generator=generator, dtype=torch.float64)
        pixels[part] = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels, labels.tolist()


def write_cifar_batches(directory: Path, train_images: torch.Tensor, train_labels: list[int],
                        test_images: torch.Tensor, test_labels: list[int],
                        label_names: tuple[str, ...] = CIFAR10_CLASSES) -> None:
    """Write images (uint8 N x 3 x 32 x 32) in the CIFAR-10 python format: five training batches, test_batch and
    batches.meta, pickled dicts with bytes keys and `data` as a uint8 numpy array N x 3072 (R, G, B planes)."""
    directory.mkdir(parents=True, exist_ok=True)
    batches = np.array_split(np.arange(len(train_labels)), len(CIFAR10_TRAIN_BATCHES))

    def batch(label: str, images: torch.Tensor, labels: list[int], offset: int) -> dict[bytes, Any]:
        return {
            b"batch_label": label.encode(),
            b"labels": [int(v) for v in labels],
            b"data": images.reshape(len(labels), 3072).numpy(),
            b"filenames": [f"{label_names[v].replace(' ', '_')}_s_{offset + i:06d}.png".encode()
                           for i, v in enumerate(labels)],
        }

    for number, (name, indices) in enumerate(zip(CIFAR10_TRAIN_BATCHES, batches), start=1):
        first = int(indices[0]) if len(indices) else 0
        chosen = train_images[first:first + len(indices)]
        _write_pickle(directory / name, batch(f"training batch {number} of {len(batches)}", chosen,
                                              train_labels[first:first + len(indices)], first))
    _write_pickle(directory / "test_batch", batch("testing batch 1 of 1", test_images, test_labels, 0))
    _write_pickle(directory / "batches.meta", {
        b"num_cases_per_batch": len(batches[0]),
        b"label_names": [name.encode() for name in label_names],
        b"num_vis": 3072,
    })


def _write_pickle(path: Path, obj: Any) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=4))


# ---------------------------------------------------------------- image folders


_IMAGES_OFFLINE = ("To run offline, copy the archive into data/sources/ and run "
                   "`dvc exp run -S data.source=data/sources/NAME`, or use generated data: "
                   "`dvc exp run -S data.source=synthetic`.")


class _Listing:
    """The image files of a source: relative posix path -> a function that reads its bytes; the folders seen
    (to find empty class folders); and how many files were ignored (hidden, system or not an image)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.files: dict[str, Callable[[], bytes]] = {}
        self.dirs: set[str] = set()
        self.ignored = 0

    @staticmethod
    def wanted(path: str) -> bool:
        parts = _parts(path)
        return bool(parts) and not _hidden(parts) and is_image_name(parts[-1]) and parts[-1].lower() not in _JUNK_FILES

    def add_file(self, path: str, reader: Callable[[], bytes]) -> None:
        if not self.wanted(path):
            self.ignored += 1
            return
        name = "/".join(_parts(path))
        if name in self.files:
            raise PipelineError(f"{self.label}: {name} appears twice in the archive")
        self.files[name] = reader

    def add_dir(self, path: str) -> None:
        parts = _parts(path)
        if parts and not _hidden(parts):
            self.dirs.add("/".join(parts))


def _parts(path: str) -> list[str]:
    return [part for part in path.replace("\\", "/").split("/") if part not in ("", ".")]


def _hidden(parts: list[str]) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _image_source(source: str, sha256: str | None, staging: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"kind": "images", "source": source}
    expected = sha256.lower() if sha256 else None
    downloaded = None
    if "://" in source:
        info["url"] = source
        name = posixpath.basename(urlparse(source).path) or "archive"
        target = DOWNLOAD_DIR / f"{hashlib.sha256(source.encode()).hexdigest()[:12]}-{name}"
        path = _fetch(source, target, ("sha256", expected) if expected else None, offline_hint=_IMAGES_OFFLINE)
        if path == target and not expected:
            downloaded = path  # nothing pins its content, so a later run must download it again
    else:
        path = _local_source(source)
    try:
        with contextlib.ExitStack() as stack:
            if path.is_dir():
                if expected:
                    raise PipelineError(f"data.sha256: {source} is a folder; data.sha256 verifies archive files "
                                        f"only (DVC tracks a folder's content itself). Set data.sha256: null")
                info["sha256"] = None
                listing = _list_folder(path, source)
            else:
                digest = file_digest(path)
                if expected and digest != expected:
                    raise PipelineError(f"{source}: SHA-256 {digest} does not match data.sha256 {expected}")
                info["sha256"] = digest
                listing = _list_archive(path, source, stack, sniff="://" in source)
            layout, members, classes = _layout(listing)
            with progress(len(members), "copy images") as bar:
                write_canonical_zip(staging / IMAGES_ZIP, members, bar.update)
    finally:
        if downloaded is not None:
            downloaded.unlink(missing_ok=True)
    splits = [name.split("/", 1)[0] for name in members]
    counts = {split: splits.count(split) for split in ("train", "test", "all") if split in splits}
    info.update({"layout": layout, "classes": classes, "images": counts, "ignored_files": listing.ignored,
                 "images_zip_sha256": file_digest(staging / IMAGES_ZIP)})
    return info


def _local_source(source: str) -> Path:
    path = Path(source)
    absolute, sources = Path(os.path.abspath(path)), Path(os.path.abspath(SOURCES_DIR))
    if sources not in absolute.parents:
        raise PipelineError(
            f"data.source: {source!r} is not cifar10, synthetic, an http(s)/file URL or a path inside "
            f"{SOURCES_DIR}/. Local image folders and archives must live in {SOURCES_DIR}/ (copy them there, or "
            f"link them: ln -s /path/to/{path.name} {SOURCES_DIR}/{path.name}), because dvc.yaml lists "
            f"{SOURCES_DIR} as the download stage's dependency: that is how DVC notices when their content "
            f"changes and reruns the pipeline")
    if not path.exists():
        raise PipelineError(f"data.source: {source} not found (expected a folder or a .zip, .tar, .tar.gz or "
                            f".tgz archive)")
    return path


def _list_folder(root: Path, label: str) -> _Listing:
    listing = _Listing(label)
    for current, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(name for name in dirnames if not _hidden([name]))
        relative = Path(current).relative_to(root).as_posix()
        relative = "" if relative == "." else relative
        if relative:
            listing.add_dir(relative)
        for filename in filenames:
            file_path = Path(current) / filename
            listing.add_file(posixpath.join(relative, filename), functools.partial(_read_file, file_path))
    return listing


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise PipelineError(f"{path}: cannot read file ({error.strerror or error})") from None


def _list_archive(path: Path, label: str, stack: contextlib.ExitStack, sniff: bool) -> _Listing:
    """List an archive without extracting it: a zip is read member by member later; a tar (often compressed,
    so without cheap random access) is read into memory in one pass. The type comes from the file name; for a
    URL whose name has no known extension (`sniff`), from the content."""
    lowered = path.name.lower()
    if lowered.endswith(".zip") or (sniff and zipfile.is_zipfile(path)):
        try:
            archive = stack.enter_context(zipfile.ZipFile(path))
        except (zipfile.BadZipFile, OSError) as error:
            raise PipelineError(f"{label}: not a readable zip archive ({error})") from None
        return _list_zip(archive, label)
    if lowered.endswith(_TAR_SUFFIXES) or (sniff and _is_tar(path)):
        return _list_tar(path, label)
    raise PipelineError(f"{label}: unsupported archive type ({path.name}): expected a folder or a .zip, .tar, "
                        f".tar.gz or .tgz archive")


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError):
        return False


def _list_zip(archive: zipfile.ZipFile, label: str) -> _Listing:
    listing = _Listing(label)
    for member in archive.infolist():
        name = check_member_name(member.filename, label)
        if _is_link_mode(member.external_attr >> 16):
            target = _read_zip_member(archive, member, label).decode("utf-8", "replace")
            check_link_target(name, target, label)
            listing.ignored += 1  # links inside the archive are not followed
        elif member.is_dir():
            listing.add_dir(name)
        else:
            listing.add_file(name, functools.partial(_read_zip_member, archive, member, label))
    return listing


def _is_link_mode(mode: int) -> bool:
    return (mode & 0o170000) == 0o120000


def _read_zip_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, label: str) -> bytes:
    try:
        return archive.read(member)
    except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, NotImplementedError, zlib.error) as error:
        raise PipelineError(f"{label}: cannot read member {member.filename!r} ({error})") from None


def _list_tar(path: Path, label: str) -> _Listing:
    listing = _Listing(label)
    try:
        with tarfile.open(path, "r:*") as archive:
            for name, member in checked_members(archive, label):
                if member.issym() or member.islnk():
                    listing.ignored += 1  # links inside the archive are not followed
                elif member.isdir():
                    listing.add_dir(name)
                elif member.isfile():
                    data = archive.extractfile(member).read() if listing.wanted(name) else b""
                    listing.add_file(name, functools.partial(bytes, data))
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as error:
        raise PipelineError(f"{label}: not a readable tar archive ({error})") from None
    return listing


def _layout(listing: _Listing) -> tuple[str, dict[str, Callable[[], bytes]], list[str]]:
    """Check the folder structure and map canonical member names (train|test|all/<class>/<path>) to readers.
    Returns (layout 'train/test' or 'flat', members, sorted class names)."""
    label = listing.label
    files = sorted(listing.files)
    dirs = set(listing.dirs) | {posixpath.dirname(name) for name in files} - {""}
    dirs |= {"/".join(d.split("/")[:i]) for d in list(dirs) for i in range(1, d.count("/") + 1)}
    if not files:
        raise PipelineError(f"{label}: no image files found ({', '.join(sorted(IMAGE_EXTENSIONS))}); expected "
                            f"{_EXPECTED_LAYOUT}{_found(dirs, listing)}")
    prefix = ""
    tops = {name.split("/")[0] for name in files} | {d.split("/")[0] for d in dirs}
    if len(tops) == 1:
        (top,) = tops
        # One folder holding folders is a wrapper (e.g. cifar10-jpeg/train/...); one holding only images is a
        # single class folder, reported as such below.
        if top.lower() not in ("train", "test") and any(name.count("/") >= 2 for name in files):
            prefix = top + "/"
    inner_files = [name[len(prefix):] for name in files]
    inner_dirs = {d[len(prefix):] for d in dirs if d.startswith(prefix) and d != prefix.rstrip("/")}
    for name in inner_files:
        if "/" not in name:
            raise PipelineError(f"{label}: {prefix}{name} is not inside a class folder; expected "
                                f"{_EXPECTED_LAYOUT}")
    tops = sorted({name.split("/")[0] for name in inner_files} | {d.split("/")[0] for d in inner_dirs})
    members: dict[str, Callable[[], bytes]] = {}
    if {top.lower() for top in tops} & {"train", "test"}:
        if sorted(top.lower() for top in tops) != ["test", "train"]:
            raise PipelineError(f"{label}: found top-level folders {', '.join(prefix + t + '/' for t in tops)}; "
                                f"expected {_EXPECTED_LAYOUT}")
        class_sets = {}
        for top in tops:
            split = top.lower()
            by_class = _classes(label, prefix + top + "/", [n[len(top) + 1:] for n in inner_files
                                                            if n.startswith(top + "/")],
                                {d[len(top) + 1:] for d in inner_dirs if d.startswith(top + "/")})
            class_sets[split] = sorted(by_class)
            for cls, names in by_class.items():
                for rest in names:
                    members[f"{split}/{cls}/{rest}"] = listing.files[f"{prefix}{top}/{cls}/{rest}"]
        if class_sets["train"] != class_sets["test"]:
            only_train = sorted(set(class_sets["train"]) - set(class_sets["test"]))
            only_test = sorted(set(class_sets["test"]) - set(class_sets["train"]))
            raise PipelineError(f"{label}: train and test have different class folders (only in train: "
                                f"{', '.join(only_train) or '-'}; only in test: {', '.join(only_test) or '-'}); "
                                f"both need the same classes")
        layout, classes = "train/test", class_sets["train"]
    else:
        by_class = _classes(label, prefix, inner_files, inner_dirs)
        for cls, names in by_class.items():
            for rest in names:
                members[f"all/{cls}/{rest}"] = listing.files[f"{prefix}{cls}/{rest}"]
        layout, classes = "flat", sorted(by_class)
    if len(classes) < 2:
        raise PipelineError(f"{label}: found {len(classes)} class folder ({', '.join(classes)}); at least 2 "
                            f"classes are needed; expected {_EXPECTED_LAYOUT}")
    return layout, members, classes


def _classes(label: str, where: str, names: list[str], dirs: set[str]) -> dict[str, list[str]]:
    """Group `names` (paths below `where`) by class folder; every class folder must hold an image."""
    by_class: dict[str, list[str]] = {}
    for name in names:
        if "/" not in name:
            raise PipelineError(f"{label}: {where}{name} is not inside a class folder; expected {_EXPECTED_LAYOUT}")
        cls, rest = name.split("/", 1)
        by_class.setdefault(cls, []).append(rest)
    empty = sorted({d.split("/")[0] for d in dirs} - set(by_class))
    if empty:
        raise PipelineError(f"{label}: class folder {where}{empty[0]}/ has no image files (expected "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))}, any case)")
    return dict(sorted(by_class.items()))


def _found(dirs: set[str], listing: _Listing) -> str:
    tops = sorted({d.split("/")[0] + "/" for d in dirs})
    found = f"; found folders: {', '.join(tops[:10])}" if tops else "; found no folders"
    return found + (f" and {listing.ignored} other files (not images, hidden or system files)"
                    if listing.ignored else "")


def write_canonical_zip(path: Path, members: dict[str, Callable[[], bytes]],
                        advance: Callable[[int], object] = lambda n: None) -> None:
    """One deterministic uncompressed zip: sorted names, fixed dates and attributes, so the same pictures always
    give the same bytes (and DVC sees no change when nothing changed). JPEG/PNG do not compress further."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3  # unix; the default depends on the OS that writes the file
            info.external_attr = 0o100644 << 16
            archive.writestr(info, members[name]())
            advance(1)


if __name__ == "__main__":
    run_stage(main)

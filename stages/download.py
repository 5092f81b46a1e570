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
  applies to archives only (a folder's content is tracked by DVC, since data/sources is a dependency). A URL
  source without data.sha256 is not tracked by DVC at all (a change at the URL does not rerun the pipeline): the
  stage warns so, and prints the archive's SHA-256 to pin it with. The limits of data.limits
  (stages/dataset/archives.py) bound what an archive may unpack to.

This module is the stage itself, with the official tarball's extraction and the synthetic generator;
stages/dataset/fetch.py downloads and verifies a URL, stages/dataset/cifar.py writes the CIFAR-10 format, and
stages/dataset/ingest.py turns an image folder or archive into images.zip.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import posixpath
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from stages.base.config import load_params
from stages.base.paths import CIFAR10_DIR, DOWNLOAD_DIR, IMAGES_ZIP, RAW_DIR, SOURCE_JSON, SOURCES_DIR
from stages.base.runtime import PipelineError, atomic_folder, derived_seed, file_digest, log, run_stage, write_json
from stages.dataset.archives import ArchiveLimits, checked_members, path_parts
from stages.dataset.cifar import CIFAR10_CLASSES, CIFAR10_FILES, write_cifar_batches
from stages.dataset.fetch import ByteLimit, fetch
from stages.dataset.ingest import ingest

CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # module attributes so tests can serve their own tarball
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_LIMIT = "data.limits.archive_gb"  # what raises the download cap (ArchiveLimits.max_total_bytes)
SYNTHETIC_VERSION = 1  # bump when the generator changes, so source.json tells old and new data apart


def download(params: dict[str, Any]) -> dict[str, Any]:
    """Build data/raw for data.source and return what source.json holds."""
    started = time.perf_counter()
    cfg = params["data"]
    source = cfg["source"]
    limits = ArchiveLimits.from_params(cfg)
    with atomic_folder(RAW_DIR) as staging:  # data/raw is the previous complete dataset or the new one
        if source == "cifar10":
            info = _cifar10(cfg["url"], staging, limits.max_total_bytes)
        elif source == "synthetic":
            info = _synthetic(cfg, staging)
        else:
            info = _image_source(source, cfg["sha256"], staging, limits)
        write_json(staging / SOURCE_JSON.name, info)
    log(f"download: {source} -> {RAW_DIR}/ in {time.perf_counter() - started:.1f} s")
    return info


# ---------------------------------------------------------------- cifar10


_CIFAR_OFFLINE = (
    "To run offline: `dvc exp run -S data.source=synthetic` (generated data in the CIFAR-10 format); "
    "or put an image folder or archive in data/sources/ and run `dvc exp run -S data.source=data/sources/NAME`; "
    "or point data.url at a mirror or a local copy: "
    "`dvc exp run -S data.url=file:///path/to/cifar-10-python.tar.gz`."
)


def _cifar10(url: str, staging: Path, max_bytes: int) -> dict[str, Any]:
    archive = fetch(url, DOWNLOAD_DIR / CIFAR10_ARCHIVE, ("md5", CIFAR10_MD5), offline_hint=_CIFAR_OFFLINE,
                    limit=ByteLimit(max_bytes, ARCHIVE_LIMIT))
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
                if path_parts(name)[:1] == [CIFAR10_DIR.name] and (member.isfile() or member.isdir()):
                    tar.extract(member, staging, **safe_filter)
    except tarfile.FilterError as error:
        raise PipelineError(f"{archive}: refused to extract member {error.tarinfo.name!r} ({error})") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as error:
        raise PipelineError(f"{archive}: cannot extract the CIFAR-10 archive ({error})") from None
    missing = [name for name in CIFAR10_FILES if not (staging / CIFAR10_DIR.name / name).is_file()]
    if missing:
        raise PipelineError(f"{archive}: not the CIFAR-10 python archive: {CIFAR10_DIR.name}/{missing[0]} is "
                            f"missing (expected {', '.join(CIFAR10_FILES)})")


# ---------------------------------------------------------------- synthetic


def _synthetic(cfg: dict[str, Any], staging: Path) -> dict[str, Any]:
    sizes, seed = cfg["synthetic"], cfg["seed"]
    train_images, train_labels = synthetic_images(sizes["train_size"], seed, "train")
    test_images, test_labels = synthetic_images(sizes["test_size"], seed, "test")
    write_cifar_batches(staging / CIFAR10_DIR.name, train_images, train_labels, test_images, test_labels)
    return {"kind": "synthetic", "source": "synthetic", "generator": SYNTHETIC_VERSION, "seed": seed,
            "train_size": sizes["train_size"], "test_size": sizes["test_size"], "classes": list(CIFAR10_CLASSES)}


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


# ---------------------------------------------------------------- image folders


_IMAGES_OFFLINE = ("To run offline, copy the archive into data/sources/ and run "
                   "`dvc exp run -S data.source=data/sources/NAME`, or use generated data: "
                   "`dvc exp run -S data.source=synthetic`.")


def _image_source(source: str, sha256: str | None, staging: Path, limits: ArchiveLimits) -> dict[str, Any]:
    """An image folder or archive, local or from a URL, copied into the canonical images.zip by ingest."""
    info: dict[str, Any] = {"kind": "images", "source": source}
    expected = sha256.lower() if sha256 else None
    downloaded = None
    if "://" in source:
        info["url"] = source
        name = posixpath.basename(urlparse(source).path) or "archive"
        target = DOWNLOAD_DIR / f"{hashlib.sha256(source.encode()).hexdigest()[:12]}-{name}"
        path = fetch(source, target, ("sha256", expected) if expected else None, offline_hint=_IMAGES_OFFLINE,
                     limit=ByteLimit(limits.max_total_bytes, ARCHIVE_LIMIT))
        if path == target and not expected:
            downloaded = path  # nothing pins its content, so a later run must download it again
    else:
        path = _local_source(source)
    try:
        info["sha256"] = _source_sha256(path, source, expected)
        if "://" in source and not expected and not _inside_sources(path):
            _warn_untracked(source, info["sha256"])
        info.update(ingest(path, source, staging / IMAGES_ZIP.name, sniff="://" in source, limits=limits))
    finally:
        if downloaded is not None:
            downloaded.unlink(missing_ok=True)
    return info


def _inside_sources(path: Path) -> bool:
    """Whether DVC tracks the file's content: dvc.yaml lists data/sources as the download stage's dependency."""
    return Path(os.path.abspath(SOURCES_DIR)) in Path(os.path.abspath(path)).parents


def _warn_untracked(url: str, digest: str) -> None:
    print(f"warning: {url}: data.sha256 is not set, so DVC does not track this archive: when it changes at that "
          f"URL, `dvc repro` will not rerun the pipeline. Pin the archive downloaded now with "
          f"`dvc exp run -S data.sha256={digest}` (or set data.sha256: {digest} in params.yaml)",
          file=sys.stderr, flush=True)


def _local_source(source: str) -> Path:
    path = Path(source)
    if not _inside_sources(path):
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


def _source_sha256(path: Path, source: str, expected: str | None) -> str | None:
    """The archive's SHA-256, checked against data.sha256 when that is set; None for a folder."""
    if path.is_dir():
        if expected:
            raise PipelineError(f"data.sha256: {source} is a folder; data.sha256 verifies archive files "
                                f"only (DVC tracks a folder's content itself). Set data.sha256: null")
        return None
    digest = file_digest(path)
    if expected and digest != expected:
        raise PipelineError(f"{source}: SHA-256 {digest} does not match data.sha256 {expected}")
    return digest


def main() -> None:
    download(load_params())


if __name__ == "__main__":
    run_stage(main)

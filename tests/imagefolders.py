"""Test data the tests make themselves: image files of every supported kind, image-folder trees, their archives
(zip, tar, tar.gz, also with malicious members) and tarballs in the CIFAR-10 python format.

Every image of class number k is filled with `class_color(k)` (plus a little seeded noise for JPEGs so they are
not trivially compressible), so tests can tell classes apart by their pixels."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from stages import download
from stages.base import paths
from stages.base.config import set_dotted
from stages.dataset import cifar

from repo_root import REPO_ROOT

PALETTE = [(230, 40, 40), (40, 200, 60), (50, 70, 220), (240, 220, 40), (200, 60, 200), (40, 210, 210)]


def class_color(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


# ---------------------------------------------------------------- single images


def image_bytes(image: Image.Image, fmt: str, **save_args: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def solid_image(color: tuple[int, int, int], size: tuple[int, int] = (12, 10), seed: int = 0,
                noise: int = 0) -> Image.Image:
    """An RGB image of (width, height) = size in one colour, optionally with seeded noise of +-noise."""
    pixels = np.empty((size[1], size[0], 3), dtype=np.int16)
    pixels[:] = color
    if noise:
        pixels += np.random.default_rng(seed).integers(-noise, noise + 1, pixels.shape, dtype=np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def quadrants_image(width: int = 64, height: int = 32) -> Image.Image:
    """Four coloured quadrants (red, green / blue, yellow): any rotation or mirroring moves them recognisably."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    half_h, half_w = height // 2, width // 2
    pixels[:half_h, :half_w] = (255, 0, 0)
    pixels[:half_h, half_w:] = (0, 255, 0)
    pixels[half_h:, :half_w] = (0, 0, 255)
    pixels[half_h:, half_w:] = (255, 255, 0)
    return Image.fromarray(pixels, "RGB")


def with_exif_orientation(image: Image.Image, orientation: int, fmt: str = "JPEG", **save_args: Any) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes(image, fmt, exif=exif.tobytes(), **save_args)


# ---------------------------------------------------------------- folders and archives


def make_image_folder(root: Path, layout: dict[str, Any], size: tuple[int, int] = (12, 10),
                      fmt: str = "PNG") -> list[Path]:
    """Create image files under `root`. `layout` maps folder names to either a nested layout dict or, for a class
    folder, the number of images in it; the class colour is taken from the class folder's position among its
    siblings in sorted order. Returns the files written."""
    written: list[Path] = []
    root.mkdir(parents=True, exist_ok=True)
    for name, content in layout.items():
        if isinstance(content, dict):
            written += make_image_folder(root / name, content, size, fmt)
            continue
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        index = sorted(key for key, value in layout.items() if not isinstance(value, dict)).index(name)
        extension = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "GIF": "gif", "WEBP": "webp", "TIFF": "tif"}[fmt]
        for number in range(content):
            image = solid_image(class_color(index), size, seed=number, noise=3 if fmt == "JPEG" else 0)
            path = folder / f"{number:04d}.{extension}"
            path.write_bytes(image_bytes(image, fmt))
            written.append(path)
    return written


def zip_folder(folder: Path, archive: Path, prefix: str = "", extra: dict[str, bytes] | None = None) -> Path:
    """Zip every file under `folder` (names relative to it, under `prefix`), plus `extra` {name: bytes}."""
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(folder.rglob("*")):
            name = prefix + path.relative_to(folder).as_posix()
            if path.is_dir():
                handle.writestr(name + "/", b"")
            else:
                handle.write(path, name)
        for name, data in (extra or {}).items():
            handle.writestr(name, data)
    return archive


def tar_folder(folder: Path, archive: Path, prefix: str = "", compression: str = "gz") -> Path:
    with tarfile.open(archive, f"w:{compression}" if compression else "w") as handle:
        for path in sorted(folder.rglob("*")):
            handle.add(path, prefix + path.relative_to(folder).as_posix(), recursive=False)
    return archive


def add_tar_member(archive: Path, name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE,
                   linkname: str = "", compression: str = "gz") -> Path:
    """A tar archive holding the members of `archive` (if it exists) plus one crafted member: a file, a symlink
    (kind=tarfile.SYMTYPE) or a hardlink (tarfile.LNKTYPE) named `name`."""
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    if archive.exists():
        with tarfile.open(archive, "r:*") as handle:
            for member in handle:
                members.append((member, handle.extractfile(member).read() if member.isfile() else None))
    crafted = tarfile.TarInfo(name)
    crafted.type = kind
    crafted.linkname = linkname
    crafted.size = len(data) if kind == tarfile.REGTYPE else 0
    members.append((crafted, data if kind == tarfile.REGTYPE else None))
    with tarfile.open(archive, f"w:{compression}" if compression else "w") as handle:
        for member, content in members:
            handle.addfile(member, io.BytesIO(content) if content is not None else None)
    return archive


def zip_of(archive: Path, members: dict[str, bytes]) -> Path:
    """A deflated zip archive of in-memory files {name: bytes}."""
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        for name, data in members.items():
            handle.writestr(name, data)
    return archive


def tar_of(archive: Path, members: dict[str, bytes], compression: str = "gz", **tar_args: Any) -> Path:
    """A tar archive of in-memory files {name: bytes}; `tar_args` go to tarfile.open (e.g. format=tarfile.GNU_FORMAT,
    encoding="latin-1" for a tar made on a latin-1 system)."""
    with tarfile.open(archive, f"w:{compression}" if compression else "w", **tar_args) as handle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            handle.addfile(info, io.BytesIO(data))
    return archive


def zip_declaring_size(archive: Path, name: str, declared: int) -> Path:
    """Rewrite the uncompressed size that zip `archive` declares for member `name` (in its local header and its
    central directory entry), as a hostile archive would, to test that readers do not trust it."""
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as handle:
        local = handle.getinfo(name).header_offset
    central = raw.find(b"PK\x01\x02")
    while raw[central + 46:central + 46 + len(name.encode())] != name.encode():
        central = raw.find(b"PK\x01\x02", central + 1)
        assert central >= 0, f"{name} is not in {archive}"
    for size_field in (local + 22, central + 24):
        raw[size_field:size_field + 4] = declared.to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    return archive


def zip_symlink(archive: Path, name: str, target: str) -> Path:
    """Append a unix symlink member `name` -> `target` to a zip archive."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = 0o120777 << 16
    with zipfile.ZipFile(archive, "a") as handle:
        handle.writestr(info, target)
    return archive


# ---------------------------------------------------------------- CIFAR-10 format


def make_cifar_tarball(path: Path, n_train: int = 50, n_test: int = 20, seed: int = 0,
                       extra: dict[str, bytes] | None = None) -> str:
    """Write a cifar-10-python.tar.gz look-alike (synthetic images in the real format); return its MD5.
    `extra` adds members {name: bytes} after the real ones."""
    train_images, train_labels = download.synthetic_images(n_train, seed, "train")
    test_images, test_labels = download.synthetic_images(n_test, seed, "test")
    staging = path.parent / f".{path.name}.batches"
    folder = paths.CIFAR10_DIR.name  # the top folder of the official tarball
    cifar.write_cifar_batches(staging / folder, train_images, train_labels, test_images, test_labels)
    with tarfile.open(path, "w:gz") as handle:
        handle.add(staging / folder, folder)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            handle.addfile(info, io.BytesIO(data))
    for file in (staging / folder).iterdir():
        file.unlink()
    (staging / folder).rmdir()
    staging.rmdir()
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- params


def write_params(directory: Path, **data: Any) -> dict[str, Any]:
    """Copy the repository's params.yaml into `directory` with keys of its `data` section replaced (dotted names
    for nested keys, e.g. **{"synthetic.train_size": 40}); return the whole params dict."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    for key, value in data.items():
        set_dotted(params, f"data.{key}", value)
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return params

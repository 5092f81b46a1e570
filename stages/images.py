"""Image decoding shared by normalize (image-folder datasets) and predict: any supported image file -> a uint8
tensor 3 x S x S. Training data and predictions go through these same rules, so a picture gives the same pixels
in both.

Decode rules
------------
- Formats: JPEG, PNG, BMP, GIF, WebP, TIFF (`IMAGE_EXTENSIONS`, any case). The format is taken from the file's
  content, not from its extension; the extension only decides which files of a folder are images.
- JPEG files are decoded by libjpeg-turbo through `torchvision.io.decode_jpeg` (batched, on all cores); a JPEG it
  rejects, and every other format, goes through Pillow. Both give the same pixels (same library underneath).
- EXIF orientation is applied (the picture is turned the way a viewer shows it).
- Animated images (GIF, WebP, multi-page TIFF): the first frame.
- Conversion to RGB:
  - `1`, `L`, `RGB`, `CMYK`, `YCbCr`: Pillow's own conversion (grey is repeated in the three channels).
  - 16-bit and 32-bit integer grey (`I;16*`, `I`): values 0..65535 are scaled to 0..255 (round(v * 255 / 65535));
    float grey (`F`) is clipped to 0..255.
  - Transparency (`RGBA`, `LA`, `PA`, palette or grey images with a transparent colour): composited onto WHITE,
    the way a viewer shows the picture on a page; the colour hidden under fully transparent pixels is often
    arbitrary, so dropping alpha would leak it.
  - Palette (`P`): expanded to RGB (or RGBA first when it has transparency).
- Size: an image that is not already S x S is resized so that its SHORTER side is S (bilinear with antialiasing,
  torchvision on uint8 tensors), then the centre S x S is cropped (when the excess is odd, the extra row or column
  is dropped from the bottom/right). The aspect ratio is kept; nothing is padded.
- Determinism: the same bytes give the same tensor on the same machine and library versions. (torchvision's
  uint8 resize kernels are vectorised per CPU type, so another CPU family may differ by 1 in a few pixels.)
"""

from __future__ import annotations

import io
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from stages.common import PipelineError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
ON_ERROR = ("raise", "skip")

_JPEG_MAGIC = b"\xff\xd8\xff"
_CHUNK = 256  # images per task: big enough for batched decode_jpeg, small enough to balance two threads
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageDecodeError(PipelineError):
    """An image file that cannot be decoded; the message names the file."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: cannot read image ({reason})")
        self.name = name
        self.reason = reason


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def progress(total: int, desc: str, unit: str = "img", **kwargs: object) -> tqdm:
    """A tqdm bar on stderr; in CI logs (no terminal) it updates at most every 30 s instead of flooding them."""
    return tqdm(total=total, desc=desc, unit=unit, mininterval=0.5 if sys.stderr.isatty() else 30,
                dynamic_ncols=True, **kwargs)


def decode_workers() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------- resize


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N x) 3 x H x W -> (N x) 3 x size x size: shorter side to `size` (bilinear, antialias), centre crop."""
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        images = F.resize(images, [new_h, new_w], interpolation=InterpolationMode.BILINEAR, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return images[..., top:top + size, left:left + size].contiguous()


# ---------------------------------------------------------------- decoding one image


def _clean_reason(error: BaseException) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not a recognised image format"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # Pillow puts object addresses in some messages; they would make the skipped-files list non-deterministic.
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", text)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        scaled = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        return image.convert("L").convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _decode_pil(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # first frame of animated files
        image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def _decode_any(data: bytes) -> torch.Tensor | str:
    """3 x H x W uint8 tensor, or the reason it failed. Never raises: one bad file must not stop a batch."""
    if not data:
        return "empty file"
    if data[:3] == _JPEG_MAGIC:
        try:
            return decode_jpeg(_as_tensor(data), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError:
            pass  # Pillow gets a second chance and gives the reason if it fails too
    try:
        return _decode_pil(data)
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... by file type
        return _clean_reason(error)


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a writable copy: torch warns on bytes


def decode_image(data: bytes, size: int, name: str) -> torch.Tensor:
    """One image file's bytes -> uint8 3 x size x size by the module's rules; ImageDecodeError names `name`."""
    decoded = _decode_any(data)
    if isinstance(decoded, str):
        raise ImageDecodeError(name, decoded)
    return resize_square(decoded, size)


def read_image_file(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: image file not found")
    try:
        return path.read_bytes()
    except OSError as error:
        raise PipelineError(f"{path}: cannot read file ({error.strerror or error})") from None


def load_image(path: str | Path, size: int) -> torch.Tensor:
    return decode_image(read_image_file(path), size, str(path))


# ---------------------------------------------------------------- decoding many images


def _decode_chunk(blobs: Sequence[bytes], size: int, out: torch.Tensor) -> dict[int, str]:
    """Decode blobs into out[0..len-1] (a slice of the caller's tensor); return {position: reason} of failures."""
    results: list[torch.Tensor | str | None] = [None] * len(blobs)
    jpegs = [j for j, data in enumerate(blobs) if data[:3] == _JPEG_MAGIC]
    if jpegs:
        try:  # the batched call is several times faster than one call per file, but fails as a whole
            decoded = decode_jpeg([_as_tensor(blobs[j]) for j in jpegs], mode=ImageReadMode.RGB,
                                  apply_exif_orientation=True)
            for j, image in zip(jpegs, decoded):
                results[j] = image
        except RuntimeError:
            pass  # decoded one by one below
    for j, data in enumerate(blobs):
        if results[j] is None:
            results[j] = _decode_any(data)
    # Images of one shape are resized together (the common case: a whole folder of one camera or size).
    by_shape: dict[tuple[int, int], list[int]] = {}
    failures: dict[int, str] = {}
    for j, result in enumerate(results):
        if isinstance(result, str):
            failures[j] = result
        else:
            by_shape.setdefault(tuple(result.shape[-2:]), []).append(j)
    for positions in by_shape.values():
        batch = torch.stack([results[j] for j in positions])
        out[positions] = resize_square(batch, size)
    return failures


def decode_images(blobs: Sequence[bytes], names: Sequence[str], size: int, on_error: str = "raise",
                  desc: str = "decode") -> tuple[torch.Tensor, list[int], list[dict[str, str]]]:
    """Decode many image files on all cores.

    Returns (images uint8 K x 3 x size x size, kept: the K input positions decoded, skipped: [{"file", "reason"}]).
    on_error 'raise' stops at the first unreadable file (in input order) with an ImageDecodeError naming it;
    'skip' leaves it out and records it."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
    if len(blobs) != len(names):
        raise ValueError("blobs and names differ in length")
    total = len(blobs)
    out = torch.empty((total, 3, size, size), dtype=torch.uint8)
    starts = range(0, total, _CHUNK)
    failures: dict[int, str] = {}
    # decode_jpeg and Pillow release the GIL while decoding, so threads use all cores without pickling costs.
    pool = ThreadPoolExecutor(max_workers=decode_workers())
    try:
        tasks = [pool.submit(_decode_chunk, blobs[s:s + _CHUNK], size, out[s:s + _CHUNK]) for s in starts]
        with progress(total, desc) as bar:
            for start, task in zip(starts, tasks):
                chunk_failures = {start + j: reason for j, reason in task.result().items()}
                if chunk_failures and on_error == "raise":
                    first = min(chunk_failures)
                    raise ImageDecodeError(names[first], chunk_failures[first])
                failures.update(chunk_failures)
                bar.update(min(_CHUNK, total - start))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    kept = [i for i in range(total) if i not in failures]
    skipped = [{"file": names[i], "reason": failures[i]} for i in sorted(failures)]
    if failures:
        out = out[kept].contiguous()
    return out, kept, skipped

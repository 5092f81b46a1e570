"""Image decoding shared by normalize (image-folder datasets) and predict: any supported image file -> a uint8
tensor 3 x S x S. Training data and predictions go through these same rules, so a picture gives the same pixels
in both.

Decode rules
------------
- Formats: JPEG, PNG, BMP, GIF, WebP, TIFF (`IMAGE_EXTENSIONS`, any case) and nothing else. The format is taken
  from the file's content, not from its extension (the extension only decides which files of a folder are
  images), and only these decoders are ever asked: a PostScript file named `.jpg` is refused, never handed to
  Pillow's EPS plugin (which would run Ghostscript).
- Limits (`DecodeLimits`, params `data.limits.image_megapixels` and `data.limits.image_mb`): an image file over
  the byte limit, or whose header declares more pixels than the pixel limit, is refused before anything is
  decoded, for every format alike (JPEGs included, which Pillow's own bomb check does not cover when torchvision
  decodes them).
- JPEG files are decoded by libjpeg-turbo through `torchvision.io.decode_jpeg` (batched, on all cores); a JPEG it
  rejects, and every other format, goes through Pillow. Both give the same pixels (same library underneath).
  A JPEG at least twice the target size both ways (a phone photo for a 32 px data set) is decoded by Pillow at a
  reduced DCT scale (1/2, 1/4 or 1/8, the smallest that stays at least S x S), so a 12 MP photo never exists at
  full size in memory.
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
- Size: the centre square of an image (side = its shorter side; when the excess is odd, the extra row or column
  is dropped from the bottom/right) is cropped first, then resized to S x S (bilinear with antialiasing,
  torchvision on uint8 tensors). The aspect ratio is kept; nothing is padded. Cropping first means a thin strip
  (100000 x 1) costs a 1 x 1 square, not a 3.2 million pixel wide intermediate.
- Memory: images are decoded in chunks and each is resized as soon as it is decoded; what one chunk holds at full
  size is bounded by `_CHUNK_PIXELS`, whatever the files are.
- Determinism: the same bytes give the same tensor on the same machine and library versions. (torchvision's
  uint8 resize kernels are vectorised per CPU type, so another CPU family may differ by 1 in a few pixels.)
"""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from stages.base.runtime import PipelineError, decode_workers, progress
from stages.dataset.imagefiles import (IMAGE_EXTENSIONS, MAX_BYTES, MAX_PIXELS, NOT_AN_IMAGE,  # noqa: F401
                                       PILLOW_FORMATS, is_image_name, over_byte_limit, to_rgb)

ON_ERROR = ("raise", "skip")

_JPEG_MAGIC = b"\xff\xd8\xff"
_CHUNK = 256  # images per task: big enough for batched decode_jpeg, small enough to balance two threads
_CHUNK_PIXELS = 16_000_000  # full-size pixels one task holds at once (48 MB as RGB): decode_jpeg batches stop there
# Start-of-frame markers of every JPEG coding process (C4 = Huffman tables, C8 = reserved, CC = arithmetic tables)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ImageDecodeError(PipelineError):
    """An image file that cannot be decoded; the message names the file."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: cannot read image ({reason})")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class DecodeLimits:
    """What one image may cost, checked on its file size and header before anything is decoded. The defaults
    accept any ordinary photo (a 12 MP phone picture is 12 megapixels and a few MB) and refuse decompression
    bombs: a 65500 x 65500 JPEG of a few MB would decode to 12.9 GB."""
    max_pixels: int = MAX_PIXELS
    max_bytes: int = MAX_BYTES

    @classmethod
    def from_params(cls, data: dict) -> DecodeLimits:
        """From params.yaml's data.limits (image_megapixels, image_mb)."""
        limits = data["limits"]
        return cls(max_pixels=round(limits["image_megapixels"] * 1_000_000),
                   max_bytes=round(limits["image_mb"] * 2**20))


# ---------------------------------------------------------------- resize


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N x) 3 x H x W -> (N x) 3 x size x size: the centre square, then resized (bilinear, antialias)."""
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = images[..., top:top + side, left:left + side]
    if side == size:
        return square.contiguous()
    return F.resize(square, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)


# ---------------------------------------------------------------- decoding one image


def _clean_reason(error: BaseException) -> str:
    if isinstance(error, UnidentifiedImageError):
        return NOT_AN_IMAGE
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # Pillow puts object addresses in some messages; they would make the skipped-files list non-deterministic.
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", text)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame header, or None if the marker walk finds none. Reading it
    ourselves costs microseconds, against the decoder's milliseconds, so every JPEG is checked before decoding."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        elif marker in _JPEG_SOF:
            if pos + 9 > len(data):
                return None
            return int.from_bytes(data[pos + 7:pos + 9], "big"), int.from_bytes(data[pos + 5:pos + 7], "big")
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def _header_size(data: bytes) -> tuple[int, int]:
    """(width, height) as the file declares it, read without decoding; raises what Pillow raises."""
    if data[:3] == _JPEG_MAGIC and (size := _jpeg_size(data)) is not None:
        return size
    with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as image:
        return image.size


def _check(data: bytes, limits: DecodeLimits) -> tuple[int, int] | str:
    """The declared (width, height), or why the file may not be decoded."""
    if not data:
        return "empty file"
    if len(data) > limits.max_bytes:
        return over_byte_limit(len(data), limits.max_bytes)
    try:
        width, height = _header_size(data)
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... by file type
        return _clean_reason(error)
    if width * height > limits.max_pixels:
        return (f"{width}x{height} pixels, over the limit of {limits.max_pixels / 1e6:g} megapixels per image "
                f"(data.limits.image_megapixels)")
    return width, height


def _reducible(width: int, height: int, size: int) -> bool:
    """Whether libjpeg can decode this JPEG at 1/2 scale or less and still give at least size x size."""
    return min(width, height) >= 2 * size


def _decode_pil(data: bytes, draft_size: int | None = None) -> torch.Tensor:
    """Decode with Pillow; `draft_size` lets a JPEG decode at the smallest DCT scale that stays >= that size."""
    with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as image:
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()  # first frame of animated files
        image = ImageOps.exif_transpose(image)
        rgb = to_rgb(image)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def _decode_any(data: bytes, size: int, limits: DecodeLimits) -> torch.Tensor | str:
    """3 x H x W uint8 tensor, or the reason it failed. Never raises: one bad file must not stop a batch."""
    checked = _check(data, limits)
    if isinstance(checked, str):
        return checked
    if data[:3] == _JPEG_MAGIC and not _reducible(*checked, size):
        try:
            return decode_jpeg(_as_tensor(data), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError:
            pass  # Pillow gets a second chance and gives the reason if it fails too
    try:
        return _decode_pil(data, draft_size=size)
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... by file type
        return _clean_reason(error)


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a writable copy: torch warns on bytes


def decode_image(data: bytes, size: int, name: str, limits: DecodeLimits = DecodeLimits()) -> torch.Tensor:
    """One image file's bytes -> uint8 3 x size x size by the module's rules; ImageDecodeError names `name`."""
    decoded = _decode_any(data, size, limits)
    if isinstance(decoded, str):
        raise ImageDecodeError(name, decoded)
    return resize_square(decoded, size)


def read_image_file(path: str | Path, limits: DecodeLimits = DecodeLimits()) -> bytes:
    """A regular file's bytes, refused before reading when it is over the byte limit (a FIFO or a device would
    block or never end)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: image file not found" if not path.exists() else f"{path}: not a regular file")
    try:
        if path.stat().st_size > limits.max_bytes:
            raise ImageDecodeError(str(path), over_byte_limit(path.stat().st_size, limits.max_bytes))
        return path.read_bytes()
    except OSError as error:
        raise PipelineError(f"{path}: cannot read file ({error.strerror or error})") from None


def load_image(path: str | Path, size: int, limits: DecodeLimits = DecodeLimits()) -> torch.Tensor:
    return decode_image(read_image_file(path, limits), size, str(path), limits)


# ---------------------------------------------------------------- decoding many images


def _small_jpeg_batches(blobs: Sequence[bytes], checked: list[tuple[int, int] | str],
                        size: int) -> list[list[int]]:
    """Positions of the JPEGs that decode at full size, grouped so that one batch holds <= _CHUNK_PIXELS."""
    batches: list[list[int]] = [[]]
    pixels = 0
    for j, data in enumerate(blobs):
        dims = checked[j]
        if isinstance(dims, str) or data[:3] != _JPEG_MAGIC or _reducible(*dims, size):
            continue
        if batches[-1] and pixels + dims[0] * dims[1] > _CHUNK_PIXELS:
            batches.append([])
            pixels = 0
        batches[-1].append(j)
        pixels += dims[0] * dims[1]
    return [batch for batch in batches if batch]


def _decode_chunk(blobs: Sequence[bytes], size: int, out: torch.Tensor, limits: DecodeLimits) -> dict[int, str]:
    """Decode blobs into out[0..len-1] (a slice of the caller's tensor); return {position: reason} of failures.
    Each image is resized as soon as it is decoded, so the chunk never holds more than one batch at full size."""
    checked = [_check(data, limits) for data in blobs]
    done = [False] * len(blobs)
    for batch in _small_jpeg_batches(blobs, checked, size):
        try:  # the batched call is several times faster than one call per file, but fails as a whole
            decoded = decode_jpeg([_as_tensor(blobs[j]) for j in batch], mode=ImageReadMode.RGB,
                                  apply_exif_orientation=True)
        except RuntimeError:
            continue  # decoded one by one below
        for j, image in zip(batch, decoded):
            out[j] = resize_square(image, size)
            done[j] = True
    failures: dict[int, str] = {}
    for j, data in enumerate(blobs):
        if done[j]:
            continue
        result = checked[j] if isinstance(checked[j], str) else _decode_any(data, size, limits)
        if isinstance(result, str):
            failures[j] = result
        else:
            out[j] = resize_square(result, size)
    return failures


def decode_images(blobs: Sequence[bytes], names: Sequence[str], size: int, on_error: str = "raise",
                  desc: str = "decode", limits: DecodeLimits = DecodeLimits()
                  ) -> tuple[torch.Tensor, list[int], list[dict[str, str]]]:
    """Decode many image files on all cores.

    `blobs` may be any sequence (a lazy one reads each file when its chunk is decoded, so the encoded files need
    not all be in memory). Returns (images uint8 K x 3 x size x size, kept: the K input positions decoded,
    skipped: [{"file", "reason"}]). on_error 'raise' stops at the first unreadable file (in input order) with an
    ImageDecodeError naming it; 'skip' leaves it out and records it."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
    if len(blobs) != len(names):
        raise ValueError("blobs and names differ in length")
    total = len(blobs)
    out = torch.empty((total, 3, size, size), dtype=torch.uint8)
    starts = range(0, total, _CHUNK)
    failures: dict[int, str] = {}

    def chunk(start: int) -> dict[int, str]:
        stop = min(start + _CHUNK, total)
        return _decode_chunk([blobs[i] for i in range(start, stop)], size, out[start:stop], limits)

    # decode_jpeg and Pillow release the GIL while decoding, so threads use all cores without pickling costs.
    pool = ThreadPoolExecutor(max_workers=decode_workers())
    try:
        tasks = [pool.submit(chunk, start) for start in starts]
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

"""What an image file is, and how Pillow turns one into RGB: the rules that stages.dataset.images (training data
and predict on torch) and stages.model.deploy (predict on ONNX Runtime, without torch) share. Pillow and numpy only.

- IMAGE_EXTENSIONS decides which files of a folder are images; the format itself is taken from the content, and
  only PILLOW_FORMATS' decoders are ever asked (EPS would run Ghostscript; dozens of other plugins are rarely used).
- MAX_PIXELS / MAX_BYTES are the default limits (params.yaml's data.limits.image_megapixels and image_mb);
  over_byte_limit words a refusal by the byte limit the same way wherever a file is refused.
- to_rgb: 16-bit grey scaled to 8 bits, float grey clipped, transparency composited onto white, the rest by
  Pillow's own conversion."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
PILLOW_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
NOT_AN_IMAGE = "not a JPEG, PNG, BMP, GIF, WebP or TIFF image"
MAX_PIXELS = 90_000_000  # width x height; Pillow's own default limit is 89.5 million
MAX_BYTES = 100 * 2**20
# Our own pixel limit is checked on every header, for every format; Pillow's global one would refuse images above
# twice its default even where a user raised ours, and it does not see the JPEGs that torchvision decodes.
Image.MAX_IMAGE_PIXELS = None

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def byte_limit(max_bytes: int) -> str:
    """The per-file byte limit as every refusal names it, with the param that raises it."""
    return f"the limit of {max_bytes / 2**20:g} MB per image file (data.limits.image_mb)"


def over_byte_limit(size: int, max_bytes: int) -> str:
    """Why a file of `size` bytes is refused. The exact count, not a rounded size: the reason lands in
    meta.json's skipped files, where a rounded size would hide by how much the file is over."""
    return f"{size:,} bytes, over {byte_limit(max_bytes)}"


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as RGB; the colour under fully transparent pixels is often arbitrary, so transparency is
    composited onto white (as a viewer shows the picture on a page) rather than dropped."""
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

"""The deployment runtime: classify images with a model.onnx that the export stage wrote, on ONNX Runtime. It
imports numpy, Pillow and onnxruntime only (never torch, nor a stages module that imports it), so a server needs
those three packages and this package's folder: `python -m stages.predict models/model.onnx photo.jpg` runs
through here (tests/test_export.py runs it with torch made unimportable).

- Images are decoded by the rules of stages/dataset/images.py (the formats it reads, by content; its default
  limits; the first frame; EXIF rotation; its RGB conversion, transparency onto white; the centre square), with
  Pillow only; the formats, limits and RGB conversion are the same code (stages/dataset/imagefiles.py).
  The one difference is the resize of that square: Pillow's bilinear filter (antialiased when shrinking) instead
  of torchvision's, the same algorithm with other rounding: a resized image may differ by 1 (of 255) in a few
  percent of its pixel values; one that needs no resize, or is enlarged, comes out identical. (tests/test_export.py
  checks both against stages/dataset/images.py.)
- OnnxClassifier checks a model before running it: the export stage's metadata (format, class names, image size),
  one uint8 input [batch, 3, S, S] and one float output [batch, classes]. A .onnx from elsewhere is refused with
  one message that says what it has and what is expected.
- Every refusal is a PipelineError of the torch-free stages/base/runtime.py, which run_stage prints as one line
  `error: ...` (exit status 2), as for any stage.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.base.runtime import PipelineError, first_line
from stages.base.specs import IMAGE_SIZES
from stages.dataset.imagefiles import (IMAGE_EXTENSIONS, MAX_BYTES, MAX_PIXELS, NOT_AN_IMAGE,  # noqa: F401
                                       PILLOW_FORMATS, is_image_name, over_byte_limit, to_rgb)

ONNX_FORMAT = "cifar-pipeline/onnx/1"  # metadata "format" of the export stage's model.onnx
INPUT_NAME, OUTPUT_NAME = "images", "logits"


# ---------------------------------------------------------------- images (the rules of stages/dataset/images.py)


def read_image_file(path: str | Path) -> bytes:
    """A regular file's bytes, refused before reading when it is over the byte limit."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: image file not found" if not path.exists() else f"{path}: not a regular file")
    try:
        if path.stat().st_size > MAX_BYTES:
            raise PipelineError(f"{path}: cannot read image ({over_byte_limit(path.stat().st_size, MAX_BYTES)})")
        return path.read_bytes()
    except OSError as error:
        raise PipelineError(f"{path}: cannot read file ({error.strerror or error})") from None


class _Refused(Exception):
    """An image refused by a limit (the reason is the message)."""


def _decode_rgb(data: bytes, size: int) -> Image.Image:
    """The picture as RGB, turned by its EXIF orientation; the limits are checked on the header first."""
    if not data:
        raise _Refused("empty file")
    if len(data) > MAX_BYTES:
        raise _Refused(over_byte_limit(len(data), MAX_BYTES))
    with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as image:
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise _Refused(f"{width}x{height} pixels, over the limit of {MAX_PIXELS / 1e6:g} megapixels per image "
                           "(data.limits.image_megapixels)")
        if image.format == "JPEG" and min(width, height) >= 2 * size:
            image.draft("RGB", (size, size))  # libjpeg's reduced DCT scale, as stages/dataset/images.py does
        image.load()  # the first frame of an animated file
        return to_rgb(ImageOps.exif_transpose(image))


def _square(rgb: Image.Image, size: int) -> np.ndarray:
    """The centre square (an odd excess is dropped at the bottom/right), resized to size x size: uint8 3 x S x S."""
    width, height = rgb.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = rgb.crop((left, top, left + side, top + side)) if (width, height) != (side, side) else rgb
    if side != size:
        square = square.resize((size, size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(square, dtype=np.uint8).transpose(2, 0, 1))


def decode_image(data: bytes, size: int, name: str) -> np.ndarray:
    """One image file's bytes -> uint8 3 x size x size; PipelineError `<name>: cannot read image (<reason>)`."""
    try:
        return _square(_decode_rgb(data, size), size)
    except _Refused as refused:
        reason = str(refused)
    except UnidentifiedImageError:
        reason = NOT_AN_IMAGE
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... by file type
        reason = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", first_line(error))  # no object addresses
    raise PipelineError(f"{name}: cannot read image ({reason})")


def load_image(path: str | Path, size: int) -> np.ndarray:
    return decode_image(read_image_file(path), size, str(path))


# ---------------------------------------------------------------- the model


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise PipelineError("onnxruntime is not installed: pip install onnxruntime (or the project's extra: "
                            "pip install -e '.[export]')") from None
    onnxruntime.set_default_logger_severity(4)  # the process-wide log too (model loading logs there): fatal only
    return onnxruntime


def _describe(argument: Any) -> str:
    """An ONNX Runtime input or output as `uint8 [batch, 3, 32, 32]`."""
    kind = str(argument.type).removeprefix("tensor(").removesuffix(")")
    dims = ", ".join("?" if dim is None else str(dim) for dim in (argument.shape or []))
    return f"{kind} [{dims}]"


class OnnxClassifier:
    """A model.onnx of the export stage on ONNX Runtime (CPU), checked when loaded; `logits` runs it.
    `threads`: ONNX Runtime's intra-op threads (0: its default, one per physical core)."""

    def __init__(self, model: str | Path | bytes, name: str, threads: int = 0) -> None:
        ort = _onnxruntime()
        self.name = name
        if not isinstance(model, bytes) and not Path(model).is_file():
            raise PipelineError(f"{name}: ONNX model not found")
        options = ort.SessionOptions()
        # ONNX Runtime would print its own coloured `[E:onnxruntime:...]` line before our one-line refusal: its
        # error comes back as the exception, which the refusal names, so its log says only fatal conditions
        options.log_severity_level = 4
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as error:  # ONNX Runtime raises its own classes (InvalidProtobuf, Fail, ...) by case
            raise PipelineError(f"{name}: cannot load the ONNX model ({first_line(error)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        metadata = self.session.get_modelmeta().custom_metadata_map
        if metadata.get("format") != ONNX_FORMAT:
            found = ", ".join(f"{i.name!r} {_describe(i)}" for i in inputs) or "none"
            raise PipelineError(f"{name}: not an ONNX model exported by this pipeline: its metadata has no format "
                                f"{ONNX_FORMAT!r} (the export stage writes the class names and image size there); "
                                f"its inputs: {found}; the export stage writes one, uint8 [batch, 3, S, S]")
        self.classes, self.image_size = _classes_and_size(metadata, name)
        self._check_arguments(inputs, outputs)
        self.input_name, self.output_name = inputs[0].name, outputs[0].name

    def _check_arguments(self, inputs: list[Any], outputs: list[Any]) -> None:
        size = self.image_size
        shape = list(inputs[0].shape or []) if len(inputs) == 1 else []
        if not (len(inputs) == 1 and inputs[0].type == "tensor(uint8)" and len(shape) == 4
                and not isinstance(shape[0], int) and shape[1:] == [3, size, size]):
            found = ", ".join(f"{i.name!r} {_describe(i)}" for i in inputs) or "none"
            raise PipelineError(f"{self.name}: wrong input: {found}; expected one input, uint8 [batch, 3, {size}, "
                                f"{size}] (RGB images of image_size {size}, as its metadata says, and a dynamic "
                                "batch dimension)")
        shape = list(outputs[0].shape or []) if len(outputs) == 1 else []
        per_class = len(shape) == 2 and (shape[1] == len(self.classes) or not isinstance(shape[1], int))
        if not (len(outputs) == 1 and outputs[0].type == "tensor(float)" and per_class):
            found = ", ".join(f"{o.name!r} {_describe(o)}" for o in outputs) or "none"
            raise PipelineError(f"{self.name}: wrong output: {found}; expected one output, float [batch, "
                                f"{len(self.classes)}] (a logit for each class of its metadata)")

    def logits(self, images: np.ndarray) -> np.ndarray:
        """float32 logits N x classes for uint8 images N x 3 x S x S."""
        batch = np.ascontiguousarray(images, dtype=np.uint8)
        try:
            (logits,) = self.session.run([self.output_name], {self.input_name: batch})
        except Exception as error:  # ONNX Runtime's own classes again
            raise PipelineError(f"{self.name}: ONNX Runtime failed on {len(batch)} images ({first_line(error)})") \
                from None
        if logits.shape != (len(batch), len(self.classes)):
            raise PipelineError(f"{self.name}: the model gave logits of shape {list(logits.shape)} for {len(batch)} "
                                f"images; expected [{len(batch)}, {len(self.classes)}]")
        return logits.astype(np.float32, copy=False)


def _classes_and_size(metadata: dict[str, str], name: str) -> tuple[list[str], int]:
    """The class names and image size of the export stage's metadata, checked as a checkpoint's are."""
    try:
        classes = json.loads(metadata["classes"])
        image_size = int(metadata["image_size"])
    except (KeyError, ValueError, TypeError):
        raise PipelineError(f"{name}: its metadata needs 'classes' (a JSON list of names) and 'image_size' (an "
                            "integer); export the model again (dvc repro export)") from None
    if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) < len(classes)):
        raise PipelineError(f"{name}: metadata 'classes': expected a JSON list of at least 2 distinct names")
    if image_size not in IMAGE_SIZES:
        raise PipelineError(f"{name}: metadata 'image_size': expected {IMAGE_SIZES.start} to {IMAGE_SIZES.stop - 1} "
                            f"pixels, got {image_size}")
    return classes, image_size


def top_classes(logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and class indices of the `top_k` most likely classes per row, best first."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    return np.take_along_axis(probabilities, order, axis=1), order

"""export: models/model.pth -> models/model.onnx (for ONNX Runtime) and models/model.safetensors (the weights),
both checked before anything is written.

- model.onnx: torch's ONNX exporter (`torch.onnx.export(dynamo=True)`: torch.export, then onnxscript's torchlib)
  at opset `export.opset`: default 18, the opset torchlib is written in, so no version conversion runs (ONNX
  Runtime 1.14 and later runs it); a later opset is converted, and refused where the exporter silently kept 18.
  Input `images`: uint8 RGB images [batch, 3, S, S] (0..255, the batch dimension dynamic); output `logits`:
  float32 [batch, classes]. The checkpoint's normalization is inside the graph (the model's Normalize layer), an
  ensemble is one graph that averages its members' logits, and the metadata holds the class names, image size
  and architecture (stages/model/checkpoint.py's model_metadata, which stages/model/deploy.py reads).
- The check: ONNX Runtime and torch (fp32) compute the logits of `export.check_images` test images (evenly spaced
  through data/prepared/test.pt) in batches and of the first one alone (the dynamic batch). Every logit must agree
  within tolerance * (1 + |torch's logit|), and the top-1 class must be the same wherever torch's best two logits
  are further apart than that (closer is a tie at float32 precision). Otherwise the stage fails with the largest
  difference, and nothing is written.
- model.safetensors: the format of stages/model/checkpoint.py (the weights, and what rebuilds the model in its
  metadata). It is read back as predict reads it (read_safetensors, the checks a checkpoint gets) and must give
  the checkpoint's tensors exactly.
- Determinism: the same checkpoint gives the same bytes in both files on the same machine and library versions
  (tests/test_export.py exports twice in one process, tests/test_pipeline.py again in a fresh clone). The
  safetensors header is canonical (see stages/model/checkpoint.py); the exporter's debugging annotations (every
  node's Python stack trace, with the absolute paths of the code) are dropped from the .onnx, so its bytes do not
  depend on where the checkout lives. The .onnx names the torch build that wrote it (producer_version).
"""

from __future__ import annotations

import contextlib
import io
import re
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.base.config import load_params
from stages.base.paths import MODEL_PATH, ONNX_PATH, SAFETENSORS_PATH, TEST_SPLIT
from stages.base.runtime import PipelineError, log, run_stage, strip_ansi, write_bytes
from stages.model.checkpoint import check_safetensors, load_checkpoint, model_metadata, safetensors_bytes
from stages.model.deploy import INPUT_NAME, ONNX_FORMAT, OUTPUT_NAME, OnnxClassifier
from stages.model.nets import infer, model_from_checkpoint
from stages.model.tensors import load_split

ONNX_MAX_BYTES = 2**31 - 2**26  # protobuf's 2 GiB limit on one file, less room for the graph itself
CHECK_BATCH = 256  # images per ONNX Runtime / torch call in the check


# ---------------------------------------------------------------- ONNX


def export_onnx(model: nn.Module, checkpoint: dict[str, Any], opset: int, name: str = str(MODEL_PATH)) -> bytes:
    """The model as ONNX bytes (see the module's docstring). The exporter's progress lines and graph dumps are
    kept out of the log; when it fails, its error's headline and summary are the message."""
    weight_bytes = sum(t.numel() * t.element_size() for member in checkpoint["state_dicts"] for t in member.values())
    if weight_bytes > ONNX_MAX_BYTES:
        raise PipelineError(f"{name}: {weight_bytes / 2**30:.1f} GiB of weights do not fit one .onnx file (protobuf "
                            f"allows 2 GiB); export a smaller model or fewer ensemble members")
    size = checkpoint["image_size"]
    example = torch.zeros((2, 3, size, size), dtype=torch.uint8)  # 2: a batch of 1 would be specialised to 1
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
            proto = program.model_proto
    except Exception as error:  # the exporter raises its own classes for each step, and whatever torch.export raises
        raise PipelineError(f"{name}: torch's ONNX exporter cannot export this {checkpoint['model']} model: "
                            f"{_exporter_failure(error)}; nothing was written") from None
    written = next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), None)
    if written != opset:  # the exporter keeps its own opset when it cannot convert, without an error
        import onnx
        raise PipelineError(f"export.opset: {opset} was asked for, but torch's exporter wrote opset {written}; it "
                            f"writes 18 to {onnx.defs.onnx_opset_version()} (the newest that the installed onnx "
                            "knows); nothing was written")
    _drop_annotations(proto.graph)
    del proto.metadata_props[:]
    for key, value in model_metadata(checkpoint, ONNX_FORMAT).items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def _drop_annotations(graph: Any) -> None:
    """Remove the exporter's debugging annotations: on every node its Python stack trace (absolute paths of the
    code, line numbers), FX node and module names, on the graph torch.export's signature. They would make the bytes
    depend on where the checkout lives; runtimes do not read them."""
    del graph.metadata_props[:]
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        del value.metadata_props[:]
    for node in graph.node:
        del node.metadata_props[:]
        for attribute in node.attribute:  # control flow (If, Loop, Scan) holds subgraphs
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                _drop_annotations(subgraph)


def _exporter_failure(error: Exception) -> str:
    """The exporter's headline and the line after its '## Exception summary' (the cause), without its advice."""
    lines = [strip_ansi(line).strip() for line in str(error).splitlines()]
    headline = next((line for line in lines if line), type(error).__name__)
    headline = headline.split(" This is step")[0]
    cause = ""
    if "## Exception summary" in lines:
        cause = next((line for line in lines[lines.index("## Exception summary") + 1:] if line), "")
        cause = re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>", r"\1", cause)
    text = f"{headline} {cause}".strip()
    return text if len(text) <= 400 else text[:400] + " ..."


def onnx_logits(classifier: OnnxClassifier, images: np.ndarray) -> np.ndarray:
    return np.concatenate([classifier.logits(images[start:start + CHECK_BATCH])
                           for start in range(0, len(images), CHECK_BATCH)])


def check_onnx(onnx_bytes: bytes, model: nn.Module, images: torch.Tensor, tolerance: float,
               classes: list[str]) -> float:
    """Fail unless ONNX Runtime gives torch's fp32 logits for `images`, in batches and for the first image alone
    (see compare_logits); returns the largest difference."""
    classifier = OnnxClassifier(onnx_bytes, str(ONNX_PATH))  # loaded as predict loads a model.onnx, with its checks
    pixels = images.numpy()
    expected = infer(model, images, batch_size=CHECK_BATCH).numpy()
    got = np.concatenate([onnx_logits(classifier, pixels), onnx_logits(classifier, pixels[:1])])
    return compare_logits(got, np.concatenate([expected, expected[:1]]), np.r_[np.arange(len(images)), 0],
                          tolerance, classes)


def compare_logits(got: np.ndarray, expected: np.ndarray, image_index: np.ndarray, tolerance: float,
                   classes: list[str]) -> float:
    """Every logit within tolerance * (1 + |expected|), and the same top-1 class wherever the expected best two
    are further apart than that tolerance of the best (closer is a tie at float32 precision); returns the largest
    difference. `image_index` names the test image of each row in the message."""
    broken = ~(np.isfinite(got).all(axis=1) & np.isfinite(expected).all(axis=1))
    if broken.any():  # every comparison with NaN is false: without this, NaN logits would pass the check below
        first = int(np.flatnonzero(broken)[0])
        raise PipelineError(f"{ONNX_PATH}: logits that are not finite (NaN or infinite) on {int(broken.sum())} of "
                            f"{len(got)} checks (first: test image {image_index[first]}); nothing was written")
    difference = np.abs(got - expected)
    allowed = tolerance * (1 + np.abs(expected))
    row, column = np.unravel_index(np.argmax(difference / allowed), difference.shape)
    if difference[row, column] > allowed[row, column]:
        raise PipelineError(
            f"{ONNX_PATH}: ONNX Runtime and torch disagree: test image {image_index[row]}, logit of "
            f"{classes[column]!r}: {got[row, column]:.7g} against {expected[row, column]:.7g} (difference "
            f"{difference[row, column]:.3g}, allowed {allowed[row, column]:.3g}: export.tolerance {tolerance:g} x "
            "(1 + |logit|)); nothing was written")
    best_two = np.sort(expected, axis=1)[:, -2:]
    tie = best_two[:, 1] - best_two[:, 0] <= tolerance * (1 + np.abs(best_two[:, 1]))
    differ = np.flatnonzero((got.argmax(1) != expected.argmax(1)) & ~tie)
    if len(differ):
        first = differ[0]
        raise PipelineError(
            f"{ONNX_PATH}: the top-1 class differs between ONNX Runtime and torch on {len(differ)} of {len(got)} "
            f"checks (first: test image {image_index[first]}, {classes[got[first].argmax()]!r} against "
            f"{classes[expected[first].argmax()]!r}); nothing was written")
    return float(difference.max())


def check_images(count: int, image_size: int) -> torch.Tensor:
    """`count` test images, evenly spaced through the test split (all of them when it has fewer)."""
    images, _ = load_split(TEST_SPLIT)
    if (not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4
            or tuple(images.shape[1:]) != (3, image_size, image_size)):
        found = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise PipelineError(f"{TEST_SPLIT}: expected uint8 test images N x 3 x {image_size} x {image_size} (the "
                            f"checkpoint's image size), got {found}; rerun the pipeline (dvc repro)")
    if not len(images):
        raise PipelineError(f"{TEST_SPLIT}: no test images to check the exported model on")
    count = min(count, len(images))
    return images[torch.arange(count) * len(images) // count]


# ---------------------------------------------------------------- the stage


def export(params: dict[str, Any]) -> None:
    cfg = params["export"]
    checkpoint = load_checkpoint(MODEL_PATH)
    try:
        model = model_from_checkpoint(checkpoint)
    except PipelineError as error:
        raise PipelineError(f"{MODEL_PATH}: {error}") from None
    images = check_images(cfg["check_images"], checkpoint["image_size"])
    onnx_bytes = export_onnx(model, checkpoint, cfg["opset"])
    largest = check_onnx(onnx_bytes, model, images, cfg["tolerance"], list(checkpoint["classes"]))
    weights = safetensors_bytes(checkpoint)
    check_safetensors(weights, checkpoint, SAFETENSORS_PATH)
    write_bytes(ONNX_PATH, onnx_bytes)  # only now: both files are complete and checked
    write_bytes(SAFETENSORS_PATH, weights)
    log(f"export: {ONNX_PATH} (opset {cfg['opset']}, {len(onnx_bytes) / 1e6:.1f} MB) gives torch's logits on "
        f"{len(images)} test images (largest difference {largest:.2g}, tolerance {cfg['tolerance']:g} x "
        f"(1 + |logit|)); {SAFETENSORS_PATH} ({len(weights) / 1e6:.1f} MB) reads back bit for bit")


def main() -> None:
    export(load_params())


if __name__ == "__main__":
    run_stage(main)

"""export: models/model.pth -> models/model.onnx (for ONNX Runtime) and models/model.safetensors (the weights),
both checked before anything is written.

- model.onnx: torch's ONNX exporter (`torch.onnx.export(dynamo=True)`: torch.export, then onnxscript's torchlib)
  at opset `export.opset`: default 18, the opset torchlib is written in, so no version conversion runs (ONNX
  Runtime 1.14 and later runs it); a later opset is converted, and refused where the exporter silently kept 18.
  Input `images`: uint8 RGB images [batch, 3, S, S] (0..255, the batch dimension dynamic); output `logits`:
  float32 [batch, classes]. The checkpoint's normalization is inside the graph (the model's Normalize layer), an
  ensemble is one graph that averages its members' logits, and the metadata holds the class names, image size
  and architecture (stages.deploy reads them).
- The check: ONNX Runtime and torch (fp32) compute the logits of `export.check_images` test images (evenly spaced
  through data/prepared/test.pt) in batches and of the first one alone (the dynamic batch). Every logit must agree
  within tolerance * (1 + |torch's logit|), and the top-1 class must be the same wherever torch's best two logits
  are further apart than that (closer is a tie at float32 precision). Otherwise the stage fails with the largest
  difference, and nothing is written.
- model.safetensors: each ensemble member's tensors, named as the rebuilt model's state_dict (`normalize.mean`,
  `net.0.weight`, ...; `members.<i>.` in front in an ensemble), with string metadata: format, model,
  model_config, classes, image_size, mean, std, members. It is read back as predict reads it (read_safetensors,
  the checks a checkpoint gets) and must give the checkpoint's tensors exactly.
- Determinism: the same checkpoint gives the same bytes in both files on the same machine and library versions
  (tests/test_export.py exports twice in one process, tests/test_pipeline.py again in a fresh clone). The
  safetensors header is written canonically (metadata keys sorted, tensors in data order) because the
  safetensors library writes metadata in hash order, which changes from call to call; the exporter's debugging
  annotations (every node's Python stack trace, with the absolute paths of the code) are dropped from the .onnx,
  so its bytes do not depend on where the checkout lives. The .onnx names the torch build that wrote it
  (producer_version).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.common import (PipelineError, load_checkpoint, load_split, log, make_checkpoint, run_stage,
                           write_bytes)
from stages.config import check_checkpoint_fields, load_params
from stages.deploy import INPUT_NAME, ONNX_FORMAT, OUTPUT_NAME, DeployError, OnnxClassifier, first_line
from stages.models import infer, model_from_checkpoint
from stages.paths import MODEL_PATH, ONNX_PATH, SAFETENSORS_PATH, TEST_SPLIT

SAFETENSORS_FORMAT = "cifar-pipeline/safetensors/1"
ONNX_MAX_BYTES = 2**31 - 2**26  # protobuf's 2 GiB limit on one file, less room for the graph itself
CHECK_BATCH = 256  # images per ONNX Runtime / torch call in the check


def model_metadata(checkpoint: dict[str, Any], file_format: str) -> dict[str, str]:
    """What rebuilds and feeds the model, as strings (both formats take string metadata), in a fixed order."""
    return {"format": file_format, "model": checkpoint["model"],
            "model_config": json.dumps(checkpoint["model_config"], sort_keys=True),
            "classes": json.dumps(list(checkpoint["classes"])), "image_size": str(checkpoint["image_size"]),
            "mean": json.dumps(list(checkpoint["mean"])), "std": json.dumps(list(checkpoint["std"])),
            "members": str(len(checkpoint["state_dicts"]))}


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
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    headline = next((line for line in lines if line), type(error).__name__)
    headline = headline.split(" This is step")[0]
    cause = ""
    if "## Exception summary" in lines:
        cause = next((line for line in lines[lines.index("## Exception summary") + 1:] if line), "")
        cause = re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>", r"\1", cause)
    text = f"{headline} {cause}".strip()
    return text if len(text) <= 400 else text[:400] + " ..."


def onnx_classifier(onnx_bytes: bytes, name: str = str(ONNX_PATH)) -> OnnxClassifier:
    """The exported bytes loaded as predict loads a model.onnx (stages.deploy), with its checks."""
    try:
        return OnnxClassifier(onnx_bytes, name)
    except DeployError as error:
        raise PipelineError(str(error)) from None


def onnx_logits(classifier: OnnxClassifier, images: np.ndarray) -> np.ndarray:
    try:
        return np.concatenate([classifier.logits(images[start:start + CHECK_BATCH])
                               for start in range(0, len(images), CHECK_BATCH)])
    except DeployError as error:
        raise PipelineError(str(error)) from None


def check_onnx(onnx_bytes: bytes, model: nn.Module, images: torch.Tensor, tolerance: float,
               classes: list[str]) -> float:
    """Fail unless ONNX Runtime gives torch's fp32 logits for `images`, in batches and for the first image alone
    (see compare_logits); returns the largest difference."""
    classifier = onnx_classifier(onnx_bytes)
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


# ---------------------------------------------------------------- safetensors


def _safetensors_module() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise PipelineError("safetensors is not installed: pip install -e '.[export]'") from None
    return safetensors.torch


def weight_tensors(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every member's tensors under the names of the rebuilt model's state_dict (`members.<i>.` in an ensemble).
    Cloned: safetensors refuses tensors that share memory."""
    members = checkpoint["state_dicts"]
    return {(f"members.{index}." if len(members) > 1 else "") + name: tensor.detach().contiguous().clone()
            for index, member in enumerate(members) for name, tensor in member.items()}


def safetensors_bytes(checkpoint: dict[str, Any]) -> bytes:
    """The weights and model_metadata as a safetensors file, with a canonical header (see the module's docstring):
    the library lays out the data; the header is rewritten with sorted metadata and tensors in data order."""
    raw = _safetensors_module().save(weight_tensors(checkpoint), metadata=model_metadata(checkpoint,
                                                                                         SAFETENSORS_FORMAT))
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    metadata = header.pop("__metadata__")
    tensors = sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0]))
    canonical = json.dumps({"__metadata__": dict(sorted(metadata.items())), **dict(tensors)},
                           separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    canonical += b" " * (-len(canonical) % 8)  # the data stays 8-byte aligned, as the library writes it
    return len(canonical).to_bytes(8, "little") + canonical + raw[8 + length:]


def _safetensors_metadata(data: bytes, name: str) -> dict[str, str]:
    """The header's metadata, refused unless this pipeline wrote it."""
    length = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    try:
        header = json.loads(data[8:8 + length]) if 0 < length <= len(data) - 8 else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise PipelineError(f"{name}: not a safetensors file (no valid header)")
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != SAFETENSORS_FORMAT:
        raise PipelineError(f"{name}: not a safetensors export of this pipeline: its metadata has no format "
                            f"{SAFETENSORS_FORMAT!r} (the export stage writes the model, its settings, class names "
                            "and image size there)")
    return metadata


def _metadata_fields(metadata: dict[str, str], name: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"model": metadata.get("model")}
    for key, parse in (("model_config", json.loads), ("classes", json.loads), ("image_size", int),
                       ("mean", json.loads), ("std", json.loads), ("members", int)):
        try:
            fields[key] = parse(metadata[key])
        except (KeyError, TypeError, ValueError):  # json.JSONDecodeError is a ValueError
            raise PipelineError(f"{name}: metadata {key!r} is missing or not valid; export the model again "
                                "(dvc repro export)") from None
    return fields


def _split_members(tensors: dict[str, torch.Tensor], members: int, name: str) -> list[dict[str, torch.Tensor]]:
    """The tensors of each member (`members.<i>.<name>` in an ensemble, plain names for one model)."""
    if members == 1:
        return [tensors]
    if not 1 < members <= len(tensors):
        raise PipelineError(f"{name}: metadata 'members': {members} members do not fit {len(tensors)} tensors")
    split: list[dict[str, torch.Tensor]] = [{} for _ in range(members)]
    for full_name, tensor in sorted(tensors.items()):
        match = re.fullmatch(r"members\.(\d+)\.(.+)", full_name)
        if not match or int(match[1]) >= members:
            raise PipelineError(f"{name}: tensor {full_name!r} belongs to none of the {members} members (expected "
                                "names members.<index>.<parameter>)")
        split[int(match[1])][match[2]] = tensor
    return split


def checkpoint_from_safetensors(data: bytes, name: str) -> dict[str, Any]:
    """A model.safetensors of the export stage as a checkpoint (stages.common.make_checkpoint), with the checks
    load_checkpoint makes, so model_from_checkpoint rebuilds it or says why the weights do not fit."""
    metadata = _safetensors_metadata(data, name)
    fields = _metadata_fields(metadata, name)
    try:
        tensors = _safetensors_module().load(data)
    except Exception as error:  # safetensors raises SafetensorError, or a torch error for a bad dtype
        raise PipelineError(f"{name}: not a readable safetensors file ({first_line(error)})") from None
    if not tensors:
        raise PipelineError(f"{name}: the file holds no tensors")
    members = fields.pop("members")
    checkpoint = make_checkpoint(**fields, state_dicts=_split_members(tensors, members, name))
    try:
        check_checkpoint_fields(checkpoint)  # a crafted size is refused before any model is built
    except PipelineError as error:
        raise PipelineError(f"{name}: {error}") from None
    return checkpoint


def read_safetensors(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: safetensors file not found")
    return checkpoint_from_safetensors(path.read_bytes(), str(path))


def check_safetensors(data: bytes, checkpoint: dict[str, Any]) -> None:
    """Fail unless `data` reads back as `checkpoint`: the same model fields and bit-identical tensors."""
    again = checkpoint_from_safetensors(data, str(SAFETENSORS_PATH))
    for key in ("model", "model_config", "classes", "image_size", "mean", "std"):
        if again[key] != checkpoint[key]:
            raise PipelineError(f"{SAFETENSORS_PATH}: {key} reads back as {again[key]!r}, not "
                                f"{checkpoint[key]!r}; nothing was written")
    for index, (mine, theirs) in enumerate(zip(checkpoint["state_dicts"], again["state_dicts"], strict=True)):
        differ = [k for k in mine if k not in theirs or theirs[k].dtype != mine[k].dtype
                  or not torch.equal(theirs[k], mine[k])] + [k for k in theirs if k not in mine]
        if differ:
            raise PipelineError(f"{SAFETENSORS_PATH}: member {index}: tensor {differ[0]!r} does not read back "
                                "as it was written; nothing was written")


# ---------------------------------------------------------------- the stage


def export(params: dict[str, Any]) -> None:
    settings = params["export"]
    checkpoint = load_checkpoint(MODEL_PATH)
    try:
        model = model_from_checkpoint(checkpoint)
    except PipelineError as error:
        raise PipelineError(f"{MODEL_PATH}: {error}") from None
    images = check_images(settings["check_images"], checkpoint["image_size"])
    onnx_bytes = export_onnx(model, checkpoint, settings["opset"])
    largest = check_onnx(onnx_bytes, model, images, settings["tolerance"], list(checkpoint["classes"]))
    weights = safetensors_bytes(checkpoint)
    check_safetensors(weights, checkpoint)
    write_bytes(ONNX_PATH, onnx_bytes)  # only now: both files are complete and checked
    write_bytes(SAFETENSORS_PATH, weights)
    log(f"export: {ONNX_PATH} (opset {settings['opset']}, {len(onnx_bytes) / 1e6:.1f} MB) gives torch's logits on "
        f"{len(images)} test images (largest difference {largest:.2g}, tolerance {settings['tolerance']:g} x "
        f"(1 + |logit|)); {SAFETENSORS_PATH} ({len(weights) / 1e6:.1f} MB) reads back bit for bit")


def main() -> None:
    run_stage(lambda: export(load_params()))


if __name__ == "__main__":
    main()

"""The model on disk: the self-describing checkpoint train writes (make_checkpoint) and every reader loads and
checks (load_checkpoint), and the export stage's model.safetensors, read back as a checkpoint with the same checks,
so a wrong or crafted file gets one error naming the file and the field.

- model.safetensors: each ensemble member's tensors, named as the rebuilt model's state_dict (`normalize.mean`,
  `net.0.weight`, ...; `members.<i>.` in front in an ensemble), with string metadata (model_metadata, which the
  export stage's model.onnx carries too): format, model, model_config, classes, image_size, mean, std, members.
- Its header is written canonically (metadata keys sorted, tensors in data order) because the safetensors library
  writes metadata in hash order, which changes from call to call: the same checkpoint gives the same bytes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from stages.base.config import SCHEMA, Choice, check_section, model_config_schema
from stages.base.paths import SAFETENSORS_PATH
from stages.base.runtime import ParamsError, PipelineError, brief, first_line
from stages.base.specs import CHECKPOINT_FIELDS, MODELS, check_model_fields
from stages.model.tensors import load_torch

CHECKPOINT_FORMAT = "cifar-pipeline/checkpoint/2"  # 2: "state_dicts", one per ensemble member
CHECKPOINT_FORMAT_1 = "cifar-pipeline/checkpoint/1"  # one "state_dict"; still loaded
SAFETENSORS_FORMAT = "cifar-pipeline/safetensors/1"  # metadata "format" of the export stage's model.safetensors


def make_checkpoint(*, model: str, model_config: dict[str, Any], classes: list[str], image_size: int,
                    mean: list[float], std: list[float], state_dicts: list[dict[str, torch.Tensor]],
                    train: dict[str, Any] | None = None, pretrained: dict[str, str] | None = None,
                    epochs_completed: float | None = None,
                    selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """The self-describing checkpoint that train writes and load_checkpoint reads: everything needed to rebuild
    the model and feed it (architecture and its config, class names, input size, normalization), the weights of
    each ensemble member, and how it was trained: the params, the epochs trained and, in `selection`, which epoch
    each member's weights come from and why (stages/model/selection.py). Key order is fixed, so the same run saves the
    same bytes."""
    return {"format": CHECKPOINT_FORMAT, "model": model, "model_config": model_config, "classes": classes,
            "image_size": image_size, "mean": mean, "std": std, "state_dicts": state_dicts, "train": train,
            "pretrained": pretrained, "epochs_completed": epochs_completed, "selection": selection,
            "torch_version": torch.__version__.split("+")[0]}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a model checkpoint written by the train stage (see make_checkpoint): its format, the weights
    (tensors by name), and every field that rebuilds and feeds the model (check_checkpoint_fields),
    so a wrong or crafted file gets one error naming the file and the field, never a crash later."""
    checkpoint = load_torch(path, "model checkpoint")
    if not isinstance(checkpoint, dict) or "format" not in checkpoint:
        raise PipelineError(f"{path}: not a checkpoint of this pipeline (no 'format' field)")
    if checkpoint["format"] == CHECKPOINT_FORMAT_1 and "state_dict" in checkpoint:
        # format 1 (before train.ensemble) held one model: the same as a one-member ensemble
        state_dict = checkpoint.pop("state_dict")
        checkpoint = {**checkpoint, "format": CHECKPOINT_FORMAT, "state_dicts": [state_dict]}
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise PipelineError(
            f"{path}: checkpoint format {checkpoint['format']!r} is not supported; expected {CHECKPOINT_FORMAT!r}"
        )
    missing = [key for key in ("model", "model_config", "classes", "image_size", "mean", "std", "state_dicts")
               if key not in checkpoint]
    if missing:
        raise PipelineError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if not isinstance(checkpoint["state_dicts"], list) or not checkpoint["state_dicts"]:
        raise PipelineError(f"{path}: checkpoint 'state_dicts' must be a non-empty list of model weights")
    for index, state_dict in enumerate(checkpoint["state_dicts"]):
        if not isinstance(state_dict, dict) or not state_dict or not all(
                isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in state_dict.items()):
            raise PipelineError(f"{path}: checkpoint 'state_dicts' item {index} must map parameter names to tensors")
        broken = next((name for name, value in state_dict.items()
                       if value.is_floating_point() and not bool(torch.isfinite(value).all())), None)
        if broken is not None:  # training stops at a non-finite loss, so such weights were edited or damaged
            raise PipelineError(f"{path}: tensor {brief(broken)} holds NaN or infinite values: the model is broken; "
                                "retrain it (dvc repro)")
    try:
        check_checkpoint_fields(checkpoint)  # before any model is built: a crafted size is refused, not allocated
    except PipelineError as error:
        raise PipelineError(f"{path}: {error}") from None
    return checkpoint


def _check_three_numbers(key: str, value: Any, positive: bool) -> None:
    """A checkpoint's per-channel mean or std (of pixels scaled to 0..1): three numbers of magnitude <= 1e6, which
    also refuses NaN, infinities and integers too large for a float tensor; > 0 for std, which divides."""
    fine = (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and -1e6 <= v <= 1e6
                    and (v > 0 or not positive) for v in value))
    if not fine:
        raise ParamsError(f"{key}: expected three numbers{' > 0' if positive else ''} of magnitude at most 1e6 "
                          f"(one per colour channel), got {brief(value)}")


def check_checkpoint_fields(checkpoint: dict[str, Any]) -> None:
    """The fields of a model checkpoint (make_checkpoint) that rebuild and feed its model, checked with the params
    schema: model_config as train.<model>, image_size as data.image_size, and the model sizes as for params
    (check_model_fields). `state_dicts` is a non-empty list already (load_checkpoint checks its tensors)."""
    model = Choice(MODELS).check("model", checkpoint["model"])
    check_section("model_config", model_config_schema(model), checkpoint["model_config"], "the checkpoint")
    image_size = SCHEMA["data"]["image_size"].check("image_size", checkpoint["image_size"])
    classes = checkpoint["classes"]
    if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) < len(classes)):
        raise ParamsError(f"classes: expected a list of at least 2 distinct class names (text), "
                          f"got {brief(classes)}")
    _check_three_numbers("mean", checkpoint["mean"], positive=False)
    _check_three_numbers("std", checkpoint["std"], positive=True)
    for key in ("train", "pretrained"):  # optional: how the model was trained, and from which weights
        if checkpoint.get(key) is not None and not isinstance(checkpoint[key], dict):
            raise ParamsError(f"{key}: expected a mapping or null, got {type(checkpoint[key]).__name__}")
    check_model_fields(model, checkpoint["model_config"], image_size, len(classes), len(checkpoint["state_dicts"]),
                       CHECKPOINT_FIELDS)


# ---------------------------------------------------------------- the exported formats' metadata


def model_metadata(checkpoint: dict[str, Any], file_format: str) -> dict[str, str]:
    """What rebuilds and feeds the model, as strings (the .onnx and .safetensors both take string metadata), in a
    fixed order."""
    return {"format": file_format, "model": checkpoint["model"],
            "model_config": json.dumps(checkpoint["model_config"], sort_keys=True),
            "classes": json.dumps(list(checkpoint["classes"])), "image_size": str(checkpoint["image_size"]),
            "mean": json.dumps(list(checkpoint["mean"])), "std": json.dumps(list(checkpoint["std"])),
            "members": str(len(checkpoint["state_dicts"]))}


# ---------------------------------------------------------------- .safetensors


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
    """A model.safetensors of the export stage as a checkpoint (make_checkpoint), with the checks load_checkpoint
    makes, so model_from_checkpoint rebuilds it or says why the weights do not fit."""
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


def check_safetensors(data: bytes, checkpoint: dict[str, Any], name: str | Path = SAFETENSORS_PATH) -> None:
    """Fail unless `data` reads back as `checkpoint`: the same model fields and bit-identical tensors (the export
    stage's check before it writes `name`)."""
    again = checkpoint_from_safetensors(data, str(name))
    for key in ("model", "model_config", "classes", "image_size", "mean", "std"):
        if again[key] != checkpoint[key]:
            raise PipelineError(f"{name}: {key} reads back as {again[key]!r}, not {checkpoint[key]!r}; nothing was "
                                "written")
    for index, (mine, theirs) in enumerate(zip(checkpoint["state_dicts"], again["state_dicts"], strict=True)):
        differ = [k for k in mine if k not in theirs or theirs[k].dtype != mine[k].dtype
                  or not torch.equal(theirs[k], mine[k])] + [k for k in theirs if k not in mine]
        if differ:
            raise PipelineError(f"{name}: member {index}: tensor {differ[0]!r} does not read back as it was written; "
                                "nothing was written")

"""Starting weights for training: ImageNet weights (train.pretrained: a state_dict file that
tools/get_pretrained.py put under models/pretrained/) and a checkpoint of this pipeline (train.init: an earlier
model, perhaps of another class set, e.g. one fetched with `dvc artifacts get`). Either way the classifier layer is
taken only where it fits the data's classes, everything else must match the architecture exactly, and the
checkpoint records the file and its SHA-256 (`starting_record`). The pipeline never downloads weights itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.base.runtime import PipelineError, file_digest
from stages.base.specs import PRETRAINED_MODELS
from stages.model.checkpoint import load_checkpoint
from stages.model.nets import ImageClassifier, build_model
from stages.model.tensors import load_torch

# per model: (the module the state_dict file describes, its classifier's key prefix, the architecture's name)
IMAGENET_LAYOUTS = {
    "resnet18": (lambda net: net.resnet, "fc.", "ResNet-18 (torchvision)"),
    "efficientnet_lite0": (lambda net: net, "_fc.", "EfficientNet-Lite0"),
}
HEAD_TAKEN = "head"  # starting_record's key for whether the classifier came from the file


def weights_file(key: str, path: str, model: str) -> Path:
    """The local file train.<key> names, or one line saying how to get it."""
    weights = Path(path)
    if weights.is_file():
        return weights
    if key == "pretrained":
        how = PRETRAINED_MODELS.get(model, "python tools/get_pretrained.py")
        raise PipelineError(f"train.pretrained: {weights} not found. Weights are never downloaded implicitly: "
                            f"run `{how}` (offline for efficientnet_lite0), then `dvc add {weights}` to version it")
    raise PipelineError(f"train.init: {weights} not found; put a checkpoint of this pipeline there (e.g. "
                        f"`dvc artifacts get <repo> <model> -o {weights}`, or copy an earlier models/model.pth)")


def starting_record(path: Path, head_taken: bool, **extra: Any) -> dict[str, Any]:
    """What the checkpoint keeps about where the starting weights came from."""
    return {"path": path.as_posix(), "sha256": file_digest(path), HEAD_TAKEN: head_taken, **extra}


def load_imagenet_weights(model: ImageClassifier, model_name: str, path: str) -> dict[str, Any]:
    """Start `model` from an ImageNet state_dict file. Every backbone tensor must be there with its shape; the
    classifier is taken only when it has the data's class count (1000: ImageNet's own classes)."""
    weights = weights_file("pretrained", path, model_name)
    target_of, head, architecture = IMAGENET_LAYOUTS[model_name]
    target: nn.Module = target_of(model.net)
    state = load_torch(weights, "pretrained weights")
    if not isinstance(state, dict) or not state or not all(
            isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in state.items()):
        raise PipelineError(f"{weights}: pretrained weights must be a state_dict (a mapping of names to tensors)")
    own = target.state_dict()
    missing = [key for key in own if key not in state and not key.startswith(head)]
    if missing:
        raise PipelineError(f"{weights}: not {architecture} weights; missing {', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''} (train.model is {model_name})")
    wrong = [key for key in own if key in state and not key.startswith(head) and state[key].shape != own[key].shape]
    if wrong:
        raise PipelineError(f"{weights}: not {architecture} weights; tensor shapes differ for "
                            f"{', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
    head_taken = all(key in state and state[key].shape == own[key].shape for key in own if key.startswith(head))
    target.load_state_dict({key: state[key] for key in own if head_taken or not key.startswith(head)},
                           strict=head_taken)
    return starting_record(weights, head_taken)


def load_init_checkpoint(model: ImageClassifier, model_name: str, model_config: dict[str, Any],
                         classes: list[str], image_size: int, path: str) -> dict[str, Any]:
    """Start `model` from a checkpoint of this pipeline: the same model type with the same settings, and any
    class set. The tensors whose shape follows the class count are the classifier: taken only when the
    checkpoint has exactly the data's classes, in order; otherwise they keep their fresh initialization. The
    first member of an ensemble is used."""
    weights = weights_file("init", path, model_name)
    checkpoint = load_checkpoint(weights)
    if checkpoint["model"] != model_name:
        raise PipelineError(f"train.init: {weights} is a {checkpoint['model']} checkpoint; train.model is "
                            f"{model_name} (a checkpoint starts only the same model type)")
    differing = sorted(key for key in set(model_config) | set(checkpoint["model_config"])
                       if model_config.get(key) != checkpoint["model_config"].get(key) and key != "freeze_backbone")
    if differing:
        key = differing[0]
        raise PipelineError(f"train.init: {weights} has {model_name}.{key} = {checkpoint['model_config'].get(key)!r}; "
                            f"train.{model_name}.{key} is {model_config.get(key)!r} (the architecture must match)")
    if checkpoint["image_size"] != image_size and model_name == "mlp":
        raise PipelineError(f"train.init: {weights} was trained on {checkpoint['image_size']} px images; "
                            f"data.image_size is {image_size} (the mlp's first layer depends on it)")
    # the classifier: the tensors whose shape follows the class count
    probe = build_model(model_name, model_config, len(classes) + 1, image_size, [0.5] * 3, [0.5] * 3).state_dict()
    own = model.state_dict()
    head = {key for key in own if probe[key].shape != own[key].shape}
    same_classes = list(checkpoint["classes"]) == list(classes)
    # The input normalization stays the new data's (the checkpoint's mean and std say so, and BatchNorm adapts).
    selected = {key: value for key, value in checkpoint["state_dicts"][0].items()
                if not key.startswith("normalize.") and (same_classes or key not in head)}
    expected = {key for key in own if not key.startswith("normalize.") and (same_classes or key not in head)}
    try:
        if set(selected) != expected:
            raise RuntimeError(f"tensors {', '.join(sorted(expected ^ set(selected))[:3])} differ")
        model.load_state_dict(selected, strict=False)
    except RuntimeError as error:
        raise PipelineError(f"train.init: {weights} does not fit {model_name}: "
                            f"{str(error).strip().splitlines()[-1].strip()}") from None
    return starting_record(weights, same_classes, classes=list(checkpoint["classes"]))

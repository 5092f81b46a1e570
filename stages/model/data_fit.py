"""Fitting a training run to its data: the batch capped to the training split, the validation split checked
against model selection, and the class-imbalance options (balanced loss weights, balanced sampling, the loss)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stages.base.config import selection_keys
from stages.base.paths import TRAIN_SPLIT, VAL_SPLIT
from stages.base.runtime import PipelineError, log


def cap_batch_size(cfg: dict[str, Any], n_train: int, world: int, rank: int) -> dict[str, Any]:
    """The train params with the batch no larger than the training split, so a small image folder trains on the
    defaults (one full-batch step per epoch, as deterministic as any other run). The cap is a multiple of the
    process count, and it is what the checkpoint's train config records; a batch that fits is left alone, so
    those runs keep their bytes."""
    if cfg["batch_size"] <= n_train:
        return cfg
    capped = n_train - n_train % world
    if capped < 2 * world:  # BatchNorm needs >= 2 images in every process's share
        raise PipelineError(f"train.batch_size: the training split ({n_train} images) is too small for "
                            f"train.nproc={world} processes; use fewer processes or more images")
    if rank == 0:
        log(f"train.batch_size: {cfg['batch_size']} is larger than the training split ({n_train} images); "
            f"training with batch {capped}")
    return {**cfg, "batch_size": capped}


def balanced_class_weights(labels: torch.Tensor, n_classes: int) -> list[float]:
    """scikit-learn's compute_class_weight('balanced'): n_samples / (n_classes * images of the class), in float64,
    so a class with half the images weighs twice as much in the loss."""
    counts = torch.bincount(labels.cpu(), minlength=n_classes).tolist()
    return [len(labels) / (n_classes * count) for count in counts]


def with_class_weights(cfg: dict[str, Any], labels: torch.Tensor, classes: list[str], rank: int) -> dict[str, Any]:
    """The train params plus `class_weight_values` (class name -> loss weight) when train.class_weights is
    balanced, so the checkpoint's train config says which weights the loss used; `none` runs are left alone and
    keep their bytes."""
    if cfg["class_weights"] == "none":
        return cfg
    counts = torch.bincount(labels.cpu(), minlength=len(classes)).tolist()
    empty = [name for name, count in zip(classes, counts) if count == 0]
    if empty:  # its weight would be infinite (scikit-learn refuses it too)
        raise PipelineError(f"train.class_weights: balanced needs a training image of every class, and class "
                            f"{empty[0]!r} has none in {TRAIN_SPLIT}; add images of it or set "
                            f"train.class_weights: none")
    weights = dict(zip(classes, balanced_class_weights(labels, len(classes))))
    if rank == 0:
        log("train.class_weights: balanced, loss weights " + ", ".join(f"{name} {weight:.3g}"
                                                                       for name, weight in weights.items()))
    return {**cfg, "class_weight_values": weights}


def check_validation_split(cfg: dict[str, Any], val_labels: torch.Tensor, classes: list[str]) -> None:
    """Selection (selection_keys) needs validation images to compare epochs on (the params check has refused
    data.val_fraction: 0; a small folder can still round its share to none), and a macro-F1 needs two classes
    among them to be more than one class's F1."""
    users = selection_keys(cfg)
    if not users:
        return
    if val_labels.numel() == 0:
        raise PipelineError(f"{' and '.join(users)}: the validation split {VAL_SPLIT} has no images to compare "
                            f"epochs on (data.val_fraction of each class rounds to none here); raise "
                            f"data.val_fraction, or set train.keep: last and train.patience: 0")
    present = sorted(set(val_labels.tolist()))
    if cfg["monitor"] == "val_macro_f1" and len(present) < 2:
        raise PipelineError(f"train.monitor: val_macro_f1 needs validation images of at least 2 classes, and "
                            f"{VAL_SPLIT} has only class {classes[present[0]]!r}; raise data.val_fraction, or "
                            f"monitor val_loss or val_acc")


def balanced_sample_weights(labels: torch.Tensor) -> torch.Tensor:
    """float64 draw weight of each training image: 1 / (images of its class), so that every class is drawn
    equally often by train.sampler: balanced."""
    counts = torch.bincount(labels.cpu())
    return 1.0 / counts[labels.cpu()].double()


def loss_function(cfg: dict[str, Any], device: torch.device) -> nn.Module:
    """Cross-entropy with the configured label smoothing, weighted per class when with_class_weights set weights
    (the mean over a batch is then the weighted mean, as in torch's CrossEntropyLoss)."""
    weights = cfg.get("class_weight_values")
    weight = None if weights is None else torch.tensor(list(weights.values()), dtype=torch.float32, device=device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg["label_smoothing"])

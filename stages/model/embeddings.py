"""Cached features (train.cache_features): a frozen backbone maps each image to the same embedding in every epoch,
so the features stage computes it once, and the train stage then trains only the classifier on those vectors, in
seconds instead of minutes. The training images are embedded twice when train.augment.flip mirrors them (plain
and mirrored), so the head still sees the flips it would see on the fly.

The test images are embedded too (and mirrored, for evaluate.tta 2), so that evaluate scores a head-only model
without running the backbone again: a head experiment then reruns no backbone work at all.

What the embeddings were computed with is recorded beside them (`expected_record`); train refuses embeddings
that no longer match its params rather than train a head on the wrong ones, and evaluate uses the test embeddings
only for a checkpoint whose backbone they came from (`cached_test_logits`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.base.paths import FEATURES_JSON, FEATURES_TEST
from stages.base.runtime import PipelineError, file_digest, log, read_json
from stages.dataset.augment import apply_flips
from stages.model.nets import Ensemble, ImageClassifier, InferenceSettings
from stages.model.tensors import load_torch

EMBED_BATCH = 256  # images per forward pass; the result does not depend on it beyond float rounding
# what must match between features.json and the train params; the precision is recorded but not compared, so a
# clone on a host of another CPU class trains on the cached embeddings instead of refusing them
COMPARED = ("model", "input_size", "weights", "mirrored", "images")


def expected_record(cfg: dict[str, Any], n_train: int, n_val: int) -> dict[str, Any]:
    """What features.json must say (COMPARED) for the train config `cfg` (with precision_used) and the split sizes;
    the features stage adds what it embedded of the test split."""
    weights = cfg["pretrained"] if cfg["pretrained"] != "none" else cfg["init"]
    return {"model": cfg["model"], "input_size": cfg[cfg["model"]]["input_size"],
            "weights": {"path": weights, "sha256": file_digest(weights)}, "precision": cfg["precision_used"],
            "mirrored": cfg["augment"]["flip"] != "none", "images": {"train": n_train, "val": n_val}}


@torch.inference_mode()
def embed(model: ImageClassifier, images: torch.Tensor, settings: InferenceSettings,
          mirrored: bool = False) -> torch.Tensor:
    """The backbone's float32 embeddings (N x features) of uint8 images N x 3 x H x W, in eval mode, under the
    precision and memory layout the model trains in (so they equal what the live forward computes)."""
    model.eval().to(settings.device)
    outputs = []
    for start in range(0, images.shape[0], EMBED_BATCH):
        batch = images[start:start + EMBED_BATCH].to(settings.device).float()
        if mirrored:
            batch = apply_flips(batch, torch.ones(batch.shape[0], dtype=torch.bool, device=batch.device))
        if settings.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(settings.device.type, dtype=settings.dtype, enabled=settings.dtype is not None):
            outputs.append(model.net.features(model.normalize(batch)).float().cpu())
    return torch.cat(outputs) if outputs else torch.zeros(0, 0)


@dataclass(frozen=True)
class CachedFeatures:
    """The embeddings of the training split (plain, and mirrored when flips are on) and of the validation split."""
    train: torch.Tensor
    train_mirrored: torch.Tensor | None
    val: torch.Tensor

    def training_batch(self, indices: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
        """The embeddings of the images `indices`, mirrored where `flips` says, as the live augmentation does."""
        plain = self.train[indices]
        if flips is None or self.train_mirrored is None:
            return plain
        return torch.where(flips.to(plain.device)[:, None], self.train_mirrored[indices], plain)


def load_features(train_path: Path, val_path: Path, expected: dict[str, Any], device: torch.device) -> CachedFeatures:
    """The cached embeddings, if they were computed for `expected` (expected_record); else one clear error."""
    record = read_json(FEATURES_JSON, "cached features record")
    differing = [key for key in COMPARED if not isinstance(record, dict) or record.get(key) != expected.get(key)]
    if differing:
        raise PipelineError(f"{FEATURES_JSON}: the cached features were computed for other settings "
                            f"({', '.join(differing)} differ); run the features stage first (dvc repro)")
    train, val = load_torch(train_path, "cached features"), load_torch(val_path, "cached features")
    for path, data in ((train_path, train), (val_path, val)):
        if not isinstance(data, dict) or not isinstance(data.get("plain"), torch.Tensor):
            raise PipelineError(f"{path}: not cached features (expected a 'plain' tensor)")
    mirrored = train.get("mirrored")
    return CachedFeatures(train["plain"].to(device), mirrored.to(device) if mirrored is not None else None,
                          val["plain"].to(device))


class Head(nn.Module):
    """The classifier alone, as the training step's forward module when the embeddings are cached: it keeps the
    whole model (so train/eval modes, dropout and the optimizer see the real network) but runs only `classify`."""

    def __init__(self, model: ImageClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.net.classify(features)


@torch.inference_mode()
def head_logits(model: ImageClassifier | Ensemble, features: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """Float32 logits of embeddings through the classifier (the members' mean for an ensemble), in eval mode."""
    members = list(model.members) if isinstance(model, Ensemble) else [model]
    logits = []
    for member in members:
        member.eval().to(settings.device)
        with torch.autocast(settings.device.type, dtype=settings.dtype, enabled=settings.dtype is not None):
            logits.append(member.net.classify(features.to(settings.device)).float().cpu())
    return torch.stack(logits).mean(0)


def cached_test_logits(checkpoint: dict[str, Any], model: ImageClassifier | Ensemble, tta: int, n_test: int,
                       settings: InferenceSettings) -> torch.Tensor | None:
    """The test logits from the cached test embeddings, when `checkpoint` was trained on cached features and they
    are the embeddings of its backbone (same weights file, input size, test split) for this TTA (1: plain, 2: plain
    and mirrored, averaged as stages.dataset.augment.tta_views weighs them); None otherwise, with a line saying why
    when the checkpoint was trained on cached features."""
    train = checkpoint.get("train") or {}
    if not train.get("cache_features"):
        return None
    record = read_json(FEATURES_JSON, "cached features record") if FEATURES_JSON.is_file() else {}
    test = record.get("test") or {}
    starting = checkpoint.get("pretrained") or {}
    model_config = checkpoint.get("model_config") or {}
    reasons = [reason for wrong, reason in (
        (record.get("model") != checkpoint["model"] or record.get("input_size") != model_config.get("input_size")
         or (record.get("weights") or {}).get("sha256") != starting.get("sha256"), "they are of another backbone"),
        (test.get("images") != n_test, "they are of another test split"),
        (tta not in (1, 2), f"evaluate.tta {tta} shifts images, which only the full model can"),
        (tta == 2 and not test.get("mirrored"), "they lack the mirrored view that evaluate.tta 2 needs")) if wrong]
    if reasons:
        log(f"evaluating with the full model, not the cached test embeddings: {reasons[0]}")
        return None
    cached = load_torch(FEATURES_TEST, "cached features")
    views = [cached["plain"]] + ([cached["mirrored"]] if tta == 2 else [])
    return sum(head_logits(model, view, settings) for view in views) / len(views)

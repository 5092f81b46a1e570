"""Test helpers: a tiny, learnable prepared dataset (what normalize writes) and a params.yaml for fast runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from stages.base.config import set_dotted
from stages.base.runtime import write_json
from stages.model.tensors import save_torch

from repo_root import REPO_ROOT


def make_split(n: int, classes: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    """Each class is a colour plus a horizontal band at its own height, under noise: easy to learn, and
    unchanged in kind by flips and small shifts."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.rand(n, 3, size, size, generator=generator) * 80
    band = max(1, size // classes)
    for c in range(classes):
        mask = labels == c
        images[mask, c % 3] += 90
        images[mask, :, (c * band) % size:(c * band) % size + band, :] += 80
    return {"images": images.clamp(0, 255).to(torch.uint8), "labels": labels.long()}


def write_prepared(root: Path, n_train: int = 240, n_val: int = 40, n_test: int = 60, classes: int = 4,
                   size: int = 32) -> None:
    prepared = root / "data" / "prepared"
    names = [f"class{i}" for i in range(classes)]
    for name, n, seed in (("train", n_train, 1), ("val", n_val, 2), ("test", n_test, 3)):
        save_torch(make_split(n, classes, size, seed), prepared / f"{name}.pt")
    write_json(prepared / "meta.json", {
        "classes": names, "image_size": size, "stats": "fixed", "mean": [0.5] * 3, "std": [0.5] * 3,
        "splits": {"train": n_train, "val": n_val, "test": n_test},
    })


def tiny_params(root: Path, **overrides: Any) -> dict[str, Any]:
    """The repo's params.yaml with a small, fast training setup; overrides use dotted keys: {"train.lr": 0.1}."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    settings = {"train.model": "cnn", "train.cnn.channels": [8, 16, 16], "train.epochs": 2, "train.batch_size": 32,
                "train.optimizer": "sgd", "train.low_res.size": 0, "train.augment.cutout": 0,
                "train.lr": 0.1, "train.warmup_epochs": 0.5, "train.log_every": 100, "train.label_smoothing": 0.0,
                "train.bias_lr_scale": 1.0, "train.averaging": "none", "evaluate.tta": 1, "evaluate.batch_size": 50}
    settings.update(overrides)
    for dotted, value in settings.items():
        set_dotted(params, dotted, value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def train_tiny(root: Path, epochs: int = 3) -> None:
    """Write the tiny data and params into `root` and train there: the stages read paths relative to the working
    directory, which is restored afterwards."""
    import os

    from stages.base.config import load_params
    from stages.train import train

    previous = Path.cwd()
    try:
        os.chdir(root)
        write_prepared(root)
        tiny_params(root, **{"train.epochs": epochs})
        train(load_params())
    finally:
        os.chdir(previous)

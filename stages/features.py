"""features: with train.cache_features, embed every training and validation image once with the frozen backbone
(train.model from train.pretrained or train.init, at its input_size and train.precision) into data/features/, so
that train fits only the classifier on those vectors. DVC caches the folder: head experiments (`dvc exp run -S
train.lr=...`) reuse it, and it is recomputed only when the images, the weights, the backbone's settings or the
flips change. The training images are embedded mirrored too when train.augment.flip is on; the test images too
(mirrored as well for evaluate.tta 2), so evaluate scores a head-only model without the backbone.

Without train.cache_features the stage only writes data/features/features.json saying so (DVC needs its output
either way), in well under a second."""

from __future__ import annotations

import time
from typing import Any

import torch

from stages.base.config import load_params
from stages.base.paths import (FEATURES_DIR, FEATURES_JSON, FEATURES_TEST, FEATURES_TRAIN, FEATURES_VAL, META_JSON,
                               TEST_SPLIT, TRAIN_SPLIT, VAL_SPLIT)
from stages.base.runtime import atomic_folder, log, read_json, run_stage, write_json
from stages.base.specs import model_config_of
from stages.model.embeddings import embed, expected_record
from stages.model.nets import build_model, inference_settings
from stages.model.precision import autocast_dtype, precision_name
from stages.model.tensors import load_split, pick_device, save_torch
from stages.model.weights import load_imagenet_weights, load_init_checkpoint


def features(params: dict[str, Any]) -> None:
    cfg = params["train"]
    if not cfg["cache_features"]:
        with atomic_folder(FEATURES_DIR) as folder:
            write_json(folder / FEATURES_JSON.name, {"cached": False})
        log("train.cache_features is false: nothing to embed")
        return
    device = pick_device()
    cfg = {**cfg, "precision_used": precision_name(autocast_dtype(cfg["precision"], device))}
    meta = read_json(META_JSON, "data summary")
    train_images, _ = load_split(TRAIN_SPLIT)
    val_images, _ = load_split(VAL_SPLIT)
    test_images, _ = load_split(TEST_SPLIT)
    model = build_model(cfg["model"], model_config_of(cfg), len(meta["classes"]), meta["image_size"], meta["mean"],
                        meta["std"])
    if cfg["pretrained"] != "none":
        load_imagenet_weights(model, cfg["model"], cfg["pretrained"])
    else:
        load_init_checkpoint(model, cfg["model"], model_config_of(cfg), meta["classes"], meta["image_size"],
                             cfg["init"])
    settings = inference_settings(cfg["model"], cfg, device)
    mirrored = cfg["augment"]["flip"] != "none"
    test_mirrored = params["evaluate"]["tta"] >= 2
    log(f"embedding {train_images.shape[0]} training images{' (plain and mirrored)' if mirrored else ''}, "
        f"{val_images.shape[0]} validation and {test_images.shape[0]} test images"
        f"{' (plain and mirrored)' if test_mirrored else ''} with {cfg['model']} at "
        f"{cfg[cfg['model']]['input_size']} px, precision {cfg['precision_used']}")
    start = time.perf_counter()
    train = {"plain": embed(model, train_images, settings),
             "mirrored": embed(model, train_images, settings, mirrored=True) if mirrored else None}
    val = {"plain": embed(model, val_images, settings)}
    test = {"plain": embed(model, test_images, settings),
            "mirrored": embed(model, test_images, settings, mirrored=True) if test_mirrored else None}
    seconds = time.perf_counter() - start
    with atomic_folder(FEATURES_DIR) as folder:
        save_torch(train, folder / FEATURES_TRAIN.name)
        save_torch(val, folder / FEATURES_VAL.name)
        save_torch(test, folder / FEATURES_TEST.name)
        record = expected_record(cfg, train_images.shape[0], val_images.shape[0])
        write_json(folder / FEATURES_JSON.name,
                   {**record, "test": {"images": test_images.shape[0], "mirrored": test_mirrored}})
    images = sum(view.shape[0] for split in (train, val, test) for view in split.values() if view is not None)
    log(f"saved {FEATURES_DIR}/ ({images} embeddings in {seconds:.1f}s, {images / max(seconds, 1e-9):,.0f} img/s)")


def main() -> None:
    features(load_params())


if __name__ == "__main__":
    run_stage(main)

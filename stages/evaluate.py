"""evaluate: score models/model.pth on the held-out test split (data/prepared/test.pt), with optional test-time
augmentation. Writes metrics/test.json (loss, accuracy), metrics/per_class.json and per_class.csv (per-class
accuracy), and metrics/predictions.csv (one row per test image: the data of DVC's confusion-matrix plot)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
import torch.nn.functional as F

from stages.common import PipelineError, load_checkpoint, load_split, log, pick_device, run_stage, write_json, write_text
from stages.config import load_params
from stages.models import CONV_NETS, autocast_dtype, infer, model_from_checkpoint

MODEL_PATH = Path("models/model.pth")
TEST_PATH = Path("data/prepared/test.pt")
METRICS_PATH = Path("metrics/test.json")
PER_CLASS_JSON = Path("metrics/per_class.json")
PER_CLASS_CSV = Path("metrics/per_class.csv")
PREDICTIONS_CSV = Path("metrics/predictions.csv")


def to_csv(header: list[str], rows: list[list[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def evaluate(params: dict) -> None:
    cfg = params["evaluate"]
    checkpoint = load_checkpoint(MODEL_PATH)
    images, labels = load_split(TEST_PATH)
    classes = checkpoint["classes"]
    if images.shape[0] == 0:
        raise PipelineError(f"{TEST_PATH}: the test split is empty")
    if images.shape[-1] != checkpoint["image_size"]:
        raise PipelineError(f"{TEST_PATH}: images are {images.shape[-1]} px but the model was trained on "
                            f"{checkpoint['image_size']} px; rerun the pipeline (dvc repro)")
    if int(labels.max()) >= len(classes):
        raise PipelineError(f"{TEST_PATH}: labels go up to {int(labels.max())} but the model knows {len(classes)} classes")

    device = pick_device()
    model = model_from_checkpoint(checkpoint)
    train_cfg = checkpoint.get("train") or {}
    channels_last = train_cfg.get("channels_last", False) and checkpoint["model"] in CONV_NETS
    if channels_last:
        model.to(memory_format=torch.channels_last)
    dtype = autocast_dtype(train_cfg.get("precision", "fp32"), device)
    logits = infer(model, images, cfg["batch_size"], cfg["tta"], device, dtype, channels_last)

    loss = F.cross_entropy(logits, labels).item()
    probabilities = logits.softmax(1)
    confidence, predicted = probabilities.max(1)
    correct = predicted == labels
    accuracy = correct.float().mean().item()

    per_class, per_class_rows = {}, []
    for index, name in enumerate(classes):
        mask = labels == index
        count = int(mask.sum())
        value = round(correct[mask].float().mean().item(), 6) if count else None
        per_class[name] = value
        per_class_rows.append([name, "" if value is None else value, count])

    write_json(METRICS_PATH, {"test": {"loss": round(loss, 6), "acc": round(accuracy, 6)}})
    write_json(PER_CLASS_JSON, {"test": {"per_class_acc": per_class}})
    write_text(PER_CLASS_CSV, to_csv(["class", "accuracy", "count"], per_class_rows))
    write_text(PREDICTIONS_CSV, to_csv(
        ["index", "actual", "predicted", "confidence"],
        [[i, classes[a], classes[p], f"{c:.6f}"] for i, (a, p, c) in
         enumerate(zip(labels.tolist(), predicted.tolist(), confidence.tolist()))]))
    log(f"test: loss {loss:.4f}  accuracy {accuracy:.4f}  ({images.shape[0]} images, tta {cfg['tta']})")
    for name, value in per_class.items():
        log(f"  accuracy of {name:>12s}: {'n/a' if value is None else f'{100 * value:.1f}%'}")


def main() -> None:
    evaluate(load_params())


if __name__ == "__main__":
    run_stage(main)

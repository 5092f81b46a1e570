"""evaluate: score models/model.pth on the held-out test split (data/prepared/test.pt), with optional test-time
augmentation. Writes metrics/test.json (loss, accuracy), metrics/per_class.json and per_class.csv (per-class
accuracy), and metrics/predictions.csv (one row per test image: the data of DVC's confusion-matrix plot)."""

from __future__ import annotations

import csv
import io

import torch.nn.functional as F

from stages.common import (PipelineError, load_checkpoint, load_split, log, pick_device, run_stage, write_json,
                           write_text)
from stages.config import load_params
from stages.models import infer, inference_settings, model_from_checkpoint
from stages.paths import MODEL_PATH, PER_CLASS_CSV, PER_CLASS_JSON, PREDICTIONS_CSV, TEST_METRICS, TEST_SPLIT


def to_csv(header: list[str], rows: list[list[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def evaluate(params: dict) -> None:
    cfg = params["evaluate"]
    checkpoint = load_checkpoint(MODEL_PATH)
    images, labels = load_split(TEST_SPLIT)
    classes = checkpoint["classes"]
    if images.shape[0] == 0:
        raise PipelineError(f"{TEST_SPLIT}: the test split is empty")
    if images.shape[-1] != checkpoint["image_size"]:
        raise PipelineError(f"{TEST_SPLIT}: images are {images.shape[-1]} px but the model was trained on "
                            f"{checkpoint['image_size']} px; rerun the pipeline (dvc repro)")
    if int(labels.max()) >= len(classes):
        raise PipelineError(f"{TEST_SPLIT}: labels go up to {int(labels.max())} but the model knows "
                            f"{len(classes)} classes")

    device = pick_device()
    model = model_from_checkpoint(checkpoint)
    settings = inference_settings(checkpoint["model"], checkpoint.get("train") or {}, device)
    logits = infer(model, images, batch_size=cfg["batch_size"], tta=cfg["tta"], settings=settings)

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

    write_json(TEST_METRICS, {"test": {"loss": round(loss, 6), "acc": round(accuracy, 6)}})
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

"""evaluate: score models/model.pth on the held-out test split (data/prepared/test.pt), with optional test-time
augmentation. Writes metrics/test.json (loss, accuracy, macro-F1, balanced accuracy, top-k accuracy, expected
calibration error), metrics/per_class.json and per_class.csv (per-class accuracy, precision, recall, F1, support),
metrics/predictions.csv (one row per test image: the data of DVC's confusion-matrix plot) and
metrics/calibration.csv (accuracy and mean confidence per non-empty ECE bin: the reliability plot's data).

The metrics follow scikit-learn's definitions (tests/test_evaluate.py checks them against it): a ratio with a zero
denominator (the precision of a class never predicted, the recall of a class without test images) is reported as
0, as scikit-learn's `zero_division=0`; the support column says which classes had no test images. Macro-F1 averages
the classes that occur among the labels or the predictions, balanced accuracy the classes that have test images
(stages/model/scores.py, which train shares for train.monitor: val_macro_f1)."""

from __future__ import annotations

import csv
import io

import torch
import torch.nn.functional as F

from stages.base.config import load_params
from stages.base.paths import (CALIBRATION_CSV, MODEL_PATH, PER_CLASS_CSV, PER_CLASS_JSON, PREDICTIONS_CSV,
                               TEST_METRICS, TEST_SPLIT)
from stages.base.runtime import PipelineError, log, run_stage, write_json, write_text
from stages.model.checkpoint import load_checkpoint
from stages.model.embeddings import cached_test_logits
from stages.model.health import one_class_warning
from stages.model.nets import infer, inference_settings, model_from_checkpoint
from stages.model.scores import ClassScores, class_scores, confusion_counts
from stages.model.tensors import load_split, pick_device

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (the usual choice since Guo et al.)


def to_csv(header: list[str], rows: list[list[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of images whose true class is among the k highest logits. Ties are broken as scikit-learn's
    top_k_accuracy_score does (the higher class index ranks first), so the number does not depend on topk's order."""
    true_score = logits.gather(1, labels.long()[:, None])
    higher_index = torch.arange(logits.shape[1])[None, :] > labels.long()[:, None]
    rank = (logits > true_score).sum(1) + ((logits == true_score) & higher_index).sum(1)
    return (rank < k).double().mean().item()


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Sum over equal-width bins (lo, hi] of the top-class probability: (images in bin / all images) x
    |accuracy in bin - mean confidence in bin|, which is |correct in bin - summed confidence in bin| / images."""
    confidence = confidence.double()
    inner_edges = torch.arange(1, bins, dtype=torch.float64) / bins  # i / bins exactly, as a reference would
    bin_index = torch.bucketize(confidence, inner_edges)  # right-closed bins: edge < value <= next edge
    confidence_sum = torch.bincount(bin_index, weights=confidence, minlength=bins)
    correct_sum = torch.bincount(bin_index, weights=correct.double(), minlength=bins)
    return ((correct_sum - confidence_sum).abs().sum() / confidence.numel()).item()


def calibration_rows(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> list[list[object]]:
    """One row per non-empty ECE bin (the same right-closed bins): bin number, its edges, images, their mean
    top-class probability and their accuracy. Empty bins are left out so that DVC's line plot has no gaps."""
    confidence = confidence.double()
    inner_edges = torch.arange(1, bins, dtype=torch.float64) / bins
    bin_index = torch.bucketize(confidence, inner_edges)
    images = torch.bincount(bin_index, minlength=bins)
    confidence_sum = torch.bincount(bin_index, weights=confidence, minlength=bins)
    correct_sum = torch.bincount(bin_index, weights=correct.double(), minlength=bins)
    return [[b, f"{b / bins:.6f}", f"{(b + 1) / bins:.6f}", int(images[b]),
             f"{confidence_sum[b].item() / int(images[b]):.6f}", f"{correct_sum[b].item() / int(images[b]):.6f}"]
            for b in range(bins) if int(images[b])]


def summary_metrics(logits: torch.Tensor, labels: torch.Tensor, scores: ClassScores, top_k: int) -> dict[str, float]:
    """The metrics added to test.json after loss and acc, rounded as those are; top-k is left out when there
    are no more than k classes (every image would count as a hit)."""
    confidence, predicted = logits.softmax(1).max(1)
    metrics = {"macro_f1": scores.macro_f1, "balanced_accuracy": scores.balanced_accuracy}
    if logits.shape[1] > top_k:
        metrics[f"top{top_k}_accuracy"] = top_k_accuracy(logits, labels, top_k)
    metrics["ece"] = expected_calibration_error(confidence, predicted == labels)
    return {key: round(value, 6) for key, value in metrics.items()}


def check_inputs(checkpoint: dict, images: torch.Tensor, labels: torch.Tensor) -> None:
    classes = checkpoint["classes"]
    if images.shape[0] == 0:
        raise PipelineError(f"{TEST_SPLIT}: the test split is empty")
    if images.shape[-1] != checkpoint["image_size"]:
        raise PipelineError(f"{TEST_SPLIT}: images are {images.shape[-1]} px but the model was trained on "
                            f"{checkpoint['image_size']} px; rerun the pipeline (dvc repro)")
    if int(labels.max()) >= len(classes):
        raise PipelineError(f"{TEST_SPLIT}: labels go up to {int(labels.max())} but the model knows "
                            f"{len(classes)} classes")


def write_per_class(classes: list[str], correct: torch.Tensor, labels: torch.Tensor, scores: ClassScores) -> None:
    """per_class.json and per_class.csv: accuracy (None / empty without test images) and count first (the
    per-class plot reads accuracy), then precision, recall, F1 and support."""
    accuracy = {}
    for index, name in enumerate(classes):
        mask = labels == index
        accuracy[name] = round(correct[mask].float().mean().item(), 6) if int(mask.sum()) else None
    columns = {"precision": scores.precision.tolist(), "recall": scores.recall.tolist(), "f1": scores.f1.tolist()}
    rounded = {key: [round(v, 6) for v in values] for key, values in columns.items()}
    support = scores.support.tolist()
    document = {"per_class_acc": accuracy}
    document.update({f"per_class_{key}": dict(zip(classes, values)) for key, values in rounded.items()})
    document["per_class_support"] = dict(zip(classes, support))
    write_json(PER_CLASS_JSON, {"test": document})
    rows = [[name, "" if accuracy[name] is None else accuracy[name], support[index],
             *(rounded[key][index] for key in columns), support[index]] for index, name in enumerate(classes)]
    write_text(PER_CLASS_CSV, to_csv(["class", "accuracy", "count", *columns, "support"], rows))


def evaluate(params: dict) -> None:
    cfg = params["evaluate"]
    checkpoint = load_checkpoint(MODEL_PATH)
    images, labels = load_split(TEST_SPLIT)
    classes = checkpoint["classes"]
    check_inputs(checkpoint, images, labels)

    device = pick_device()
    model = model_from_checkpoint(checkpoint)
    settings = inference_settings(checkpoint["model"], checkpoint.get("train") or {}, device)
    # a head trained on cached embeddings is scored on the cached test embeddings: no backbone work to rerun
    logits = cached_test_logits(checkpoint, model, cfg["tta"], images.shape[0], settings)
    if logits is None:
        logits = infer(model, images, batch_size=cfg["batch_size"], tta=cfg["tta"], settings=settings)

    loss = F.cross_entropy(logits, labels).item()
    probabilities = logits.softmax(1)
    confidence, predicted = probabilities.max(1)
    correct = predicted == labels
    accuracy = correct.float().mean().item()
    scores = class_scores(confusion_counts(labels, predicted, len(classes)))
    extra = summary_metrics(logits, labels, scores, cfg["top_k"])

    warning = one_class_warning("test", labels.tolist(), predicted.tolist(), classes)
    warnings = {"warnings": [warning]} if warning else {}  # only then: a healthy model's test.json keeps its bytes
    write_json(TEST_METRICS, {"test": {"loss": round(loss, 6), "acc": round(accuracy, 6), **extra, **warnings}})
    write_per_class(classes, correct, labels, scores)
    write_text(PREDICTIONS_CSV, to_csv(
        ["index", "actual", "predicted", "confidence"],
        [[i, classes[a], classes[p], f"{c:.6f}"] for i, (a, p, c) in
         enumerate(zip(labels.tolist(), predicted.tolist(), confidence.tolist()))]))
    write_text(CALIBRATION_CSV, to_csv(["bin", "lower", "upper", "images", "confidence", "accuracy"],
                                       calibration_rows(confidence, correct)))
    log(f"test: loss {loss:.4f}  accuracy {accuracy:.4f}  ({images.shape[0]} images, tta {cfg['tta']})")
    log_scores(classes, extra, scores)
    if warning:
        log(f"warning: {warning}")


def log_scores(classes: list[str], summary: dict[str, float], scores: ClassScores) -> None:
    """The new metrics and a per-class table; the recall column is the per-class accuracy."""
    log("  " + "  ".join(f"{key} {value:.4f}" for key, value in summary.items()))
    log(f"  {'class':>12s}  precision  recall      f1  support")
    for index, name in enumerate(classes):
        log(f"  {name:>12s}  {scores.precision[index].item():9.4f}  {scores.recall[index].item():6.4f}  "
            f"{scores.f1[index].item():6.4f}  {int(scores.support[index]):7d}")


def main() -> None:
    evaluate(load_params())


if __name__ == "__main__":
    run_stage(main)

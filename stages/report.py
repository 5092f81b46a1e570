"""report stage: reports/ (report.md, the same content as report.html, and figures) from what the earlier
stages wrote: metrics, checkpoint and prepared test split. The pages and figures are drawn by stages/render.

Sections: summary, metrics, a comparison with a baseline git revision (`report.baseline`, default main) when it
exists, training curves, confusion matrix, per-class accuracy, error analysis (most confused pairs, a reliability
diagram of evaluate's calibration bins, top losses), sample predictions, model, training parameters and data.
Same inputs -> same bytes: no timestamps, samples chosen by rule rather than at random. The folder is built aside
and swapped in at the end, so a failure leaves the previous report untouched. Class names are text whatever they
look like (`None`, `NA`, `00` are classes, not a missing value or a number).
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.base.config import load_params
from stages.base.paths import (CALIBRATION_CSV, HISTORY_CSV, META_JSON, MODEL_PATH, PER_CLASS_CSV, PREDICTIONS_CSV,
                               REPORT_DIR, TEST_METRICS, TEST_SPLIT, TRAIN_METRICS)
from stages.base.runtime import PipelineError, atomic_folder, log, read_json, run_stage
from stages.base.specs import MODELS
from stages.model.checkpoint import load_checkpoint
from stages.model.tensors import load_split
from stages.render.document import Document, flatten, format_delta, format_number, key_value_table
from stages.render.figures import (plot_confusion, plot_curves, plot_per_class, plot_reliability, plot_samples,
                                   top_loss_title)

CONFUSED_PAIRS_SHOWN = 10  # the table lists the most frequent mistakes; the confusion matrix has the rest
# test.json keys after loss and acc (written by evaluate), with the names the metrics table gives them; {bins} is
# the number of calibration bins, which evaluate sets (ECE_BINS)
EXTRA_TEST_METRICS = {"macro_f1": "test macro-F1", "balanced_accuracy": "test balanced accuracy",
                      "ece": "test expected calibration error ({bins} bins)"}


# ---------------------------------------------------------------- inputs


@dataclass
class Inputs:
    meta: dict[str, Any]
    checkpoint: dict[str, Any]
    classes: list[str]
    train_metrics: dict[str, Any]
    test_metrics: dict[str, Any]
    history: pd.DataFrame
    per_class: pd.DataFrame
    predictions: pd.DataFrame  # index, actual, predicted (class indices), confidence
    calibration: pd.DataFrame  # one row per confidence bin, empty ones included (read_calibration)
    images: Any  # uint8 tensor N x 3 x S x S


def read_csv(path: Path, what: str, columns: list[str], text_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV file an earlier stage wrote, which must have `columns`. The `text_columns` (class names) are read as
    written: pandas would read the classes `None` and `NA` as missing values and `00`, `01` as the numbers 0, 1."""
    if not path.is_file():
        raise PipelineError(f"{path}: {what} not found; run the stage that writes it first (dvc repro)")
    try:
        frame = pd.read_csv(path)
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise PipelineError(f"{path}: {what} lacks the column(s) {', '.join(missing)}; "
                                f"expected {', '.join(columns)}")
        if text_columns:
            text = pd.read_csv(path, usecols=list(text_columns), dtype=str, keep_default_na=False)
            for column in text_columns:
                frame[column] = text[column]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path}: {what} is not a readable CSV file ({error})") from None
    return frame


def read_inputs() -> Inputs:
    meta = read_json(META_JSON, "dataset metadata")
    checkpoint = load_checkpoint(MODEL_PATH)
    classes = [str(c) for c in checkpoint["classes"]]
    train_metrics = read_json(TRAIN_METRICS, "training metrics")
    test_metrics = read_json(TEST_METRICS, "test metrics")
    history = read_csv(HISTORY_CSV, "training history",
                       ["member", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1"])
    per_class = read_csv(PER_CLASS_CSV, "per-class metrics",
                         ["class", "accuracy", "count", "precision", "recall", "f1"], ("class",))
    predictions = read_csv(PREDICTIONS_CSV, "test predictions", ["index", "actual", "predicted", "confidence"],
                           ("actual", "predicted"))
    images, _labels = load_split(TEST_SPLIT)

    lookup = {name: i for i, name in enumerate(classes)}
    for column in ("actual", "predicted"):
        names = predictions[column].astype(str)
        unknown = sorted(set(names) - set(lookup))
        if unknown:
            raise PipelineError(f"{PREDICTIONS_CSV}: column {column!r} holds class names the model {MODEL_PATH} "
                                f"does not know: {', '.join(unknown[:5])}; rerun evaluate (dvc repro)")
        predictions[column] = names.map(lookup).astype("int64")
    if len(predictions) and (predictions["index"].min() < 0 or predictions["index"].max() >= len(images)):
        raise PipelineError(f"{PREDICTIONS_CSV}: image indices run outside the {len(images)} images of {TEST_SPLIT}; "
                            "the predictions are stale, rerun evaluate (dvc repro)")
    calibration = read_calibration(len(predictions))
    return Inputs(meta, checkpoint, classes, train_metrics, test_metrics, history, per_class, predictions,
                  calibration, images)


def read_calibration(test_images: int) -> pd.DataFrame:
    """evaluate's calibration bins, which it writes for non-empty bins only, as one row per bin: lower, upper,
    images, confidence (mean top-class probability) and accuracy; 0 images and NaN in an empty bin. The bin count
    follows from the bins' width, so evaluate's ECE_BINS is its one home."""
    frame = read_csv(CALIBRATION_CSV, "calibration bins", ["bin", "lower", "upper", "images", "confidence", "accuracy"])
    counted = int(frame["images"].sum())
    if frame.empty or counted != test_images:
        raise PipelineError(f"{CALIBRATION_CSV}: the bins hold {counted} test images but {PREDICTIONS_CSV} lists "
                            f"{test_images}; the files are stale, rerun evaluate (dvc repro)")
    width = float(frame["upper"].iloc[0] - frame["lower"].iloc[0])
    bins = round(1 / width) if 0.001 <= width <= 1 else 0  # edges are written to 6 decimals
    index = frame["bin"].to_numpy(dtype=np.int64)
    if not bins or index.min() < 0 or index.max() >= bins or len(set(index.tolist())) < len(index):
        raise PipelineError(f"{CALIBRATION_CSV}: the bins are not numbered 0..N-1 by their width; rerun evaluate "
                            "(dvc repro)")
    images = np.zeros(bins, dtype=np.int64)
    images[index] = frame["images"].to_numpy(dtype=np.int64)
    confidence, accuracy = np.full(bins, np.nan), np.full(bins, np.nan)
    confidence[index] = frame["confidence"].to_numpy(dtype=np.float64)
    accuracy[index] = frame["accuracy"].to_numpy(dtype=np.float64)
    return pd.DataFrame({"lower": np.arange(bins) / bins, "upper": np.arange(1, bins + 1) / bins,
                         "images": images, "confidence": confidence, "accuracy": accuracy})


# ---------------------------------------------------------------- what the sections show


def selection_records(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """Each member's model-selection record (stages/model/selection.py): the epoch kept and why. None when the
    checkpoint records no selection, which make_checkpoint allows (train always records one)."""
    selection = checkpoint.get("selection")
    return list(selection["members"]) if selection is not None else []


def choose_samples(predictions: pd.DataFrame, count: int) -> pd.DataFrame:
    """Round-robin over the true classes in test-split order: every class shows up before any repeats, and the
    choice depends only on the predictions file (no random state)."""
    ordered = predictions.sort_values("index", kind="stable")
    rank = ordered.groupby("actual", sort=True).cumcount()
    ordered = ordered.assign(_rank=rank.to_numpy())
    return ordered.sort_values(["_rank", "actual"], kind="stable").head(count).drop(columns="_rank")


def confusion_matrix(predictions: pd.DataFrame, n_classes: int) -> np.ndarray:
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (predictions["actual"].to_numpy(), predictions["predicted"].to_numpy()), 1)
    return matrix


def confused_pairs(matrix: np.ndarray, classes: list[str], limit: int = CONFUSED_PAIRS_SHOWN) -> pd.DataFrame:
    """The most frequent (true -> predicted) mistakes: count and the share of the true class's test images.
    Ties go to the lower true, then predicted, class index, so the table depends only on the matrix."""
    mistakes = matrix.copy()
    np.fill_diagonal(mistakes, 0)
    true_index, predicted_index = np.nonzero(mistakes)
    counts = mistakes[true_index, predicted_index]
    order = np.lexsort((predicted_index, true_index, -counts))[:limit]
    class_sizes = matrix.sum(axis=1)
    return pd.DataFrame({"true class": [classes[i] for i in true_index[order]],
                         "predicted as": [classes[j] for j in predicted_index[order]],
                         "test images": [format_number(int(c)) for c in counts[order]],
                         "share of the true class": [format_number(float(c) / float(class_sizes[i]))
                                                     for c, i in zip(counts[order], true_index[order])]})


def choose_top_losses(predictions: pd.DataFrame, count: int) -> pd.DataFrame:
    """The wrong predictions made with the highest confidence, ties in test-split order."""
    wrong = predictions[predictions["actual"] != predictions["predicted"]]
    ordered = wrong.assign(_confidence=-wrong["confidence"].astype(float))
    return ordered.sort_values(["_confidence", "index"], kind="stable").head(count).drop(columns="_confidence")


# ---------------------------------------------------------------- baseline comparison (git)


def run_git(*args: str) -> subprocess.CompletedProcess[str]:
    """git's exit status and output, never an exception for a failing command (the caller says why it failed)."""
    return subprocess.run(["git", *args], capture_output=True, text=True, check=False)


def baseline_metrics(revision: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """(commit id, {metrics file: its JSON at that commit}). Raises LookupError with the reason it cannot."""
    try:
        inside = run_git("rev-parse", "--is-inside-work-tree")
    except OSError:
        raise LookupError("git is not installed") from None
    if inside.returncode != 0:
        raise LookupError("this folder is not a git repository")
    resolved = run_git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    if resolved.returncode != 0:
        raise LookupError(f"git revision {revision!r} does not exist here")
    commit = resolved.stdout.strip()
    found: dict[str, dict[str, Any]] = {}
    for path in (TRAIN_METRICS, TEST_METRICS):
        shown = run_git("show", f"{commit}:./{path.as_posix()}")  # ./ = relative to the current folder
        if shown.returncode == 0:
            try:
                found[path.as_posix()] = json.loads(shown.stdout)
            except ValueError:
                continue
    if not found:
        raise LookupError(f"git revision {revision!r} holds no {TRAIN_METRICS} or {TEST_METRICS}")
    return commit, found


def comparison_table(baseline: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for file_name in (TEST_METRICS.as_posix(), TRAIN_METRICS.as_posix()):  # the test metrics matter most
        old, new = flatten(baseline.get(file_name, {})), flatten(current.get(file_name, {}))
        for metric in list(new) + [m for m in old if m not in new]:
            before, after = old.get(metric), new.get(metric)
            if isinstance(before, list) or isinstance(after, list):  # the warnings: the Warnings section has them
                continue
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (before, after))
            rows.append({"file": file_name, "metric": metric, "baseline": format_number(before),
                         "current": format_number(after), "delta": format_delta(after - before) if numeric else "—"})
    return pd.DataFrame(rows, columns=["file", "metric", "baseline", "current", "delta"])


def build_report(out_dir: Path, inputs: Inputs, samples: int, baseline: str | None) -> None:
    """The report's sections, in the order they appear; figures are written to out_dir beside the two pages."""
    classes = inputs.classes
    matrix = confusion_matrix(inputs.predictions, len(classes))
    doc = Document()
    summary_section(doc, inputs)
    warnings_section(doc, inputs)
    metrics_section(doc, inputs)
    baseline_section(doc, inputs, baseline)
    curves_section(doc, inputs.history, inputs.checkpoint, out_dir)
    confusion_section(doc, matrix, classes, out_dir)
    per_class_section(doc, inputs.per_class, matrix, classes, out_dir)
    confused_pairs_section(doc, matrix, classes)
    calibration_section(doc, inputs, out_dir)
    samples_section(doc, inputs, samples, out_dir)
    top_losses_section(doc, inputs, samples, out_dir)
    model_section(doc, inputs.checkpoint, classes)
    training_params_section(doc, inputs.checkpoint)
    pretrained_section(doc, inputs.checkpoint.get("pretrained"))
    data_section(doc, inputs.meta, classes)
    model_name = str(inputs.checkpoint["model"])
    (out_dir / "report.md").write_text(doc.markdown(), encoding="utf-8")
    (out_dir / "report.html").write_text(doc.html(f"Training report: {model_name}"), encoding="utf-8")


def warnings_section(doc: Document, inputs: Inputs) -> None:
    """What train and evaluate warned about (a model collapsed to one class, validation at chance): first, since
    every number below is then misleading. Nothing for a healthy run."""
    warnings = [f"Training: {w}" for w in inputs.train_metrics.get("warnings", [])]
    warnings += [f"Evaluation: {w}" for w in inputs.test_metrics.get("test", {}).get("warnings", [])]
    if warnings:
        doc.heading(2, "Warnings")
        for warning in warnings:
            doc.paragraph(f"**Warning.** {warning}")


def summary_section(doc: Document, inputs: Inputs) -> None:
    test = inputs.test_metrics.get("test", {})
    source = inputs.meta.get("source", {})
    doc.heading(1, "Training report")
    records = selection_records(inputs.checkpoint)
    kept = ""
    if any(r["kept_epoch"] != r["epochs_trained"] for r in records):  # train.keep: best chose an earlier one
        selection = inputs.checkpoint["selection"]
        kept = (f" (weights of epoch {', '.join(format_number(r['kept_epoch']) for r in records)}: "
                f"train.keep: {selection['keep']}, by {selection['monitor']})")
    epochs, size = format_number(inputs.train_metrics.get("epochs")), format_number(inputs.meta.get("image_size"))
    doc.paragraph(f"Model **{inputs.checkpoint['model']}** trained for {epochs} epochs{kept} on "
                  f"`{source.get('kind', '?')}` data ({len(inputs.classes)} classes, {size}×{size} images): "
                  f"test accuracy **{format_number(test.get('acc'))}**, test loss {format_number(test.get('loss'))}.")


def metrics_section(doc: Document, inputs: Inputs) -> None:
    test = inputs.test_metrics.get("test", {})
    doc.heading(2, "Metrics")
    headline: dict[str, Any] = {"test accuracy": test.get("acc"), "test loss": test.get("loss")}
    top_k = sorted(key for key in test if re.fullmatch(r"top\d+_accuracy", key))
    for key in top_k:
        headline[f"test top-{key[3:-9]} accuracy"] = test[key]
    bins = len(inputs.calibration)
    headline.update({label.format(bins=bins): test[key] for key, label in EXTRA_TEST_METRICS.items() if key in test})
    members = len(inputs.checkpoint["state_dicts"])
    # train.json holds the kept epoch's numbers (train.keep); an ensemble's val metrics score the whole
    # ensemble, its train metrics are the last member's
    records = selection_records(inputs.checkpoint)
    epoch = f"epoch {records[-1]['kept_epoch']}" if records else "last epoch"
    when = {"train": epoch if members == 1 else f"last member, {epoch}",
            "val": epoch if members == 1 else f"ensemble of {members}"}
    for split in ("train", "val"):
        if split in inputs.train_metrics:
            for key, name in (("acc", "accuracy"), ("loss", "loss"), ("macro_f1", "macro-F1")):
                if key in inputs.train_metrics[split]:
                    headline[f"{split} {name} ({when[split]})"] = inputs.train_metrics[split][key]
    headline["epochs trained"] = inputs.train_metrics.get("epochs")
    headline["test images"] = len(inputs.predictions)
    doc.table(key_value_table(headline, "metric", "value"))


def baseline_section(doc: Document, inputs: Inputs, baseline: str | None) -> None:
    title = f"Comparison with baseline `{baseline}`" if baseline else "Comparison with a baseline"
    doc.heading(2, title)
    if not baseline:
        doc.paragraph("No baseline comparison: `report.baseline` is not set.")
        return
    try:
        commit, old = baseline_metrics(baseline)
    except LookupError as reason:
        doc.paragraph(f"No baseline comparison: {reason}.")
        return
    current = {TRAIN_METRICS.as_posix(): inputs.train_metrics, TEST_METRICS.as_posix(): inputs.test_metrics}
    doc.paragraph(f"Baseline `{baseline}` is commit `{commit[:12]}`; delta = current − baseline.")
    doc.table(comparison_table(old, current))


def curves_section(doc: Document, history: pd.DataFrame, checkpoint: dict[str, Any], out_dir: Path) -> None:
    doc.heading(2, "Training curves")
    records = selection_records(checkpoint)
    plot_curves(history, out_dir / "curves.png",
                {index: int(r["kept_epoch"]) for index, r in enumerate(records, 1)})
    doc.image("curves.png", "Loss and accuracy per epoch, train and validation")
    for index, record in enumerate(records, 1):  # which epoch's weights the model holds, and why (train.keep)
        member = f" (member {index})" if len(records) > 1 else ""
        doc.paragraph(f"**Weights kept{member}:** epoch {format_number(record['kept_epoch'])} of "
                      f"{format_number(record['epochs_trained'])} trained; {record['reason']}.")


def confusion_section(doc: Document, matrix: np.ndarray, classes: list[str], out_dir: Path) -> None:
    doc.heading(2, "Confusion matrix (test)")
    plot_confusion(matrix, classes, out_dir / "confusion.png")
    doc.image("confusion.png", "Confusion matrix: true class by row, predicted class by column")


def per_class_section(doc: Document, per_class: pd.DataFrame, matrix: np.ndarray, classes: list[str],
                      out_dir: Path) -> None:
    doc.heading(2, "Per-class accuracy (test)")
    plot_per_class(per_class, out_dir / "per_class.png")
    doc.image("per_class.png", "Per-class test accuracy")
    doc.table(pd.DataFrame({"class": per_class["class"].astype(str),
                            "accuracy": [format_number(float(v)) for v in per_class["accuracy"]],
                            "test images": [format_number(v) for v in per_class["count"]],
                            # evaluate writes 0 where a ratio is undefined (never predicted / no test images)
                            **{name: [format_number(float(v)) for v in per_class[column]]
                               for name, column in (("precision", "precision"), ("recall", "recall"), ("F1", "f1"))},
                            "most often predicted instead": most_confused(per_class, matrix, classes)}))


def most_confused(per_class: pd.DataFrame, matrix: np.ndarray, classes: list[str]) -> list[str]:
    """Per row of the per-class table: the wrong class its test images were most often given, with the count."""
    lookup = {name: i for i, name in enumerate(classes)}
    confused = []
    for name in per_class["class"].astype(str):
        row = matrix[lookup[name]].copy() if name in lookup else None
        if row is None or row.sum() == 0:
            confused.append("—")
            continue
        row[lookup[name]] = 0
        worst = int(row.argmax())
        confused.append(f"{classes[worst]} ({int(row[worst])})" if row[worst] else "—")
    return confused


def samples_section(doc: Document, inputs: Inputs, samples: int, out_dir: Path) -> None:
    if samples <= 0:
        return
    chosen = choose_samples(inputs.predictions, samples)
    doc.heading(2, "Sample test predictions")
    plot_samples(chosen, inputs.images, inputs.classes, out_dir / "samples.png")
    wrong = int((chosen["actual"] != chosen["predicted"]).sum())
    doc.image("samples.png", "Sample test images with true and predicted class")
    doc.paragraph(f"{len(chosen)} test images, taken class by class in test-split order; "
                  f"titles in red are wrong predictions ({wrong} of {len(chosen)}).")


def confused_pairs_section(doc: Document, matrix: np.ndarray, classes: list[str]) -> None:
    doc.heading(2, "Most confused pairs (test)")
    pairs = confused_pairs(matrix, classes)
    mistakes = int(matrix.sum() - np.trace(matrix))
    if pairs.empty:
        doc.paragraph("No test image was misclassified.")
        return
    shown = f"the {len(pairs)} most frequent" if len(pairs) == CONFUSED_PAIRS_SHOWN else "all"
    doc.paragraph(f"{mistakes} misclassified test images; {shown} (true → predicted) pairs, with the share of "
                  "the true class's test images that went that way:")
    doc.table(pairs)


def calibration_section(doc: Document, inputs: Inputs, out_dir: Path) -> None:
    doc.heading(2, "Calibration (test)")
    table = inputs.calibration
    plot_reliability(table, out_dir / "reliability.png")
    doc.image("reliability.png",
              f"Reliability diagram: accuracy against confidence in {len(table)} bins, images per bin")
    ece = inputs.test_metrics.get("test", {}).get("ece")
    ece_text = f"Expected calibration error {format_number(ece)}: " if ece is not None else ""
    doc.paragraph(f"{ece_text}bars above the diagonal are under-confident, below it over-confident "
                  f"({len(table)} equal-width bins of the top-class probability; empty bins left out):")
    filled = table[table["images"] > 0]
    doc.table(pd.DataFrame({"confidence bin": [f"({lo:.3f}, {hi:.3f}]" for lo, hi in
                                               zip(filled["lower"], filled["upper"])],
                            "test images": [format_number(int(v)) for v in filled["images"]],
                            "mean confidence": [format_number(float(v)) for v in filled["confidence"]],
                            "accuracy": [format_number(float(v)) for v in filled["accuracy"]],
                            "accuracy − confidence": [format_delta(round(float(a - c), 4)) for a, c in
                                                      zip(filled["accuracy"], filled["confidence"])]}))


def top_losses_section(doc: Document, inputs: Inputs, samples: int, out_dir: Path) -> None:
    """The most confidently wrong test images, as many as report.samples."""
    if samples <= 0:
        return
    doc.heading(2, "Top losses (test)")
    chosen = choose_top_losses(inputs.predictions, samples)
    if chosen.empty:
        doc.paragraph("No test image was misclassified.")
        return
    plot_samples(chosen, inputs.images, inputs.classes, out_dir / "top_losses.png", top_loss_title, 3)
    doc.image("top_losses.png", "The most confidently wrong test images with true class, prediction and probability")
    doc.paragraph(f"The {len(chosen)} misclassified test images predicted with the highest probability "
                  "(p = the predicted class's probability), highest first:")
    doc.table(pd.DataFrame({"test image": [format_number(int(v)) for v in chosen["index"]],
                            "true class": [inputs.classes[i] for i in chosen["actual"]],
                            "predicted": [inputs.classes[i] for i in chosen["predicted"]],
                            "probability": [format_number(float(v)) for v in chosen["confidence"]]}))


def model_section(doc: Document, checkpoint: dict[str, Any], classes: list[str]) -> None:
    doc.heading(2, "Model")
    members = len(checkpoint["state_dicts"])
    n_params = sum(int(t.numel()) for t in checkpoint["state_dicts"][0].values() if hasattr(t, "numel"))
    model_info: dict[str, Any] = {"model": str(checkpoint["model"])}
    model_info.update({f"config.{k}": v if not isinstance(v, list) else str(v)
                       for k, v in flatten(checkpoint.get("model_config") or {}).items()})
    model_info["parameters (state_dict values)"] = n_params if members == 1 else f"{n_params} per member"
    if members > 1:
        model_info["ensemble members (logits averaged)"] = members
    model_info["input image size"] = checkpoint["image_size"]
    model_info["normalization mean"] = ", ".join(format_number(float(v)) for v in checkpoint["mean"])
    model_info["normalization std"] = ", ".join(format_number(float(v)) for v in checkpoint["std"])
    model_info["classes"] = ", ".join(classes)
    model_info["epochs completed"] = checkpoint.get("epochs_completed")
    records = selection_records(checkpoint)
    if records:
        model_info["weights from epoch"] = ", ".join(format_number(r["kept_epoch"]) for r in records)
    model_info["torch version"] = checkpoint.get("torch_version")
    doc.table(key_value_table(model_info, "item", "value"))


def training_params_section(doc: Document, checkpoint: dict[str, Any]) -> None:
    doc.heading(2, "Training parameters")
    model_name = str(checkpoint["model"])
    train_params = dict(checkpoint.get("train") or {})
    for other in MODELS:  # each model's own section; only the trained one's matters here
        if other != model_name:
            train_params.pop(other, None)
    flat = {f"train.{k}": (str(v) if isinstance(v, list) else v) for k, v in flatten(train_params).items()}
    if flat:
        doc.table(key_value_table(flat))
    else:
        doc.paragraph("The checkpoint records no training parameters.")


def pretrained_section(doc: Document, pretrained: dict[str, str] | None) -> None:
    doc.heading(2, "Pretrained weights")
    if pretrained:
        doc.table(key_value_table({"path": pretrained.get("path"), "SHA-256": pretrained.get("sha256")},
                                  "item", "value"))
    else:
        doc.paragraph("None: the model started from random initialisation.")


def data_section(doc: Document, meta: dict[str, Any], classes: list[str]) -> None:
    source = dict(meta.get("source", {}))
    summary: dict[str, Any] = {"source kind": source.pop("kind", "—"), "source": source.pop("source", "—")}
    for algorithm in ("md5", "sha256"):
        if algorithm in source:
            summary[f"checksum ({algorithm})"] = source.pop(algorithm)
    summary.update({f"source {k}": v for k, v in flatten(source).items()})
    summary["image size"] = meta.get("image_size")
    summary["normalization"] = meta.get("stats")
    summary["mean"] = ", ".join(format_number(float(v)) for v in meta.get("mean", []))
    summary["std"] = ", ".join(format_number(float(v)) for v in meta.get("std", []))
    for split, size in meta.get("splits", {}).items():
        summary[f"{split} images"] = size
    summary["skipped files"] = meta.get("skipped_count", len(meta.get("skipped", [])))
    doc.heading(2, "Data")
    doc.table(key_value_table(summary, "item", "value"))
    if meta.get("warning"):  # normalize's imbalance warning: accuracy alone would hide the small classes
        doc.paragraph(f"**Warning:** {meta['warning']}")

    counts = meta.get("counts", {})
    if counts:
        splits = list(counts)
        names = classes + sorted({c for s in splits for c in counts[s]} - set(classes))
        table = pd.DataFrame({"class": names})
        for split in splits:
            table[split] = [format_number(counts[split].get(name, 0)) for name in names]
        totals = {"class": "total", **{s: format_number(sum(counts[s].values())) for s in splits}}
        doc.paragraph("Images per class and split:")
        doc.table(pd.concat([table, pd.DataFrame([totals])], ignore_index=True))

    skipped = meta.get("skipped", [])
    if skipped:
        shown = skipped[:20]
        doc.paragraph(f"Files skipped while decoding ({len(skipped)}"
                      f"{', first 20 shown' if len(skipped) > 20 else ''}):")
        doc.table(pd.DataFrame({"file": [str(s.get("file", "")) for s in shown],
                                "reason": [str(s.get("reason", "")) for s in shown]}))


def report(params: dict[str, Any]) -> None:
    """Write reports/ from the outputs of the earlier stages; every input is read before the folder is built."""
    cfg = params["report"]
    inputs = read_inputs()
    with atomic_folder(REPORT_DIR) as built:
        build_report(built, inputs, int(cfg["samples"]), cfg["baseline"])
    log(f"report: wrote {REPORT_DIR / 'report.md'} and {REPORT_DIR / 'report.html'}")


def main() -> None:
    report(load_params())


if __name__ == "__main__":
    run_stage(main)


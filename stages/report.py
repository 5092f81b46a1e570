"""report stage: one folder, `reports/`, with a markdown report (and the same content as HTML) built from the
metrics, the checkpoint and the prepared test split: tables made with pandas, figures drawn with matplotlib
(training curves, confusion matrix, per-class accuracy, sample test predictions), error analysis (the most
confused class pairs, a reliability diagram, the most confidently wrong test images), and a comparison of the
metrics with a baseline git revision (`report.baseline`, default main) when that revision exists.

Everything is deterministic (same inputs -> same bytes): no timestamps, PNGs without the software tag, fixed
dpi, samples chosen by rule rather than at random. The folder is built in a temporary directory and swapped in
at the end, so a failure leaves the previous report untouched. Class names are text whatever they look like
(`None`, `NA`, `00` are classes, not a missing value or a number).
"""

from __future__ import annotations

import html
import json
import math
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before any figure is made: no display needed, and Agg output is reproducible

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from stages.common import (PipelineError, atomic_folder, load_checkpoint, load_split, log, read_json,  # noqa: E402
                           run_stage)
from stages.config import MODELS, load_params  # noqa: E402
from stages.paths import (HISTORY_CSV, META_JSON, MODEL_PATH, PER_CLASS_CSV, PER_CLASS_JSON,  # noqa: E402
                          PREDICTIONS_CSV, REPORT_DIR, TEST_METRICS, TEST_SPLIT, TRAIN_METRICS)

DPI = 100
# matplotlib writes "Software: matplotlib version ..." into PNGs by default; dropping it keeps the bytes equal
# across matplotlib patch releases that draw the same pixels.
PNG_METADATA = {"Software": None}
CORRECT_COLOR = "#1a7f37"
WRONG_COLOR = "#d1242f"
# The reliability diagram's bins: the same 15 equal-width, right-closed bins as evaluate's expected calibration error.
CALIBRATION_BINS = 15
CONFUSED_PAIRS_SHOWN = 10  # the table lists the most frequent mistakes; the confusion matrix has the rest
# test.json keys after loss and acc (written by evaluate), with the names the metrics table gives them
EXTRA_TEST_METRICS = {"macro_f1": "test macro-F1", "balanced_accuracy": "test balanced accuracy",
                      "ece": f"test expected calibration error ({CALIBRATION_BINS} bins)"}


# ---------------------------------------------------------------- the document: rendered to markdown and HTML


@dataclass
class Document:
    """A report as a list of blocks, so markdown and HTML are two renderings of the same content."""
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", (level, text)))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def table(self, frame: pd.DataFrame) -> None:
        self.blocks.append(("table", frame))

    def image(self, file_name: str, alt: str) -> None:
        self.blocks.append(("image", (file_name, alt)))

    def markdown(self) -> str:
        parts = []
        for kind, value in self.blocks:
            if kind == "heading":
                parts.append(f"{'#' * value[0]} {value[1]}")
            elif kind == "paragraph":
                parts.append(value)
            elif kind == "table":
                parts.append(markdown_table(value))
            else:
                parts.append(f"![{value[1]}]({value[0]})")
        return "\n\n".join(parts) + "\n"

    def html(self, title: str) -> str:
        body = []
        for kind, value in self.blocks:
            if kind == "heading":
                body.append(f"<h{value[0]}>{inline_html(value[1])}</h{value[0]}>")
            elif kind == "paragraph":
                body.append(f"<p>{inline_html(value)}</p>")
            elif kind == "table":
                body.append(value.to_html(index=False, border=0, classes="table", escape=True))
            else:
                body.append(f'<p><img src="{html.escape(value[0])}" alt="{html.escape(value[1])}"></p>')
        style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:0.5em 0}th,td{border:1px solid #ccc;padding:0.2em 0.6em;"
                 "text-align:left}th{background:#f4f4f4}img{max-width:100%}code{background:#f4f4f4}")
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<title>{html.escape(title)}</title>\n<style>{style}</style>\n</head>\n<body>\n"
                + "\n".join(body) + "\n</body>\n</html>\n")


def inline_html(text: str) -> str:
    """The two bits of inline markdown the report uses (`code` and **bold**), escaped for HTML."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def markdown_table(frame: pd.DataFrame) -> str:
    # Hand-rolled because DataFrame.to_markdown needs the optional `tabulate` package.
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "| " + " | ".join("---" for _ in frame.columns) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def fmt(value: Any) -> str:
    """One number format for every table, so markdown and HTML agree and the bytes never depend on repr()."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if 0 < abs(value) < 1e-3:
        return f"{value:.3g}"  # weight decays and learning rates like 5e-05 would otherwise read 0.0000
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"


def fmt_delta(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        return f"{value:+.3g}"
    return f"{value:+.1f}" if abs(value) >= 100 else f"{value:+.4f}"


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def key_value_table(mapping: dict[str, Any], key: str = "parameter", value: str = "value") -> pd.DataFrame:
    return pd.DataFrame({key: list(mapping), value: [fmt(v) for v in mapping.values()]})


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
    read_json(PER_CLASS_JSON, "per-class metrics")  # a dependency of the stage: fail early if it is missing
    history = read_csv(HISTORY_CSV, "training history", ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"])
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
    return Inputs(meta, checkpoint, classes, train_metrics, test_metrics, history, per_class, predictions, images)


# ---------------------------------------------------------------- figures


def save_figure(figure: Figure, path: Path) -> None:
    figure.savefig(path, format="png", dpi=DPI, metadata=PNG_METADATA)


def selection_records(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """Each member's model-selection record (stages/selection.py): the epoch kept and why; none in checkpoints
    written before train.keep."""
    selection = checkpoint.get("selection")
    members = selection.get("members") if isinstance(selection, dict) else None
    return [m for m in members if isinstance(m, dict)] if isinstance(members, list) else []


def plot_curves(history: pd.DataFrame, path: Path, kept: dict[int, int]) -> None:
    """Loss, and accuracy with the validation macro-F1, per epoch; a dotted line at the epoch each member kept
    (`kept`: member -> epoch) when it is not the last one trained."""
    figure = Figure(figsize=(10, 4))
    curves = (("loss", "cross-entropy loss", (("train_loss", "train", "-o"), ("val_loss", "val", "--s"))),
              ("acc", "accuracy", (("train_acc", "train", "-o"), ("val_acc", "val", "--s"),
                                   ("val_macro_f1", "val macro-F1", ":^"))))
    for axes, (metric, label, columns) in zip(figure.subplots(1, 2), curves):
        # one line per ensemble member (histories before train.ensemble have no member column)
        members = history.groupby("member", sort=True) if "member" in history else [(1, history)]
        for member, rows in members:
            for column, name, style in columns:
                if column not in rows:  # histories before val_macro_f1
                    continue
                values = pd.to_numeric(rows[column], errors="coerce")
                if values.notna().any():
                    label_text = name if len(members) == 1 else f"{name}, member {member}"
                    axes.plot(rows["epoch"], values, style, markersize=3, label=label_text)
            epoch = kept.get(int(member))
            if epoch is not None and epoch != int(rows["epoch"].max()):
                axes.axvline(epoch, color="grey", linestyle=":", linewidth=1,
                             label=f"kept: epoch {epoch}" + ("" if len(members) == 1 else f", member {member}"))
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # no 1.2, 1.4 ... ticks for a 2-epoch run
        axes.set_ylabel(label)
        axes.set_title(f"{label.capitalize()} per epoch")
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend()
    figure.tight_layout()
    save_figure(figure, path)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    n = len(classes)
    side = min(4 + 0.55 * n, 24)
    figure = Figure(figsize=(side, side * 0.9))
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    colorbar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    colorbar.locator = MaxNLocator(integer=True)
    colorbar.update_ticks()
    axes.set_xticks(range(n), [short(c) for c in classes], rotation=45, ha="right")
    axes.set_yticks(range(n), [short(c) for c in classes])
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title("Confusion matrix (test, counts)")
    if n <= 30:  # beyond that the numbers no longer fit in the cells
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in range(n):
            for j in range(n):
                axes.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=8,
                          color="white" if matrix[i, j] > threshold else "black")
    figure.tight_layout()
    save_figure(figure, path)


def plot_per_class(per_class: pd.DataFrame, path: Path) -> None:
    n = len(per_class)
    figure = Figure(figsize=(7, min(1.5 + 0.35 * n, 30)))
    axes = figure.subplots()
    positions = np.arange(n)
    accuracy = per_class["accuracy"].to_numpy(dtype=float)
    axes.barh(positions, accuracy, color="#4c72b0")
    axes.set_yticks(positions, [short(c) for c in per_class["class"].astype(str)])
    axes.invert_yaxis()  # first class on top, as in the tables
    axes.set_xlim(0, 1.08)
    axes.set_xlabel("accuracy")
    axes.set_title("Per-class test accuracy")
    for y, value in zip(positions, accuracy):
        label = "no test images" if math.isnan(value) else f"{value:.3f}"
        axes.text(0.01 if math.isnan(value) else min(value, 1.0) + 0.01, y, label, va="center", fontsize=8)
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)


def choose_samples(predictions: pd.DataFrame, count: int) -> pd.DataFrame:
    """Round-robin over the true classes in test-split order: every class shows up before any repeats, and the
    choice depends only on the predictions file (no random state)."""
    ordered = predictions.sort_values("index", kind="stable")
    rank = ordered.groupby("actual", sort=True).cumcount()
    ordered = ordered.assign(_rank=rank.to_numpy())
    return ordered.sort_values(["_rank", "actual"], kind="stable").head(count).drop(columns="_rank")


def sample_title(row: Any, classes: list[str]) -> str:
    return f"true: {short(classes[row.actual])}\npred: {short(classes[row.predicted])}"


def top_loss_title(row: Any, classes: list[str]) -> str:
    return f"{sample_title(row, classes)}\np = {float(row.confidence):.3f}"


def plot_samples(samples: pd.DataFrame, images: Any, classes: list[str], path: Path,
                 title: Callable[[Any, list[str]], str] = sample_title, title_lines: int = 2) -> None:
    count = len(samples)
    columns = min(count, 8)
    rows = math.ceil(count / columns)
    row_height = 2.1 + 0.2 * (title_lines - 2)  # room for a third title line (the top losses' probability)
    figure = Figure(figsize=(1.7 * columns, row_height * rows), layout="constrained")  # titles off the row above
    grid = np.atleast_1d(figure.subplots(rows, columns, squeeze=False).ravel())
    for axes in grid:
        axes.axis("off")
    for axes, row in zip(grid, samples.itertuples(index=False)):
        picture = images[int(row.index)].permute(1, 2, 0).numpy()
        axes.imshow(picture, interpolation="nearest")
        right = row.actual == row.predicted
        axes.set_title(title(row, classes), fontsize=8, color=CORRECT_COLOR if right else WRONG_COLOR)
    save_figure(figure, path)


def calibration_table(predictions: pd.DataFrame, bins: int = CALIBRATION_BINS) -> pd.DataFrame:
    """One row per equal-width confidence bin (lo, hi]: test images, their mean top-class probability and their
    accuracy (NaN for an empty bin). Bins as evaluate's ECE: a confidence on an edge belongs to the lower bin."""
    confidence = predictions["confidence"].to_numpy(dtype=np.float64)
    correct = (predictions["actual"] == predictions["predicted"]).to_numpy(dtype=np.float64)
    inner_edges = np.arange(1, bins, dtype=np.float64) / bins
    bin_index = np.searchsorted(inner_edges, confidence, side="left")  # = torch.bucketize(right=False)
    images = np.bincount(bin_index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty bins: NaN, drawn as no bar
        mean_confidence = np.bincount(bin_index, weights=confidence, minlength=bins) / images
        accuracy = np.bincount(bin_index, weights=correct, minlength=bins) / images
    return pd.DataFrame({"lower": np.arange(bins) / bins, "upper": np.arange(1, bins + 1) / bins,
                         "images": images, "confidence": mean_confidence, "accuracy": accuracy})


def plot_reliability(table: pd.DataFrame, path: Path) -> None:
    """Accuracy per confidence bin against the diagonal of perfect calibration, with the images per bin below."""
    figure = Figure(figsize=(6, 6.5))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = float(table["upper"].iloc[0] - table["lower"].iloc[0])
    centres = ((table["lower"] + table["upper"]) / 2).to_numpy()
    filled = table["images"].to_numpy() > 0
    top.plot([0, 1], [0, 1], "--", color="#888888", label="perfect calibration")
    top.bar(centres[filled], table["accuracy"].to_numpy()[filled], width=width * 0.95, color="#4c72b0",
            edgecolor="#2a4a80", label="accuracy in bin")
    top.plot(table["confidence"].to_numpy()[filled], table["accuracy"].to_numpy()[filled], "o",
             color=WRONG_COLOR, markersize=4, label="(mean confidence, accuracy)")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.18)  # headroom above accuracy 1 for the legend, so it covers no bar
    top.set_ylabel("accuracy")
    top.set_title("Reliability diagram (test)")
    top.grid(alpha=0.3)
    top.legend(loc="upper center", ncol=3, fontsize=7)
    bottom.bar(centres, table["images"].to_numpy(), width=width * 0.95, color="#999999")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    bottom.set_xlabel("confidence (top-class probability)")
    bottom.set_ylabel("test images")
    bottom.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)


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
                         "test images": [fmt(int(c)) for c in counts[order]],
                         "share of the true class": [fmt(float(c) / float(class_sizes[i]))
                                                     for c, i in zip(counts[order], true_index[order])]})


def choose_top_losses(predictions: pd.DataFrame, count: int) -> pd.DataFrame:
    """The wrong predictions made with the highest confidence, ties in test-split order."""
    wrong = predictions[predictions["actual"] != predictions["predicted"]]
    ordered = wrong.assign(_confidence=-wrong["confidence"].astype(float))
    return ordered.sort_values(["_confidence", "index"], kind="stable").head(count).drop(columns="_confidence")


def short(name: str, limit: int = 14) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


# ---------------------------------------------------------------- baseline comparison (git)


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=False)


def baseline_metrics(revision: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """(commit id, {metrics file: its JSON at that commit}). Raises LookupError with the reason it cannot."""
    try:
        inside = git("rev-parse", "--is-inside-work-tree")
    except OSError:
        raise LookupError("git is not installed") from None
    if inside.returncode != 0:
        raise LookupError("this folder is not a git repository")
    resolved = git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    if resolved.returncode != 0:
        raise LookupError(f"git revision {revision!r} does not exist here")
    commit = resolved.stdout.strip()
    found: dict[str, dict[str, Any]] = {}
    for path in (TRAIN_METRICS, TEST_METRICS):
        shown = git("show", f"{commit}:./{path.as_posix()}")  # ./ = relative to the current folder
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
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (before, after))
            rows.append({"file": file_name, "metric": metric, "baseline": fmt(before), "current": fmt(after),
                         "delta": fmt_delta(after - before) if numeric else "—"})
    return pd.DataFrame(rows, columns=["file", "metric", "baseline", "current", "delta"])


# ---------------------------------------------------------------- the report


def confusion_matrix(predictions: pd.DataFrame, n_classes: int) -> np.ndarray:
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (predictions["actual"].to_numpy(), predictions["predicted"].to_numpy()), 1)
    return matrix


def build_report(out_dir: Path, inputs: Inputs, samples: int, baseline: str | None) -> None:
    """The report's sections, in the order they appear; figures are written to out_dir beside the two pages."""
    classes = inputs.classes
    matrix = confusion_matrix(inputs.predictions, len(classes))
    doc = Document()
    summary_section(doc, inputs)
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


def summary_section(doc: Document, inputs: Inputs) -> None:
    test = inputs.test_metrics.get("test", {})
    source = inputs.meta.get("source", {})
    doc.heading(1, "Training report")
    records = selection_records(inputs.checkpoint)
    kept = ""
    if any(r.get("kept_epoch") != r.get("epochs_trained") for r in records):  # train.keep: best chose an earlier one
        selection = inputs.checkpoint["selection"]
        kept = (f" (weights of epoch {', '.join(fmt(r.get('kept_epoch')) for r in records)}: "
                f"train.keep: {selection.get('keep')}, by {selection.get('monitor')})")
    doc.paragraph(f"Model **{inputs.checkpoint['model']}** trained for {fmt(inputs.train_metrics.get('epochs'))} "
                  f"epochs{kept} on `{source.get('kind', '?')}` data ({len(inputs.classes)} classes, "
                  f"{fmt(inputs.meta.get('image_size'))}×{fmt(inputs.meta.get('image_size'))} images): "
                  f"test accuracy **{fmt(test.get('acc'))}**, test loss {fmt(test.get('loss'))}.")


def metrics_section(doc: Document, inputs: Inputs) -> None:
    test = inputs.test_metrics.get("test", {})
    doc.heading(2, "Metrics")
    headline: dict[str, Any] = {"test accuracy": test.get("acc"), "test loss": test.get("loss")}
    top_k = sorted(key for key in test if re.fullmatch(r"top\d+_accuracy", key))
    for key in top_k:
        headline[f"test top-{key[3:-9]} accuracy"] = test[key]
    headline.update({label: test[key] for key, label in EXTRA_TEST_METRICS.items() if key in test})
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
                {index: int(r["kept_epoch"]) for index, r in enumerate(records, 1) if "kept_epoch" in r})
    doc.image("curves.png", "Loss and accuracy per epoch, train and validation")
    for index, record in enumerate(records, 1):  # which epoch's weights the model holds, and why (train.keep)
        member = f" (member {index})" if len(records) > 1 else ""
        doc.paragraph(f"**Weights kept{member}:** epoch {fmt(record.get('kept_epoch'))} of "
                      f"{fmt(record.get('epochs_trained'))} trained; {record.get('reason', '')}.")


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
                            "accuracy": [fmt(float(v)) for v in per_class["accuracy"]],
                            "test images": [fmt(v) for v in per_class["count"]],
                            # evaluate writes 0 where a ratio is undefined (never predicted / no test images)
                            **{name: [fmt(float(v)) for v in per_class[column]]
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
    if samples <= 0 or not len(inputs.predictions):
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
    if not len(inputs.predictions):
        return
    doc.heading(2, "Calibration (test)")
    table = calibration_table(inputs.predictions)
    plot_reliability(table, out_dir / "reliability.png")
    doc.image("reliability.png", "Reliability diagram: accuracy against confidence in 15 bins, images per bin")
    ece = inputs.test_metrics.get("test", {}).get("ece")
    ece_text = f"Expected calibration error {fmt(ece)}: " if ece is not None else ""
    doc.paragraph(f"{ece_text}bars above the diagonal are under-confident, below it over-confident "
                  f"({CALIBRATION_BINS} equal-width bins of the top-class probability; empty bins left out):")
    filled = table[table["images"] > 0]
    doc.table(pd.DataFrame({"confidence bin": [f"({lo:.3f}, {hi:.3f}]" for lo, hi in
                                               zip(filled["lower"], filled["upper"])],
                            "test images": [fmt(int(v)) for v in filled["images"]],
                            "mean confidence": [fmt(float(v)) for v in filled["confidence"]],
                            "accuracy": [fmt(float(v)) for v in filled["accuracy"]],
                            "accuracy − confidence": [fmt_delta(round(float(a - c), 4)) for a, c in
                                                      zip(filled["accuracy"], filled["confidence"])]}))


def top_losses_section(doc: Document, inputs: Inputs, samples: int, out_dir: Path) -> None:
    """The most confidently wrong test images, as many as report.samples."""
    if samples <= 0 or not len(inputs.predictions):
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
    doc.table(pd.DataFrame({"test image": [fmt(int(v)) for v in chosen["index"]],
                            "true class": [inputs.classes[i] for i in chosen["actual"]],
                            "predicted": [inputs.classes[i] for i in chosen["predicted"]],
                            "probability": [fmt(float(v)) for v in chosen["confidence"]]}))


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
    model_info["normalization mean"] = ", ".join(fmt(float(v)) for v in checkpoint["mean"])
    model_info["normalization std"] = ", ".join(fmt(float(v)) for v in checkpoint["std"])
    model_info["classes"] = ", ".join(classes)
    model_info["epochs completed"] = checkpoint.get("epochs_completed")
    records = selection_records(checkpoint)
    if records:
        model_info["weights from epoch"] = ", ".join(fmt(r.get("kept_epoch")) for r in records)
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
    summary["mean"] = ", ".join(fmt(float(v)) for v in meta.get("mean", []))
    summary["std"] = ", ".join(fmt(float(v)) for v in meta.get("std", []))
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
            table[split] = [fmt(counts[split].get(name, 0)) for name in names]
        totals = {"class": "total", **{s: fmt(sum(counts[s].values())) for s in splits}}
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
    settings = params["report"]
    inputs = read_inputs()
    with atomic_folder(REPORT_DIR) as built:
        build_report(built, inputs, int(settings["samples"]), settings["baseline"])
    log(f"report: wrote {REPORT_DIR / 'report.md'} and {REPORT_DIR / 'report.html'}")


def main() -> None:
    report(load_params())


if __name__ == "__main__":
    run_stage(main)

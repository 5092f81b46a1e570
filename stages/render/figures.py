"""The report's figures as deterministic PNGs: training curves, confusion matrix, per-class accuracy, sample
images and the reliability diagram.

Same data -> same bytes: a fixed dpi, no software tag, no timestamps. Every figure is a matplotlib.figure.Figure
saved by its own canvas, so no pyplot state and no chosen backend are involved (matplotlib >= 3.1 needs none).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
# matplotlib writes "Software: matplotlib version ..." into PNGs by default; dropping it keeps the bytes equal
# across matplotlib patch releases that draw the same pixels.
PNG_METADATA = {"Software": None}
CORRECT_COLOR = "#1a7f37"
WRONG_COLOR = "#d1242f"


def save_figure(figure: Figure, path: Path) -> None:
    figure.savefig(path, format="png", dpi=DPI, metadata=PNG_METADATA)


def short_label(name: str, limit: int = 14) -> str:
    """A class name cut to fit a tick label or a sample's title."""
    return name if len(name) <= limit else name[: limit - 1] + "…"


def plot_curves(history: pd.DataFrame, path: Path, kept: dict[int, int]) -> None:
    """Loss, and accuracy with the validation macro-F1, per epoch and member; a dotted line at the epoch each
    member kept (`kept`: member -> epoch) when it is not the last one trained."""
    figure = Figure(figsize=(10, 4))
    curves = (("loss", "cross-entropy loss", (("train_loss", "train", "-o"), ("val_loss", "val", "--s"))),
              ("acc", "accuracy", (("train_acc", "train", "-o"), ("val_acc", "val", "--s"),
                                   ("val_macro_f1", "val macro-F1", ":^"))))
    for axes, (metric, label, columns) in zip(figure.subplots(1, 2), curves):
        members = history.groupby("member", sort=True)
        for member, rows in members:
            for column, name, style in columns:
                values = pd.to_numeric(rows[column], errors="coerce")
                if values.notna().any():  # no validation split: the val columns are empty
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
    axes.set_xticks(range(n), [short_label(c) for c in classes], rotation=45, ha="right")
    axes.set_yticks(range(n), [short_label(c) for c in classes])
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
    axes.set_yticks(positions, [short_label(c) for c in per_class["class"].astype(str)])
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


def sample_title(row: Any, classes: list[str]) -> str:
    return f"true: {short_label(classes[row.actual])}\npred: {short_label(classes[row.predicted])}"


def top_loss_title(row: Any, classes: list[str]) -> str:
    return f"{sample_title(row, classes)}\np = {float(row.confidence):.3f}"


def plot_samples(samples: pd.DataFrame, images: Any, classes: list[str], path: Path,
                 title: Callable[[Any, list[str]], str] = sample_title, title_lines: int = 2) -> None:
    """The test images of `samples` (rows of predictions.csv, classes as indices) in a grid of up to 8 columns,
    each titled by `title`: green when the prediction is right, red when wrong."""
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


def plot_reliability(table: pd.DataFrame, path: Path) -> None:
    """Accuracy per confidence bin against the diagonal of perfect calibration, with the images per bin below.
    `table` has one row per bin, empty ones included (images 0, NaN confidence and accuracy): lower, upper,
    images, confidence, accuracy."""
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

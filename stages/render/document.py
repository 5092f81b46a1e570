"""The report's document model, rendered to markdown and HTML, and the one number format of its tables.

A report is a list of blocks (headings, paragraphs, tables, images), so the two pages are two renderings of the
same content. Numbers become text here and nowhere else, so markdown and HTML agree and the bytes never depend on
repr().
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


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
    """A pipe table of cells that are already text. Not DataFrame.to_markdown: that needs `tabulate`, which the
    pipeline does not install (only tools/ use it), and pads columns by its own rules."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "| " + " | ".join("---" for _ in frame.columns) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def format_number(value: Any) -> str:
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


def format_delta(value: float) -> str:
    """A difference in format_number's precision, always signed; exactly 0 reads 0."""
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        return f"{value:+.3g}"
    return f"{value:+.1f}" if abs(value) >= 100 else f"{value:+.4f}"


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys (train.augment.flip), one table row each."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def key_value_table(mapping: dict[str, Any], key: str = "parameter", value: str = "value") -> pd.DataFrame:
    return pd.DataFrame({key: list(mapping), value: [format_number(v) for v in mapping.values()]})

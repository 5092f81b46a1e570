"""Summarize a hyperparameter sweep: every experiment of `dvc exp show --json` as one row (the params that
differ between them, and the metrics), written as a markdown table and a figure of the metric against the
swept params.

    dvc exp run --queue -S 'train.lr=0.05,0.1,0.2' -S 'train.epochs=5,10' && dvc queue start -j 1
    python tools/sweep_summary.py                   # -> reports/sweep/sweep.md, sweep.png
    python tools/sweep_summary.py --metric test.loss --lower-is-better --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def revision_records(node: Any) -> Iterator[dict[str, Any]]:
    """Every revision record in `dvc exp show --json` (experiments are nested under their baseline commit)."""
    if isinstance(node, dict):
        if isinstance(node.get("data"), dict) and "params" in node["data"]:
            yield node
        for value in node.values():
            yield from revision_records(value)
    elif isinstance(node, list):
        for value in node:
            yield from revision_records(value)


def flatten(values: Any, prefix: str, row: dict[str, Any]) -> None:
    if isinstance(values, dict):
        for key, value in values.items():
            flatten(value, f"{prefix}.{key}" if prefix else str(key), row)
    elif not isinstance(values, list):
        row[prefix] = values


def experiments_table(show_json: Any) -> pd.DataFrame:
    """One row per experiment (the baseline commits included, the workspace left out)."""
    rows = []
    for record in revision_records(show_json):
        if record.get("rev") == "workspace":
            continue
        data = record["data"]
        row: dict[str, Any] = {"experiment": record.get("name") or data.get("name") or str(record.get("rev"))[:7]}
        for content in data.get("params", {}).values():
            flatten(content.get("data", {}), "", row)
        for content in data.get("metrics", {}).values():
            flatten(content.get("data", {}), "", row)
        rows.append(row)
    return pd.DataFrame(rows).drop_duplicates(subset="experiment").reset_index(drop=True)


def summarize(table: pd.DataFrame, metric: str, higher_is_better: bool, out: Path) -> tuple[Path, Path]:
    if table.empty:
        raise SystemExit("error: no experiments found (run a sweep first: dvc exp run --queue -S ...)")
    if metric not in table:
        numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
        raise SystemExit(f"error: no metric {metric!r} in the experiments; numeric columns: {', '.join(numeric)}")
    params = [c for c in table.columns if c.split(".")[0] in ("data", "normalize", "train", "evaluate", "report")]
    swept = [c for c in params if table[c].astype(str).nunique() > 1]
    metrics = [c for c in table.columns if c not in params and c != "experiment"]
    ordered = table[["experiment", *swept, *metrics]].sort_values(metric, ascending=not higher_is_better)
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / "sweep.md"
    markdown.write_text(f"# Sweep: {metric} by {', '.join(swept) or 'experiment'}\n\n"
                        + ordered.to_markdown(index=False, floatfmt=".4g") + "\n")

    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    if swept and pd.api.types.is_numeric_dtype(table[swept[0]]):
        groups = table.groupby(swept[1:]) if len(swept) > 1 else [(None, table)]
        for key, group in groups:
            group = group.sort_values(swept[0])
            label = None if key is None else ", ".join(f"{n}={v}" for n, v in
                                                        zip(swept[1:], key if isinstance(key, tuple) else (key,)))
            axes.plot(group[swept[0]], group[metric], marker="o", label=label)
        axes.set_xlabel(swept[0])
        if len(swept) > 1:
            axes.legend(fontsize=8)
    else:
        axes.barh(ordered["experiment"].astype(str), ordered[metric])
        axes.set_xlabel(metric)
    axes.set_ylabel(metric if swept else "experiment")
    axes.set_title(f"{metric} per experiment")
    figure.tight_layout()
    picture = out / "sweep.png"
    figure.savefig(picture, metadata={"Software": None})
    plt.close(figure)
    return markdown, picture


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metric", default="test.acc", help="metric to rank by (default test.acc)")
    parser.add_argument("--lower-is-better", action="store_true", help="rank ascending (for a loss)")
    parser.add_argument("--out", type=Path, default=Path("reports/sweep"), help="output folder")
    parser.add_argument("--json", type=Path, help="read this `dvc exp show --json` output instead of running dvc")
    args = parser.parse_args(argv)
    if args.json:
        shown = json.loads(args.json.read_text())
    else:
        result = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"error: dvc exp show failed: {result.stderr.strip()}")
        shown = json.loads(result.stdout)
    markdown, picture = summarize(experiments_table(shown), args.metric, not args.lower_is_better, args.out)
    print(markdown.read_text())
    print(f"wrote {markdown} and {picture}", file=sys.stderr)


if __name__ == "__main__":
    main()

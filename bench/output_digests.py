"""MD5 of every output of the whole pipeline for a few fixed synthetic configurations, so a refactoring can show
that it changed no byte: run it before and after, and compare the tables.

    python bench/output_digests.py [--keep DIR] > digests.txt

Each configuration runs every stage (`python -m stages.<name>`, as dvc.yaml runs them) in a scratch copy of the
repository's stages/ and params.yaml, on data it makes itself (the synthetic source, or a generated PNG folder of
mixed sizes). metrics/train_time.json holds wall-clock seconds and is left out. Precision is pinned per config, so
the table does not depend on what `train.precision: auto` picks on this host; compare tables from one host only."""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
STAGES = ("download", "normalize", "train", "export", "evaluate", "report")
OUTPUT_FOLDERS = ("models", "metrics", "reports", "data/raw", "data/prepared")

SMALL = {"data.synthetic.train_size": 400, "data.synthetic.test_size": 100, "data.val_fraction": 0.1,
         "train.batch_size": 64, "train.warmup_epochs": 0.5, "evaluate.batch_size": 100, "report.samples": 4,
         "report.baseline": None, "export.check_images": 32, "train.log_every": 100000}

CONFIGS: dict[str, dict[str, Any]] = {
    # airnet with every training feature of the default recipe
    "A": {**SMALL, "data.source": "synthetic", "train.model": "airnet", "train.airnet.widths": [16, 32, 32],
          "train.airnet.whiten_bias_epochs": 2, "train.epochs": 8, "train.optimizer": "muon",
          "train.averaging": "lookahead", "train.averaging_start": 2, "train.low_res.size": 24,
          "train.low_res.epochs": 2, "train.precision": "fp32", "evaluate.tta": 6},
    # a cnn ensemble with SGD, EMA and a cosine schedule
    "B": {**SMALL, "data.source": "synthetic", "train.model": "cnn", "train.cnn.channels": [8, 16, 32],
          "train.ensemble": 2, "train.epochs": 3, "train.optimizer": "sgd", "train.lr": 0.2,
          "train.bias_lr_scale": 1.0, "train.averaging": "ema", "train.averaging_start": 1,
          "train.schedule": "cosine", "train.low_res.size": 0, "train.precision": "bf16", "evaluate.tta": 2},
    # an image folder of mixed sizes and the mlp
    "C": {**SMALL, "data.source": "data/sources/folder", "data.image_size": 16, "train.model": "mlp",
          "train.mlp.hidden": [64], "train.epochs": 3, "train.optimizer": "sgd", "train.lr": 0.05,
          "train.bias_lr_scale": 1.0, "train.averaging": "none", "train.low_res.size": 0,
          "train.augment.cutout": 4, "train.precision": "fp32", "evaluate.tta": 1},
    # an image folder with keep-best, patience, class weights and the balanced sampler
    "D": {**SMALL, "data.source": "data/sources/folder", "data.image_size": 16, "data.val_fraction": 0.2,
          "train.model": "cnn", "train.cnn.channels": [8, 16, 32], "train.epochs": 5, "train.optimizer": "sgd",
          "train.lr": 0.1, "train.bias_lr_scale": 1.0, "train.averaging": "none", "train.low_res.size": 0,
          "train.augment.cutout": 4, "train.keep": "best", "train.monitor": "val_acc", "train.patience": 2,
          "train.class_weights": "balanced", "train.sampler": "balanced", "train.precision": "fp32",
          "evaluate.tta": 2},
}


def make_folder(root: Path) -> None:
    """Three classes of PNGs (40, 25 and 15 images: imbalanced) of seeded noise around a class colour, in mixed
    sizes and modes, so resizing, grayscale and palette conversion all take part."""
    rng = np.random.default_rng(0)
    colors = {"cat": (200, 60, 60), "dog": (60, 180, 70), "frog": (60, 80, 210)}
    for (name, color), count in zip(colors.items(), (40, 25, 15)):
        (root / name).mkdir(parents=True)
        for index in range(count):
            height, width = int(rng.integers(12, 40)), int(rng.integers(12, 40))
            pixels = np.clip(rng.normal(color, 60, (height, width, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels, "RGB")
            if index % 7 == 3:
                image = image.convert("L")
            elif index % 7 == 5:
                image = image.convert("P")
            image.save(root / name / f"{index:03d}.png")


def set_dotted(params: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    if leaf not in node:
        raise SystemExit(f"{dotted}: not a key of params.yaml")
    node[leaf] = value


def run_config(name: str, overrides: dict[str, Any], root: Path) -> dict[str, str]:
    shutil.copytree(REPO_ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        set_dotted(params, dotted, value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    make_folder(root / "data" / "sources" / "folder")
    for stage in STAGES:
        result = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=root, capture_output=True, text=True,
                                env={"PIPELINE_DEVICE": "cpu", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
        if result.returncode:
            raise SystemExit(f"config {name}, stage {stage} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    digests = {}
    for folder in OUTPUT_FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.name != "train_time.json":
                digests[str(path.relative_to(root))] = hashlib.md5(path.read_bytes()).hexdigest()
    return digests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="keep each configuration's scratch repository under this folder")
    parser.add_argument("configs", nargs="*", default=list(CONFIGS), help="configurations to run (default: all)")
    args = parser.parse_args()
    for name in args.configs:
        with tempfile.TemporaryDirectory(prefix=f"digests-{name}-") as scratch:
            root = args.keep / name if args.keep else Path(scratch)
            if root.exists():
                shutil.rmtree(root)
            for path, digest in run_config(name, CONFIGS[name], root).items():
                print(f"{name}  {digest}  {path}", flush=True)


if __name__ == "__main__":
    main()

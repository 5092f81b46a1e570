"""Class imbalance on real data: an imbalanced subset of the CIFAR-10 JPEG copy (the first five classes keep
`--keep` of their images, 10% by default, in the training and the test split alike), trained on the same preset
three ways: as is, with `train.class_weights: balanced` (inverse-frequency loss weights) and with
`train.sampler: balanced` (class-balanced draws), printing test accuracy, balanced accuracy and macro-F1 of each.

    python bench/imbalance.py                # the fc preset (seconds per run)
    python bench/imbalance.py airnet-fast    # another preset from presets/
    python bench/imbalance.py airnet-fast -S train.precision=fp32   # with params changed on top of it

The subset is made by this script in a temporary workspace (nothing in the repository is touched); which images
are kept is fixed (the first ones of each class folder, in name order), so reruns train on the same data."""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

import yaml

from workspace import (CIFAR_JPEG_ZIP, REPO_ROOT, header, make_workspace, members_by_split_and_class, read_metrics,
                       run_stage)

sys.path.insert(0, str(REPO_ROOT / "tools"))
from preset import read_preset  # noqa: E402  (tools/ is not a package)

RARE_CLASSES = 5  # the first five classes, in sorted order (airplane, automobile, bird, cat, deer)
VARIANTS = {"as is": {"train.class_weights": "none", "train.sampler": "shuffle"},
            "train.class_weights: balanced": {"train.class_weights": "balanced", "train.sampler": "shuffle"},
            "train.sampler: balanced": {"train.class_weights": "none", "train.sampler": "balanced"}}


def imbalanced_zip(target: Path, keep: float) -> dict[str, int]:
    """Copy the CIFAR-10 JPEG zip into `target`, keeping `keep` of the rare classes' images (train and test);
    returns the training images per class."""
    with zipfile.ZipFile(CIFAR_JPEG_ZIP) as source:
        by_class = members_by_split_and_class(source)
        classes = sorted({cls for _, cls in by_class})
        rare = set(classes[:RARE_CLASSES])
        counts: dict[str, int] = {}
        with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
            for (split, cls), members in sorted(by_class.items()):
                if cls in rare:
                    members = members[:round(len(members) * keep)]
                if split == "train":
                    counts[cls] = len(members)
                for name in members:
                    out.writestr(name, source.read(name))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", default="fc", help="a preset from presets/ (default: fc)")
    parser.add_argument("--keep", type=float, default=0.1, help="share of the rare classes' training images kept")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a param on top of the preset, as dvc exp run -S takes it (YAML value)")
    args = parser.parse_args()
    extra = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    header(f"class imbalance: CIFAR-10 JPEG, classes 0-{RARE_CLASSES - 1} at {args.keep:.0%} of their training "
           f"images (train and test), preset {args.preset}"
           + "".join(f", {key}={value}" for key, value in extra.items()))
    root = make_workspace()
    source = root / "data" / "sources" / "imbalanced.zip"
    counts = imbalanced_zip(source, args.keep)
    print(f"workspace: {root}\ntraining images per class: {counts}")
    data = {"data.source": "data/sources/imbalanced.zip", "data.val_fraction": 0.0}
    run_stage(root, "download", data, quiet=True)
    run_stage(root, "normalize", data, quiet=True)
    rows = []
    for name, setting in VARIANTS.items():
        overrides = {**data, **read_preset(args.preset), **extra, "data.val_fraction": 0.0, **setting}
        seconds = run_stage(root, "train", overrides, quiet=True) + run_stage(root, "evaluate", overrides, quiet=True)
        test = read_metrics(root)["test"]
        rows.append((name, test["acc"], test["balanced_accuracy"], test["macro_f1"], seconds))
        print(f"{name:<28s} acc {test['acc']:.4f}  balanced acc {test['balanced_accuracy']:.4f}  "
              f"macro-F1 {test['macro_f1']:.4f}  ({seconds:.0f} s)", flush=True)
    print("\n| setting | test accuracy | balanced accuracy | macro-F1 | train + evaluate (s) |")
    print("|---|---|---|---|---|")
    for name, acc, balanced, f1, seconds in rows:
        print(f"| {name} | {100 * acc:.2f}% | {100 * balanced:.2f}% | {f1:.4f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()

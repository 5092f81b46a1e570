"""Model selection on real data: which epoch to keep, and early stopping. The `fc` preset (the seed's FC net) with
a constant learning rate for `--epochs` (30 by default) on the CIFAR-10 JPEG copy, 10% of the training images held
out for validation: the FC net starts to overfit after a few epochs, so the last epoch is not the best one. The
same run is trained once per setting (training is deterministic, so the settings that do not stop early train the
very same epochs and differ only in the weights they keep), and each kept model is scored on the test split.

    python bench/selection.py
    python bench/selection.py --epochs 20

Nothing in the repository is touched: the runs use a scratch workspace (bench/workspace.py)."""

from __future__ import annotations

import argparse
import sys

from workspace import REPO_ROOT, header, make_workspace, read_metrics, run_stage

sys.path.insert(0, str(REPO_ROOT / "tools"))
from preset import read_preset  # noqa: E402  (tools/ is not a package)

SETTINGS = {"keep: last": {"train.keep": "last", "train.patience": 0},
            "keep: best, monitor val_loss": {"train.keep": "best", "train.monitor": "val_loss", "train.patience": 0},
            "keep: best, monitor val_acc": {"train.keep": "best", "train.monitor": "val_acc", "train.patience": 0},
            "keep: best, val_loss, patience 3": {"train.keep": "best", "train.monitor": "val_loss",
                                                 "train.patience": 3}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="train.epochs of every run (default 30)")
    args = parser.parse_args()
    header(f"model selection: preset fc, constant learning rate, {args.epochs} epochs, data.val_fraction 0.1")
    root = make_workspace()
    base = {**read_preset("fc"), "data.val_fraction": 0.1, "train.schedule": "constant", "train.epochs": args.epochs}
    run_stage(root, "download", base, quiet=True)
    run_stage(root, "normalize", base, quiet=True)
    rows = []
    for name, setting in SETTINGS.items():
        overrides = {**base, **setting}
        run_stage(root, "train", overrides, quiet=True)
        run_stage(root, "evaluate", overrides, quiet=True)
        metrics = read_metrics(root)
        test, val = metrics["test"], metrics["val"]
        row = (name, metrics["epochs"], metrics["kept_epoch"], val["loss"], val["acc"], test["acc"], test["loss"],
               metrics["train_time"]["seconds"])
        rows.append(row)
        print(f"{name:<34s} trained {row[1]:>2d}  kept {row[2]:>2d}  val loss {row[3]:.4f} acc {row[4]:.4f}  "
              f"test acc {row[5]:.4f} loss {row[6]:.4f}  ({row[7]:.0f} s of training)", flush=True)
    print("\n| setting | epochs trained | kept epoch | val loss | val accuracy | test accuracy | test loss | "
          "training (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, trained, kept, val_loss, val_acc, test_acc, test_loss, seconds in rows:
        print(f"| {name} | {trained} | {kept} | {val_loss:.4f} | {100 * val_acc:.2f}% | {100 * test_acc:.2f}% | "
              f"{test_loss:.4f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()

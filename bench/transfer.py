"""Transfer learning on few images, as a user runs it: a seeded stratified subset of the CIFAR-10 JPEG copy (100
training images per class, all 10,000 test images) in a scratch git + DVC repository, and one `dvc exp run` per
row, timed whole (download to report), side by side on this host:

    scratch          the default recipe (params.yaml) from random weights
    transfer-fast    presets/transfer-fast.yaml: frozen EfficientNet-Lite0, cached features, head only
    head-only rerun  transfer-fast again with only a head param changed (train.lr): must run no backbone work
    transfer         presets/transfer.yaml: fine-tuning (head first, then everything, earlier layers slower)

    python bench/transfer.py                        # all rows
    python bench/transfer.py transfer -S train.epochs=12   # some rows, with params on top of their presets
    python bench/transfer.py --full                 # all 50,000 training images: points of the accuracy-time curve

With --full the rows are the fast from-scratch preset (airnet-fast), transfer-fast, and one, two and three epochs
of fine-tuning (everything from the first step, 2-view TTA). The default from-scratch recipe's own point (91.4% in
18.4 min on one AMD Zen 4, 36.1 min on another of half its speed) is in BENCHMARKS.md: airnet-fast's time in the
same run says which speed of host this is. The question is where, on a 2-core CPU, transfer overtakes training
from scratch.

Each row starts from the committed baseline params (the subset as data.source); the weights come from the
documented offline step (python tools/get_pretrained.py efficientnet_lite0). The "stages run" column is what
`dvc exp run` printed as "Running stage", so the head-only row shows that no features stage ran."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import yaml

from workspace import CIFAR_JPEG_ZIP, REPO_ROOT, header, members_by_split_and_class

sys.path.insert(0, str(REPO_ROOT / "tools"))
from preset import override_args  # noqa: E402  (tools/ is not a package)

PER_CLASS = 100
SUBSET_SEED = 0
SUBSET = "data/sources/cifar10-100-per-class.zip"
HEAD_CHANGE = ["-S", "train.lr=0.02"]
ROWS = {  # name -> (preset whose params the row applies, extra dvc exp run arguments, start from the baseline)
    "scratch": (None, [], True),
    "transfer-fast": ("transfer-fast", [], True),
    "head-only rerun": ("transfer-fast", HEAD_CHANGE, False),
    "transfer": ("transfer", [], True),
}
FULL_ROWS = {
    "scratch, fast": ("airnet-fast", [], True),
    "transfer-fast": ("transfer-fast", [], True),
    # frozen_epochs 0: everything trains from the first step, the whole budget is fine-tuning (the 2026-12-07
    # 14:32 run's 0.1 trained only the head: the backbone unfroze only at an epoch start then; BENCHMARKS.md)
    **{f"transfer, {epochs} epoch{'s' if epochs > 1 else ''}":
       ("transfer", ["-S", f"train.epochs={epochs}", "-S", "train.fine_tune.frozen_epochs=0", "-S", "evaluate.tta=2"],
        True) for epochs in (1, 2, 3)},
}


def subset_zip(target: Path) -> dict[str, int]:
    """The JPEG zip with PER_CLASS training images per class (drawn by a seeded RNG) and the whole test split."""
    with zipfile.ZipFile(CIFAR_JPEG_ZIP) as source:
        by_class = members_by_split_and_class(source)
        rng = random.Random(SUBSET_SEED)
        counts: dict[str, int] = {}
        with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
            for (split, cls), members in sorted(by_class.items()):
                if split == "train":
                    members = sorted(rng.sample(members, PER_CLASS))
                    counts[cls] = len(members)
                for name in members:
                    out.writestr(name, source.read(name))
    return counts


def run(root: Path, *command: str) -> str:
    result = subprocess.run(command, cwd=root, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}")
    return result.stdout


def make_repo(full: bool) -> Path:
    """The checkout's tracked files in a new git + DVC repository whose params.yaml reads the subset (or, with
    `full`, the whole JPEG copy, linked)."""
    root = Path(tempfile.mkdtemp(prefix="cifar-transfer-"))
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, text=True,
                             check=True, stdout=subprocess.PIPE).stdout.split()
    for name in tracked:
        if name.startswith(("tests/", "bench/", ".github/")) or not (REPO_ROOT / name).is_file():
            continue
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, root / name)
    params = root / "params.yaml"
    source = "data/sources/cifar10-jpeg.zip" if full else SUBSET
    params.write_text(params.read_text().replace("  source: cifar10\n", f"  source: {source}\n", 1))
    print(f"workspace: {root}")
    if full:
        (root / source).symlink_to(CIFAR_JPEG_ZIP)
    else:
        counts = subset_zip(root / SUBSET)
        print(f"training images per class (before the validation split, data.val_fraction "
              f"{yaml.safe_load(params.read_text())['data']['val_fraction']}): {counts}", flush=True)
    for command in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "bench@localhost"],
                    ["git", "config", "user.name", "bench"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", "baseline: the subset"]):
        run(root, *command)
    start = time.perf_counter()
    print(run(root, sys.executable, "tools/get_pretrained.py", "efficientnet_lite0").strip().splitlines()[-1])
    print(f"(the offline weights step took {time.perf_counter() - start:.1f} s)", flush=True)
    return root


def exp_run(root: Path, preset: str | None, extra: list[str]) -> tuple[float, list[str], dict]:
    args = (override_args(preset) if preset else []) + extra
    start = time.perf_counter()
    output = run(root, "dvc", "exp", "run", *args)
    seconds = time.perf_counter() - start
    stages = re.findall(r"Running stage '([^']+)'", output)
    test = json.loads((root / "metrics" / "test.json").read_text())["test"]
    if "train" in stages:
        test["train_seconds"] = json.loads((root / "metrics" / "train_time.json").read_text())["train_time"]["seconds"]
    return seconds, stages, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="*", help=f"rows to run (default: all): {', '.join(ROWS)}")
    parser.add_argument("--full", action="store_true", help="all 50,000 training images, the full-data rows")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a param on top of every row's preset, as dvc exp run -S takes it")
    args = parser.parse_args()
    table = FULL_ROWS if args.full else ROWS
    rows = args.rows or list(table)
    if unknown := [name for name in rows if name not in table]:
        parser.error(f"unknown rows {unknown}: choose from {', '.join(table)}")
    extra = [item for value in args.set for item in ("-S", value)]
    data = ("all CIFAR-10 JPEG training images" if args.full
            else f"{PER_CLASS} CIFAR-10 JPEG training images per class (seed {SUBSET_SEED})")
    header(f"transfer learning on {data}, the full 10,000-image test set; one dvc exp run per row"
           + "".join(f", {value}" for value in args.set))
    if not CIFAR_JPEG_ZIP.is_file():
        sys.exit(f"skipped: {CIFAR_JPEG_ZIP} not found (benchmarks need the real CIFAR-10 JPEG copy)")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    # The stages' commands say `python -m ...`: this interpreter's folder first, as the Makefile does.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    root = make_repo(args.full)
    print("\n| row | command | test accuracy | dvc exp run wall time | of it training | stages run |\n"
          "| --- | --- | --- | --- | --- | --- |", flush=True)
    for name in rows:
        preset, row_args, from_baseline = table[name]
        if from_baseline:
            run(root, "git", "checkout", "params.yaml")
        seconds, stages, test = exp_run(root, preset, row_args + extra)
        command = " ".join(["dvc exp run"] + ([f"(presets/{preset}.yaml)"] if preset and from_baseline else [])
                           + row_args + extra)
        print(f"| {name} | `{command}` | {test['acc']:.2%} | {seconds:.0f} s | {test.get('train_seconds', 0):.0f} s | "
              f"{', '.join(stages)} |", flush=True)


if __name__ == "__main__":
    main()

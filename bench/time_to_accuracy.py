"""Time to accuracy on the real CIFAR-10 JPEG copy: the pipeline's own download -> normalize once, then
train + evaluate for each preset, printing test accuracy and wall time (train + evaluate, process start to end).

    python bench/time_to_accuracy.py                 # all presets
    python bench/time_to_accuracy.py airnet-fast fc  # some of them

Every preset is a set of params.yaml overrides. The README's presets (fc, seed, airnet, airnet-fast) are read from
presets/, the files that `python tools/preset.py NAME` applies; the others are this benchmark's own variants."""

from __future__ import annotations

import shutil
import sys

from workspace import REPO_ROOT, header, make_workspace, read_metrics, run_stage

sys.path.insert(0, str(REPO_ROOT / "tools"))
from preset import read_preset  # noqa: E402  (tools/ is not a package)

# The seed's FC net on in-memory tensors: batches of 512, momentum SGD, linear decay, no augmentation, bf16.
FC = read_preset("fc")

# The first round's airnet recipe (the default until the second round): Nesterov SGD for every parameter, random
# flips, a warm-up of 23% of the epochs, no cutout, full resolution throughout.
SGD = {"train.optimizer": "sgd", "train.augment.flip": "random", "train.augment.cutout": 0, "train.low_res.size": 0,
       "train.low_res.epochs": 0, "train.batch_size": 1024, "train.lr": 1.5, "train.epochs": 20,
       "train.warmup_epochs": 4.6, "train.averaging_start": 6.0, "train.airnet.whiten_bias_epochs": 6.0}
SGD_FAST = {**SGD, "train.epochs": 5, "train.warmup_epochs": 1.15, "train.averaging_start": 1.5,
            "train.airnet.whiten_bias_epochs": 1.5}  # a quarter of the schedule, every phase scaled alike
# The second round: Muon for the conv filters (airbench94_muon) and alternating flips, no warm-up.
MUON = {**SGD, "train.optimizer": "muon", "train.augment.flip": "alternate", "train.warmup_epochs": 0.0}
MUON_FAST = {**MUON, "train.epochs": 5, "train.averaging_start": 1.5, "train.airnet.whiten_bias_epochs": 1.5}

# The second round's fast preset: the default recipe on 5.8 epochs (2 of them at 24 px), without cutout.
FAST58 = {"train.epochs": 5.8, "train.averaging_start": 1.75, "train.airnet.whiten_bias_epochs": 1.75,
          "train.augment.cutout": 0, "train.low_res.epochs": 2}
# The README's fast preset (third round): FAST58 with a narrower net (0.63x the time per image) for 9 epochs, on
# all 50,000 training images (no validation split), its phases as 30% of the run (2.7 epochs).
FAST = read_preset("airnet-fast")


def on_seeds(name: str, recipe: dict[str, object], seeds: tuple[int, ...] = (1, 2)) -> dict[str, dict[str, object]]:
    """The recipe again on other seeds (`name-seedN`): one run cannot tell +-0.2 points from noise."""
    return {name: recipe, **{f"{name}-seed{seed}": {**recipe, "train.seed": seed} for seed in seeds}}


PRESETS: dict[str, dict[str, object]] = {
    "fc": FC,
    "fc-fp32": {**FC, "train.epochs": 4, "train.precision": "fp32"},
    # The seed tutorial exactly: batch 4, SGD lr 0.001 without momentum, 10 epochs, normalize 0.5.
    "seed": read_preset("seed"),
    **on_seeds("airnet", read_preset("airnet")),  # the defaults in params.yaml
    **on_seeds("airnet-fast", FAST, (1, 2, 3, 4)),
    # Third round.
    **on_seeds("fast58", FAST58),
    "fast58-all": {**FAST58, "data.val_fraction": 0.0},
    # Narrower blocks 2-3 only (64/192/192: 0.73x the time per image), 8 epochs.
    **on_seeds("fast-w192-8", {**FAST58, "data.val_fraction": 0.0, "train.airnet.widths": [64, 192, 192],
                               "train.epochs": 8, "train.averaging_start": 2.4, "train.airnet.whiten_bias_epochs": 2.4}),
    **on_seeds("fast-w48-9.4", {**FAST, "train.epochs": 9.4, "train.averaging_start": 2.82,
                                "train.airnet.whiten_bias_epochs": 2.82}),
    "airnet-all-t4": {"data.val_fraction": 0.0, "train.augment.translate": 4},  # bigger shifts, all 50,000 images
    # An ensemble of two models on half the default schedule each.
    "airnet-ens2": {"train.ensemble": 2, "train.epochs": 11, "train.low_res.epochs": 2, "train.averaging_start": 3.0,
                    "train.airnet.whiten_bias_epochs": 3.0},
    # First round.
    "sgd": SGD,
    "sgd-fast": SGD_FAST,
    "sgd-b512": {**SGD, "train.batch_size": 512, "train.lr": 0.75},  # twice the steps, same lr per example
    "sgd-fast-b512": {**SGD_FAST, "train.batch_size": 512, "train.lr": 0.75},
    # Second round, short runs.
    "muon-fast-warmup": {**MUON_FAST, "train.warmup_epochs": 1.15},
    "muon-fast": MUON_FAST,
    "muon-fast-b2000": {**MUON_FAST, "train.batch_size": 2000},
    "muon-fast-5.5": {**MUON_FAST, "train.epochs": 5.5, "train.averaging_start": 1.65,
                      "train.airnet.whiten_bias_epochs": 1.65},
    "muon-fast-lowres": {**MUON_FAST, "train.epochs": 5.9, "train.averaging_start": 1.8,
                         "train.airnet.whiten_bias_epochs": 1.8, "train.low_res.size": 24, "train.low_res.epochs": 2},
    "muon-fast-lowres-5.8": {**MUON_FAST, "train.epochs": 5.8, "train.averaging_start": 1.75,
                             "train.airnet.whiten_bias_epochs": 1.75, "train.low_res.size": 24,
                             "train.low_res.epochs": 2},
    "muon-fast-lowres3": {**MUON_FAST, "train.epochs": 6.1, "train.averaging_start": 1.8,
                          "train.airnet.whiten_bias_epochs": 1.8, "train.low_res.size": 24, "train.low_res.epochs": 3},
    "muon-fast-b512": {**MUON_FAST, "train.epochs": 5.5, "train.averaging_start": 1.65,
                       "train.airnet.whiten_bias_epochs": 1.65, "train.batch_size": 512, "train.lr": 0.75},
    "muon-fast-b512-mlr": {**MUON_FAST, "train.epochs": 5.5, "train.averaging_start": 1.65,
                           "train.airnet.whiten_bias_epochs": 1.65, "train.batch_size": 512, "train.lr": 0.75,
                           "train.muon.lr": 0.17},
    # Second round, long runs.
    "muon-22": {**MUON, "train.epochs": 22},
    "muon-cutout-21": {**MUON, "train.epochs": 21, "train.augment.cutout": 12},
    "muon-cutout-lowres-22": {**MUON, "train.epochs": 22, "train.augment.cutout": 12, "train.low_res.size": 24,
                              "train.low_res.epochs": 4},
    "muon-wide-8": {**MUON, "train.epochs": 8, "train.augment.cutout": 12, "train.airnet.widths": [128, 384, 384],
                    "train.averaging_start": 2.4, "train.airnet.whiten_bias_epochs": 2.4},
}


def main() -> None:
    names = sys.argv[1:] or list(PRESETS)
    header("time to accuracy, real CIFAR-10 JPEG (q75) test set")
    root = make_workspace()
    print(f"workspace: {root}")
    prepare = run_stage(root, "download", quiet=True) + run_stage(root, "normalize", quiet=True)
    print(f"download + normalize: {prepare:.1f} s")
    rows = []
    prepared_for: dict[str, object] = {}  # the normalize overrides the prepared data was made with
    for name in names:
        overrides = PRESETS[name]
        normalize_overrides = {k: v for k, v in overrides.items() if k.startswith(("data.", "normalize."))}
        normalize_seconds = 0.0
        if normalize_overrides != prepared_for:
            normalize_seconds = run_stage(root, "normalize", overrides, quiet=True)
            prepared_for = normalize_overrides
        train_seconds = run_stage(root, "train", overrides, quiet=True)
        evaluate_seconds = run_stage(root, "evaluate", overrides, quiet=True)
        metrics = read_metrics(root)
        shutil.copy(root / "metrics" / "history.csv", root / f"history-{name}.csv")  # per-epoch curve, kept
        shutil.copy(root / "models" / "model.pth", root / f"model-{name}.pth")
        rows.append((name, metrics["test"]["acc"], train_seconds, evaluate_seconds,
                     metrics["train_time"]["seconds"], normalize_seconds))
        print(f"{name:<12s} test acc {metrics['test']['acc']:.4f}  train {train_seconds:7.1f} s "
              f"(loop {metrics['train_time']['seconds']:.1f} s)  evaluate {evaluate_seconds:5.1f} s  "
              f"train+evaluate {train_seconds + evaluate_seconds:7.1f} s", flush=True)
    print("\n| preset | test accuracy | train + evaluate (s) | training loop (s) |\n|---|---|---|---|")
    for name, acc, tr, ev, loop, _ in rows:
        print(f"| {name} | {100 * acc:.2f}% | {tr + ev:.1f} | {loop:.1f} |")


if __name__ == "__main__":
    main()

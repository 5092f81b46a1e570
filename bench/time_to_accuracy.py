"""Time to accuracy on the real CIFAR-10 JPEG copy: the pipeline's own download -> normalize once, then
train + evaluate for each preset, printing test accuracy and wall time (train + evaluate, process start to end).

    python bench/time_to_accuracy.py                 # all presets
    python bench/time_to_accuracy.py airnet-fast fc  # some of them

Presets are `dvc exp run -S` overrides of params.yaml (the README lists the same commands)."""

from __future__ import annotations

import sys

from workspace import header, make_workspace, read_metrics, run_stage

# The seed's FC net on in-memory tensors: batches of 512, momentum SGD, linear decay, no augmentation.
FC = {"train.model": "mlp", "train.batch_size": 512, "train.lr": 0.04, "train.momentum": 0.9,
      "train.nesterov": False, "train.weight_decay": 0.0, "train.label_smoothing": 0.0, "train.augment.flip": False,
      "train.augment.translate": 0, "train.schedule": "linear", "train.warmup_epochs": 0.0,
      "train.averaging": "none", "data.val_fraction": 0.0, "evaluate.tta": 1}

PRESETS: dict[str, dict[str, object]] = {
    "fc": {**FC, "train.epochs": 8, "train.precision": "bf16"},
    "fc-fp32": {**FC, "train.epochs": 4, "train.precision": "fp32"},
    # The seed tutorial exactly: batch 4, SGD lr 0.001 without momentum, 10 epochs, normalize 0.5.
    "seed": {**FC, "train.epochs": 10, "train.batch_size": 4, "train.lr": 0.001, "train.momentum": 0.0,
             "train.schedule": "constant", "train.precision": "fp32", "train.channels_last": False,
             "train.log_every": 50000, "normalize.stats": "fixed"},
    "airnet": {},  # the defaults in params.yaml
    # The same recipe on a quarter of the schedule (warm-up, averaging and stem-bias epochs scaled alike).
    "airnet-fast": {"train.epochs": 5, "train.warmup_epochs": 1.15, "train.averaging_start": 1.5,
                    "train.airnet.whiten_bias_epochs": 1.5},
    # Half the batch at the same lr per example: twice the steps per epoch.
    "airnet-b512": {"train.batch_size": 512, "train.lr": 0.75},
    "airnet-fast-b512": {"train.epochs": 5, "train.warmup_epochs": 1.15, "train.averaging_start": 1.5,
                         "train.airnet.whiten_bias_epochs": 1.5, "train.batch_size": 512, "train.lr": 0.75},
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

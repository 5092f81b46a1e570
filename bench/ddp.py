"""One process vs DistributedDataParallel on 2 CPU processes (gloo): the train stage's wall time and test accuracy
on the same synthetic data, global batch and seed.

    python bench/ddp.py

On a 2-core machine the two processes get one thread each, so this shows the overhead and equivalence of the
distributed path more than a speed-up; on N GPUs each process drives its own device."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from workspace import REPO_ROOT, header, read_metrics, run_stage

SETUP = {"data.source": "synthetic", "data.synthetic.train_size": 10000, "data.synthetic.test_size": 2000,
         "train.model": "cnn", "train.epochs": 3, "train.batch_size": 256, "train.lr": 0.2,
         "train.bias_lr_scale": 1.0, "train.warmup_epochs": 0.5, "train.averaging": "none", "evaluate.tta": 1,
         "train.optimizer": "sgd", "train.augment.flip": "random", "train.augment.cutout": 0, "train.low_res.size": 0}


def main() -> None:
    header("train stage: 1 process vs 2 DDP processes (gloo, CPU)")
    root = Path(tempfile.mkdtemp(prefix="cifar-ddp-"))
    shutil.copytree(REPO_ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "data" / "sources").mkdir(parents=True)
    run_stage(root, "download", SETUP, quiet=True)
    run_stage(root, "normalize", SETUP, quiet=True)
    print("| processes | train stage wall (s) | training loop (s) | test accuracy | test loss |\n|---|---|---|---|---|")
    for nproc in (1, 2):
        overrides = {**SETUP, "train.nproc": nproc}
        seconds = run_stage(root, "train", overrides, quiet=True)
        run_stage(root, "evaluate", overrides, quiet=True)
        metrics = read_metrics(root)
        print(f"| {nproc} | {seconds:.1f} | {metrics['train_time']['seconds']:.1f} | {metrics['test']['acc']:.4f} "
              f"| {metrics['test']['loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()

"""Inference throughput of the default model (params.yaml's train.model, airnet 64/256/256 on 32 px, 10 classes)
on this CPU: torch as evaluate and predict run a checkpoint (train.precision auto: bf16 where the CPU has native
bf16, channels_last), torch in fp32, and ONNX Runtime on the export stage's graph (exported in this process,
opset export.opset, fp32). Images per second at batch 1 and batch 64, random uint8 images, no TTA; each number is
the best of `--repeats` timed runs of about `--seconds` each, after a warm-up. Run it on a quiet machine.

    python bench/inference.py                          # the default model with random weights
    python bench/inference.py --model models/model.pth # a trained checkpoint instead
    python bench/inference.py --seconds 0.2 --repeats 1 --widths 8,16,16   # a smoke test of the script"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from workspace import REPO_ROOT, header

sys.path.insert(0, str(REPO_ROOT))
import stages  # noqa: E402,F401  (the stages' thread and allocator settings)
from stages.base.config import load_params  # noqa: E402
from stages.base.specs import model_config_of  # noqa: E402
from stages.export import export_onnx  # noqa: E402
from stages.model.checkpoint import load_checkpoint, make_checkpoint  # noqa: E402
from stages.model.deploy import OnnxClassifier  # noqa: E402
from stages.model.nets import (InferenceSettings, build_model, infer, inference_settings,  # noqa: E402
                               model_from_checkpoint)

BATCHES = (1, 64)
CLASSES = 10


def default_checkpoint(widths: list[int] | None) -> dict[str, Any]:
    """params.yaml's model (optionally other airnet widths) with random weights, as a checkpoint."""
    train = load_params(REPO_ROOT / "params.yaml")["train"]
    if widths:
        train = {**train, "airnet": {**train["airnet"], "widths": widths}}
    config = model_config_of(train)
    size = load_params(REPO_ROOT / "params.yaml")["data"]["image_size"]
    torch.manual_seed(0)
    model = build_model(train["model"], config, CLASSES, size, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26])
    return make_checkpoint(model=train["model"], model_config=config, classes=[f"class{i}" for i in range(CLASSES)],
                           image_size=size, mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26],
                           state_dicts=[model.state_dict()], train=train)


def images_per_second(run: Callable[[], Any], batch: int, seconds: float, repeats: int) -> float:
    """The best of `repeats` timed runs, each as many calls of `run` as fit into about `seconds`."""
    for _ in range(3):  # warm-up: kernels picked, memory allocated
        run()
    best = 0.0
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - start < seconds:
            run()
            calls += 1
        best = max(best, calls * batch / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a checkpoint (models/model.pth); default: params.yaml's model, random")
    parser.add_argument("--widths", help="airnet widths for the random model, e.g. 8,16,16 (default: params.yaml)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one timed run (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per number, the best counts (default 3)")
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")] if args.widths else None
    checkpoint = load_checkpoint(args.model) if args.model else default_checkpoint(widths)
    model = model_from_checkpoint(checkpoint)
    opset = load_params(REPO_ROOT / "params.yaml")["export"]["opset"]
    classifier = OnnxClassifier(export_onnx(model, checkpoint, opset), "model.onnx")
    as_trained = inference_settings(checkpoint["model"], checkpoint.get("train") or {}, torch.device("cpu"))
    how = str(as_trained.dtype or "fp32").removeprefix("torch.") + (", channels_last" * as_trained.channels_last)
    runtimes: dict[str, Callable[[torch.Tensor], Any]] = {
        f"torch, as evaluate runs it ({how})":
            lambda images: infer(model, images, batch_size=len(images), settings=as_trained),
        "torch fp32": lambda images: infer(model, images, batch_size=len(images), settings=InferenceSettings()),
        f"ONNX Runtime (opset {opset}, fp32)": lambda images: classifier.logits(images.numpy()),
    }
    header(f"inference throughput: {checkpoint['model']} {checkpoint['model_config']}, "
           f"{checkpoint['image_size']} px, torch threads {torch.get_num_threads()}, ONNX Runtime threads: its "
           "default (one per physical core)")
    print("| runtime | " + " | ".join(f"batch {b}: images/s" for b in BATCHES) + " |\n"
          "|---|" + "---|" * len(BATCHES))
    generator = torch.Generator().manual_seed(0)
    size = checkpoint["image_size"]
    batches = {b: torch.randint(0, 256, (b, 3, size, size), generator=generator, dtype=torch.uint8) for b in BATCHES}
    for name, run in runtimes.items():
        rates = [images_per_second(lambda: run(batches[b]), b, args.seconds, args.repeats) for b in BATCHES]
        print(f"| {name} | " + " | ".join(f"{rate:,.0f}" for rate in rates) + " |", flush=True)
    agreement = np.abs(classifier.logits(batches[64].numpy())
                       - infer(model, batches[64], batch_size=64).numpy()).max()
    print(f"\nlargest |ONNX Runtime - torch fp32| logit difference on the batch of 64: {agreement:.2g}")


if __name__ == "__main__":
    main()

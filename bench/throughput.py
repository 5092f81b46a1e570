"""Training throughput of airnet by input size and widths (what `train.low_res` and `train.airnet.widths`
trade): one bf16 (where the CPU has native bf16) + channels_last training step at batch 1024 on random images,
timed per configuration in one process. The default list measures the default net at 32 px first and last, to
show the drift of the machine.

    python bench/throughput.py                          # the list below
    python bench/throughput.py 64,256,256@32 48,192,192@28   # WIDTHS@SIZE ..."""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
import yaml

from workspace import REPO_ROOT, header

sys.path.insert(0, str(REPO_ROOT))
import stages  # noqa: E402,F401  (the stages' thread and allocator settings)
from stages.model.nets import build_model  # noqa: E402
from stages.model.precision import autocast_dtype  # noqa: E402

BATCH, STEPS = 1024, 4
DEFAULT = ["64,256,256@32", "64,256,256@24", "64,256,256@20", "64,192,192@32", "48,192,192@32", "64,160,160@32",
           "64,256,256@32"]


def images_per_second(widths: list[int], size: int, generator: torch.Generator) -> float:
    train = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"]
    config = {**train["airnet"], "widths": widths}
    model = build_model("airnet", config, 10, 32, [0.5] * 3, [0.25] * 3).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    dtype = autocast_dtype("auto", torch.device("cpu"))
    labels = torch.randint(0, 10, (BATCH,), generator=generator)
    images = torch.randint(0, 256, (BATCH, 3, size, size), generator=generator, dtype=torch.uint8)

    def step() -> None:
        batch = images.float().contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(batch).float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up: oneDNN picks its kernels for this shape
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    return BATCH * STEPS / (time.perf_counter() - start)


def main() -> None:
    configs = sys.argv[1:] or DEFAULT
    header("airnet training throughput by widths and input size")
    generator = torch.Generator().manual_seed(0)
    print("| widths | input size | images/s |\n|---|---|---|")
    for config in configs:
        widths_text, _, size_text = config.partition("@")
        try:
            widths, size = [int(w) for w in widths_text.split(",")], int(size_text or 32)
        except ValueError:
            sys.exit(f"{config!r}: expected WIDTHS@SIZE, e.g. 64,256,256@32")
        print(f"| {widths_text} | {size} | {images_per_second(widths, size, generator):.0f} |", flush=True)


if __name__ == "__main__":
    main()

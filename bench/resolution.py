"""Training throughput of the default airnet at several input sizes (what `train.low_res` trades): one bf16
(where the CPU has native bf16) + channels_last training step at batch 1024 on random images, timed per size in
one process, with the 32 px size measured first and last to show the drift of the machine.

    python bench/resolution.py              # 32 24 20 32
    python bench/resolution.py 32 28 24     # other sizes"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
import yaml
from workspace import REPO_ROOT, header

sys.path.insert(0, str(REPO_ROOT))
import stages  # noqa: E402,F401  (the stages' thread and allocator settings)
from stages.models import autocast_dtype, build_model  # noqa: E402

BATCH, STEPS = 1024, 4


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [32, 24, 20, 32]
    header("airnet training throughput by input size")
    train = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"]
    model = build_model("airnet", train["airnet"], 10, 32, [0.5] * 3, [0.25] * 3).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    dtype = autocast_dtype("auto", torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (BATCH,), generator=generator)
    print("| input size | images/s |\n|---|---|")
    for size in sizes:
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
        print(f"| {size} | {BATCH * STEPS / (time.perf_counter() - start):.0f} |", flush=True)


if __name__ == "__main__":
    main()

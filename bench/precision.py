"""Training-step throughput in fp32 and in bf16 autocast, side by side in one process: what `train.precision: auto`
should pick on this CPU. One SGD step after another on random images for the FC net (params.yaml's mlp, batch
512) and the default airnet (64/256/256, channels_last, batch 256), two rounds alternating the precisions to show
the machine's drift.

    python bench/precision.py"""

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

WARMUP_STEPS = 2
ROUNDS = 2


def images_per_second(name: str, config: dict, batch: int, dtype: torch.dtype | None, channels_last: bool,
                      steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(name, config, 10, 32, [0.5] * 3, [0.25] * 3)
    images = torch.rand(batch, 3, 32, 32) * 255
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(WARMUP_STEPS):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    header("training-step throughput, fp32 vs bf16 autocast")
    train = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"]
    auto = autocast_dtype("auto", torch.device("cpu"))
    print(f"train.precision: auto picks {'bf16' if auto == torch.bfloat16 else 'fp32'} on this CPU")
    nets = [("mlp", {"hidden": train["mlp"]["hidden"]}, 512, False, 40),
            ("airnet", {"widths": train["airnet"]["widths"], "whiten_bias_epochs": 6}, 256, True, 4)]
    results: dict[tuple[str, str], list[float]] = {}
    for round_index in range(ROUNDS):
        for name, config, batch, channels_last, steps in nets:
            for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                rate = images_per_second(name, config, batch, dtype, channels_last, steps)
                results.setdefault((name, label), []).append(rate)
                print(f"round {round_index + 1}  {name:<6s} batch {batch:<4d} {label}: {rate:,.0f} images/s", flush=True)
    print("\n| net | batch | fp32 images/s | bf16 images/s | bf16 / fp32 |")
    print("|---|---|---|---|---|")
    for name, _, batch, _, _ in nets:
        fp32, bf16 = max(results[(name, "fp32")]), max(results[(name, "bf16")])
        print(f"| {name} | {batch} | {fp32:,.0f} | {bf16:,.0f} | {bf16 / fp32:.2f} |")


if __name__ == "__main__":
    main()

"""Where a default airnet training step spends its time: torch.profiler over two steps (batch 1024, bf16 autocast
where the CPU has native bf16, channels_last, the default optimizers), after two warm-up steps; prints the mean
step time and the ops by self CPU time.

    python bench/profile_step.py"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
import yaml
from torch.profiler import ProfilerActivity, profile

from workspace import REPO_ROOT, header

sys.path.insert(0, str(REPO_ROOT))
import stages  # noqa: E402,F401  (the stages' thread and allocator settings)
from stages.base.specs import model_config_of  # noqa: E402
from stages.model.nets import build_model  # noqa: E402
from stages.model.precision import autocast_dtype  # noqa: E402
from stages.model.optim import make_optimizers  # noqa: E402

BATCH = 1024


def main() -> None:
    header("one airnet training step, profiled")
    train = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"]
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    model = build_model("airnet", model_config_of(train), 10, 32, [0.5] * 3, [0.25] * 3)
    model.net.init_from_data(torch.randn(2000, 3, 32, 32, generator=generator))
    model.to(memory_format=torch.channels_last)
    optimizers = make_optimizers(model, train, device)
    dtype = autocast_dtype(train["precision"], device)
    images = torch.randn(BATCH, 3, 32, 32, generator=generator).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (BATCH,), generator=generator)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images).float(), labels, label_smoothing=train["label_smoothing"])
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(4):
        step()
    seconds = (time.perf_counter() - start) / 4
    print(f"step: {seconds:.3f} s, {BATCH / seconds:.0f} images/s")
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(2):
            step()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()

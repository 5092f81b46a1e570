"""Where a default airnet training step spends its time: torch.profiler over two steps (batch 1024, bf16 autocast
where the CPU has native bf16, channels_last, the default optimizers), after two warm-up steps; prints the mean
step time and the ops by self CPU time.

    python bench/profile_step.py"""

from __future__ import annotations

import sys
import time

import yaml
from torch.profiler import ProfilerActivity, profile

from utilization import step_function
from workspace import REPO_ROOT, header

sys.path.insert(0, str(REPO_ROOT))
import stages  # noqa: E402,F401  (the stages' thread and allocator settings)

BATCH = 1024


def main() -> None:
    header("one airnet training step, profiled")
    train = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"]
    step, precision = step_function(train, BATCH)  # the same step bench/utilization.py measures
    print(f"precision: {precision}")

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

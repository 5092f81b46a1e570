"""Does a 2x2 max-pool whose backward writes its gradient once beat torch's? airnet's pooling backward zero-fills
its whole gradient and then scatters into it; on an Intel AMX host the fill was 24% of the default step
(shared/notes/cpu-training.md). For a 2x2 stride-2 pool every input cell belongs to one window, so the gradient
can be written in one pass. This compares, forward + backward on airnet's pooled shapes, channels_last, fp32 and
bf16: torch's F.max_pool2d, a one-pass version made of torch ops (the four strided quarters of the input, the
window's first maximum as in torch, each gradient quarter written once), and torch.compile of F.max_pool2d.
Both candidates are first checked to equal F.max_pool2d exactly (values and gradients, ties included).

    python bench/maxpool.py

The one-pass version is a candidate, not part of the pipeline: airnet keeps nn.MaxPool2d unless this benchmark
shows the candidate faster on a host class (BENCHMARKS.md has the runs)."""

from __future__ import annotations

import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from workspace import REPO_ROOT, header

sys.path.insert(0, str(REPO_ROOT))
import stages  # noqa: E402,F401  (the stages' thread and allocator settings)

SHAPES = [(1024, 64, 32, 32), (1024, 256, 16, 16), (1024, 256, 8, 8)]  # airnet's three pools at batch 1024
QUARTERS = ((0, 0), (0, 1), (1, 0), (1, 1))  # a window's cells in torch's scan order: its first maximum wins


class OnePassMaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h2, w2 = x.shape[2] // 2, x.shape[3] // 2
        q = [x[:, :, dy:2 * h2:2, dx:2 * w2:2] for dy, dx in QUARTERS]
        y = torch.maximum(torch.maximum(q[0], q[1]), torch.maximum(q[2], q[3]))
        winner = torch.where(q[0] == y, 0, torch.where(q[1] == y, 1, torch.where(q[2] == y, 2, 3))).to(torch.uint8)
        ctx.save_for_backward(winner)
        ctx.shape = x.shape
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (winner,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        h2, w2 = h // 2, w // 2
        channels_last = grad.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=layout)  # no fill
        for k, (dy, dx) in enumerate(QUARTERS):
            out[:, :, dy:2 * h2:2, dx:2 * w2:2] = torch.where(winner == k, grad, 0)
        if (h, w) != (2 * h2, 2 * w2):  # the odd last row or column is in no window
            out[:, :, 2 * h2:, :] = 0
            out[:, :, :, 2 * w2:] = 0
        return out


def torch_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2)


def check_exact(candidate: Callable[[torch.Tensor], torch.Tensor]) -> None:
    generator = torch.Generator().manual_seed(0)
    for shape in ((3, 5, 8, 8), (2, 3, 7, 9)):
        values = torch.randint(0, 3, shape, generator=generator).float()  # small integers: many ties
        for layout in (torch.contiguous_format, torch.channels_last):
            a = values.clone(memory_format=layout).requires_grad_()
            b = a.detach().clone().requires_grad_()  # clone keeps the layout
            ya, yb = torch_pool(a), candidate(b)
            g = torch.randn(ya.shape, generator=generator)
            ya.backward(g)
            yb.backward(g)
            assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad), f"not exact on {shape}"


def seconds(pool: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int = 5) -> float:
    for _ in range(2):
        x.grad = None
        pool(x).sum().backward()
    start = time.perf_counter()
    for _ in range(repeats):
        x.grad = None
        y = pool(x)
        y.backward(torch.ones_like(y))
    return (time.perf_counter() - start) / repeats


def main() -> None:
    header("2x2 max-pool forward + backward: torch, one pass, torch.compile")
    compiled = torch.compile(torch_pool, dynamic=False)
    for candidate in (OnePassMaxPool2x2.apply, compiled):
        check_exact(candidate)
    print("both candidates equal F.max_pool2d exactly (values and gradients, ties included)\n")
    print("| shape | dtype | torch ms | one pass ms | torch.compile ms |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
            times = [seconds(pool, x) * 1e3 for pool in (torch_pool, OnePassMaxPool2x2.apply, compiled)]
            print(f"| {list(shape)} | {str(dtype).removeprefix('torch.')} | " + " | ".join(f"{t:.0f}" for t in times)
                  + " |", flush=True)


if __name__ == "__main__":
    main()

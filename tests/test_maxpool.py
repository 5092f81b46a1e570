"""The one-pass 2x2 max-pool of bench/maxpool.py (a candidate replacement for nn.MaxPool2d, whose backward
zero-fills its whole gradient first) against F.max_pool2d, exactly, in fp32: values and gradients, ties included,
in both memory layouts and with an odd last row and column (which belong to no window)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from repo_root import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))
from maxpool import OnePassMaxPool2x2  # noqa: E402  (bench/ is not a package)


@pytest.mark.parametrize("shape", [(3, 5, 8, 8), (2, 3, 7, 9), (1, 4, 2, 2), (2, 2, 16, 6)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("values", ["ties", "random"])
def test_one_pass_max_pool_equals_torch_exactly(shape: tuple[int, ...], layout: torch.memory_format,
                                                values: str) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    x = (torch.randint(0, 3, shape, generator=generator).float() if values == "ties"  # many equal maxima
         else torch.randn(shape, generator=generator))
    ours = x.clone(memory_format=layout).requires_grad_()
    theirs = x.clone(memory_format=layout).requires_grad_()
    out_ours, out_theirs = OnePassMaxPool2x2.apply(ours), F.max_pool2d(theirs, 2)
    assert torch.equal(out_ours, out_theirs)
    grad = torch.randn(out_theirs.shape, generator=generator)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    assert torch.equal(ours.grad, theirs.grad)

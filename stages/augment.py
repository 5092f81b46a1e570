"""Batched augmentation for training and test-time augmentation (TTA) for inference, on whole batches at once:
no per-sample Python. Shifts use reflected borders and are done by index arithmetic, so they work on uint8 images
as well as float ones and never read outside the image."""

from __future__ import annotations

import torch


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map indices in [-size+1, 2*size-2] onto [0, size-1] by mirroring at the borders (no edge repeat)."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def shift(images: torch.Tensor, dy: torch.Tensor | int, dx: torch.Tensor | int) -> torch.Tensor:
    """Shift each image of N x C x H x W by (dy, dx) pixels (per image when tensors of length N), filling the
    uncovered border by reflection. A positive dx moves the content to the right."""
    n, _, h, w = images.shape
    dy = torch.as_tensor(dy, device=images.device).expand(n)
    dx = torch.as_tensor(dx, device=images.device).expand(n)
    rows = _reflect(torch.arange(h, device=images.device)[None, :] - dy[:, None], h)  # N x H
    cols = _reflect(torch.arange(w, device=images.device)[None, :] - dx[:, None], w)  # N x W
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return images[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half (in expectation) of the batch left-right."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)


def random_translate(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by an independent random (dy, dx) in [-max_shift, max_shift]^2 (reflect padding)."""
    n = images.shape[0]
    offsets = torch.randint(-max_shift, max_shift + 1, (2, n), generator=generator).to(images.device)
    return shift(images, offsets[0], offsets[1])


def augment_batch(images: torch.Tensor, flip: bool, translate: int, generator: torch.Generator) -> torch.Tensor:
    """The training augmentation: random flip, then random translation. Same generator state, same batch."""
    if flip:
        images = random_flip(images, generator)
    if translate > 0:
        images = random_translate(images, translate, generator)
    return images


def tta_views(images: torch.Tensor, views: int) -> list[tuple[torch.Tensor, float]]:
    """The test-time views of a batch and their weights (summing to 1):
    1: the image; 2: the image and its mirror; 6: those two plus each shifted one pixel up-left and down-right
    (the shifted four share half of the weight, as in the fast CIFAR-10 recipes)."""
    if views == 1:
        return [(images, 1.0)]
    flipped = images.flip(-1)
    if views == 2:
        return [(images, 0.5), (flipped, 0.5)]
    if views == 6:
        shifted = [shift(view, d, d) for view in (images, flipped) for d in (-1, 1)]
        return [(images, 0.25), (flipped, 0.25)] + [(view, 0.125) for view in shifted]
    raise ValueError(f"tta views must be 1, 2 or 6, got {views}")

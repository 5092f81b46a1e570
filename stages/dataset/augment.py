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


def apply_flips(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images where `mask` (one bool per image) is true."""
    return torch.where(mask.to(images.device)[:, None, None, None], images.flip(-1), images)


def alternating_flips(n_images: int, seed: int) -> torch.Tensor:
    """Each training image's orientation in even epochs (a fixed random half mirrored); odd epochs use the
    opposite, so over every two epochs each image is seen both ways (airbench's alternating flip: less
    repetition than flipping afresh at random each epoch)."""
    return torch.rand(n_images, generator=torch.Generator().manual_seed(seed * 7919 + 1)) < 0.5


def flip_mask(mode: str, indices: torch.Tensor, epoch: int, generator: torch.Generator,
              orientations: torch.Tensor | None = None) -> torch.Tensor | None:
    """Which images of the batch (dataset `indices`) to mirror under `train.augment.flip`; None for `none`.
    alternate needs the `orientations` from `alternating_flips`."""
    if mode == "random":
        return torch.rand(indices.shape[0], generator=generator) < 0.5
    if mode == "alternate":
        assert orientations is not None
        return orientations[indices.cpu()] ^ bool(epoch % 2)
    return None


def random_translate(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by an independent random (dy, dx) in [-max_shift, max_shift]^2 (reflect padding)."""
    n = images.shape[0]
    offsets = torch.randint(-max_shift, max_shift + 1, (2, n), generator=generator).to(images.device)
    return shift(images, offsets[0], offsets[1])


def cutout(images: torch.Tensor, size: int, fill: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Paint a size x size square (clipped at the borders) centred on a random pixel of each image with `fill`
    (one value per channel: the dataset mean, i.e. zero after normalization, as in Cutout / airbench96)."""
    n, channels, h, w = images.shape
    centres = torch.stack([torch.randint(0, h, (n,), generator=generator),
                           torch.randint(0, w, (n,), generator=generator)]).to(images.device)
    low = size // 2
    rows = torch.arange(h, device=images.device)[None, :] - centres[0][:, None]  # N x H, offset from the centre
    cols = torch.arange(w, device=images.device)[None, :] - centres[1][:, None]
    inside = ((rows >= -low) & (rows < size - low))[:, :, None] & ((cols >= -low) & (cols < size - low))[:, None, :]
    return torch.where(inside[:, None], fill.to(images.device, images.dtype).view(1, channels, 1, 1), images)


def augment_batch(images: torch.Tensor, flips: torch.Tensor | None, translate: int, generator: torch.Generator,
                  cutout_size: int = 0, fill: torch.Tensor | None = None) -> torch.Tensor:
    """The training augmentation: mirror the images `flips` marks (see `flip_mask`), translate at random, then
    cut out a square (when cutout_size > 0; `fill` is its colour). Same generator state, same batch."""
    if flips is not None:
        images = apply_flips(images, flips)
    if translate > 0:
        images = random_translate(images, translate, generator)
    if cutout_size > 0:
        assert fill is not None
        images = cutout(images, cutout_size, fill, generator)
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

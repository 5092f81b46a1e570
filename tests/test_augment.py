"""Batched augmentation and TTA views do exactly what they say, on whole batches."""

from __future__ import annotations

import torch

from stages.dataset.augment import (alternating_flips, apply_flips, augment_batch, flip_mask, random_translate, shift,
                                    tta_views)


def images(n: int = 64, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_shift_moves_content_and_reflects_border() -> None:
    x = images(2)
    right = shift(x, 0, 1)
    assert torch.equal(right[..., :, 1:], x[..., :, :-1])
    assert torch.equal(right[..., :, 0], x[..., :, 1])  # reflected, not repeated
    down = shift(x, 2, 0)
    assert torch.equal(down[..., 2:, :], x[..., :-2, :])
    assert torch.equal(down[..., 0, :], x[..., 2, :]) and torch.equal(down[..., 1, :], x[..., 1, :])
    assert torch.equal(shift(x, 0, 0), x)
    assert right.dtype == torch.uint8 and right.shape == x.shape


def random_flip(x: torch.Tensor, seed: int) -> torch.Tensor:
    mask = flip_mask("random", torch.arange(x.shape[0]), 0, torch.Generator().manual_seed(seed))
    assert mask is not None
    return apply_flips(x, mask)


def test_flip_is_a_flip_of_about_half_and_seeded() -> None:
    x = images(400)
    out = random_flip(x, 1)
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped | kept).all())
    assert 150 < int(flipped.sum()) < 250
    assert torch.equal(out, random_flip(x, 1))
    assert not torch.equal(out, random_flip(x, 2))


def test_alternating_flip_mirrors_each_image_every_other_epoch() -> None:
    orientations = alternating_flips(1000, seed=0)
    assert 400 < int(orientations.sum()) < 600
    assert torch.equal(orientations, alternating_flips(1000, seed=0))
    assert not torch.equal(orientations, alternating_flips(1000, seed=1))
    batch = torch.tensor([5, 17, 999, 0])
    generator = torch.Generator().manual_seed(0)
    even = flip_mask("alternate", batch, 0, generator, orientations)
    odd = flip_mask("alternate", batch, 1, generator, orientations)
    assert even is not None and odd is not None
    assert torch.equal(even, orientations[batch]) and torch.equal(odd, ~orientations[batch])
    assert torch.equal(flip_mask("alternate", batch, 4, generator, orientations), even)
    assert flip_mask("none", batch, 0, generator) is None


def test_translate_stays_in_bounds_and_matches_a_shift() -> None:
    x = images(50)
    out = random_translate(x, 2, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == x.dtype
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    for original, result in zip(x, out):
        matches = [s for s in shifts if torch.equal(shift(original[None], *s)[0], result)]
        assert matches, "every output must be the input shifted by at most 2 pixels"


def test_augment_batch_same_seed_same_batch() -> None:
    x = images(32)
    flips = torch.arange(32) % 3 == 0
    a = augment_batch(x, flips, 2, torch.Generator().manual_seed(7))
    b = augment_batch(x, flips, 2, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(augment_batch(x, None, 0, torch.Generator().manual_seed(7)), x)
    assert torch.equal(augment_batch(x, flips, 0, torch.Generator().manual_seed(7)), apply_flips(x, flips))


def test_tta_views_are_the_promised_images() -> None:
    x = images(4).float()
    assert len(tta_views(x, 1)) == 1 and torch.equal(tta_views(x, 1)[0][0], x)
    two = tta_views(x, 2)
    assert torch.equal(two[1][0], x.flip(-1))
    six = tta_views(x, 6)
    assert len(six) == 6 and abs(sum(w for _, w in six) - 1.0) < 1e-9
    assert torch.equal(six[0][0], x) and torch.equal(six[1][0], x.flip(-1))
    assert torch.equal(six[2][0], shift(x, -1, -1)) and torch.equal(six[3][0], shift(x, 1, 1))
    assert torch.equal(six[4][0], shift(x.flip(-1), -1, -1)) and torch.equal(six[5][0], shift(x.flip(-1), 1, 1))


def test_cutout_paints_one_clipped_square_per_image_with_the_fill() -> None:
    x = torch.full((200, 3, 10, 10), 255, dtype=torch.uint8)
    fill = torch.tensor([1, 2, 3], dtype=torch.uint8)
    out = augment_batch(x, None, 0, torch.Generator().manual_seed(5), cutout_size=4, fill=fill)
    painted = (out != 255).all(1)  # N x H x W: all three channels replaced
    assert bool(((out != 255).any(1) == painted).all())
    for image, mask in zip(out, painted):
        assert torch.equal(image[:, mask], fill[:, None].expand(3, int(mask.sum())))
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert 1 <= len(rows) <= 4 and 1 <= len(cols) <= 4  # clipped at the border, never larger
        assert int(mask.sum()) == len(rows) * len(cols)  # one axis-aligned rectangle
    sizes = painted.sum((1, 2))
    assert int((sizes == 16).sum()) > 50  # most squares are whole
    again = augment_batch(x, None, 0, torch.Generator().manual_seed(5), cutout_size=4, fill=fill)
    assert torch.equal(out, again)

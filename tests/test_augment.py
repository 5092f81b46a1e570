"""Batched augmentation and TTA views do exactly what they say, on whole batches."""

from __future__ import annotations

import torch

from stages.augment import augment_batch, random_flip, random_translate, shift, tta_views


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


def test_flip_is_a_flip_of_about_half_and_seeded() -> None:
    x = images(400)
    out = random_flip(x, torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped | kept).all())
    assert 150 < int(flipped.sum()) < 250
    assert torch.equal(out, random_flip(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(out, random_flip(x, torch.Generator().manual_seed(2)))


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
    a = augment_batch(x, True, 2, torch.Generator().manual_seed(7))
    b = augment_batch(x, True, 2, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(augment_batch(x, False, 0, torch.Generator().manual_seed(7)), x)


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

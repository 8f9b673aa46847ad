"""The training augmentation draws what shop photos show and Fruits-360 does not."""

from __future__ import annotations

import math

import torch
from fruitserve.train.presets import TrainAugment

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _dark_disc_on_white(n: int, size: int = 64, radius: float = 26.0) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius**2).float()
    return (1.0 - 0.8 * disc).expand(n, 3, size, size).clone()


def test_small_fruit_stays_whole_inside_the_frame():
    augment = TrainAugment(MEAN, STD, rotation_degrees=0.0, translate=0.0, small_p=1.0, small_zoom=(0.45, 0.8))
    x = _dark_disc_on_white(256)
    out = augment._geometry(x, torch.Generator().manual_seed(0))
    dark = (out[:, 0] < 0.6).flatten(1).sum(1).float()
    full = float((x[0, 0] < 0.6).sum())
    # area scales with zoom^2: between 0.45^2 and 0.8^2 of the full disc; a disc cut by the frame would fall below
    assert bool((dark >= 0.45**2 * full * 0.9).all()) and bool((dark <= 0.8**2 * full * 1.1).all())
    # the whole zoom range is drawn, not just one end of it
    zoom = (dark / full).sqrt()
    assert float(zoom.min()) < 0.5 and float(zoom.max()) > 0.75
    centres_x = (out[:, 0] < 0.6).float().mul(torch.arange(64.0)).sum((1, 2)) / dark
    assert float(centres_x.std()) > 3.0, "small fruit should be moved around the frame, not kept centred"


def test_most_samples_keep_fruits360_scale():
    augment = TrainAugment(MEAN, STD, rotation_degrees=0.0, translate=0.0)
    x = _dark_disc_on_white(512)
    out = augment._geometry(x, torch.Generator().manual_seed(1))
    full = float((x[0, 0] < 0.6).sum())
    ratio = (out[:, 0] < 0.6).flatten(1).sum(1).float() / full
    small = float((ratio < 0.8**2 * 0.95).float().mean())
    assert math.isclose(small, augment.small_p, abs_tol=0.07)


def test_light_changes_gamma_and_colour_cast_within_range():
    augment = TrainAugment(MEAN, STD, light_p=1.0)
    grey = torch.full((64, 3, 8, 8), 0.5)
    out = augment._light(grey, torch.Generator().manual_seed(0))
    assert bool(((out >= 0) & (out <= 1)).all())
    red_over_blue = out[:, 0, 0, 0] / out[:, 2, 0, 0]
    assert float(red_over_blue.min()) < 0.95 and float(red_over_blue.max()) > 1.05  # both cool and warm casts
    green = out[:, 1, 0, 0]  # gamma alone moves the untinted channel both ways
    assert float(green.min()) < 0.46 and float(green.max()) > 0.54


def test_augmented_batch_is_finite_normalised_and_reproducible():
    augment = TrainAugment(MEAN, STD)
    images = (torch.rand((16, 3, 32, 32), generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    first = augment(images, torch.Generator().manual_seed(3))
    second = augment(images, torch.Generator().manual_seed(3))
    assert first.shape == (16, 3, 32, 32) and first.dtype == torch.float32
    assert bool(torch.isfinite(first).all())
    assert float(first.min()) >= (0 - 0.5) / 0.25 - 1e-4 and float(first.max()) <= (1 - 0.5) / 0.25 + 1e-4
    assert torch.equal(first, second)

"""Transform presets: the training augmentation here, evaluation in ``handler.preprocessing``.

Training images are cached as uint8 at model resolution by the *same* function the
handler uses, so train and eval see identically resized pixels; augmentation then runs
on whole batches of tensors (one ``grid_sample`` for all geometry).

Fruits-360 shows each fruit centred on pure white. Shop photos have clutter, other
light and off-centre fruit, so the preset also swaps the white background for random
surfaces or a clutter of other fruit, shrinks and moves the fruit inside the frame,
changes the light (gamma, warm/cool), shifts colour balance, blurs and adds noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fruitserve.handler.preprocessing import normalize


@dataclass
class TrainAugment:
    mean: Sequence[float]
    std: Sequence[float]
    rotation_degrees: float = 45.0
    zoom: tuple[float, float] = (0.8, 1.25)  # >1 crops into the fruit, <1 leaves room around it
    translate: float = 0.1
    # Fruits-360 fruit always fills the frame; a shop photo's fruit often does not. Some samples
    # therefore show the fruit small and anywhere in the frame (it stays whole).
    small_p: float = 0.3
    small_zoom: tuple[float, float] = (0.45, 0.8)
    background_p: float = 0.5
    # Several Fruits-360 classes differ only in shade (Apple Red 1/2/3), so colour jitter stays mild.
    color_p: float = 0.5
    brightness: tuple[float, float] = (0.8, 1.2)
    contrast: tuple[float, float] = (0.85, 1.15)
    saturation: tuple[float, float] = (0.85, 1.15)
    white_balance: float = 0.06
    # Light: a gamma curve and a warm/cool cast, the two things shop lighting changes most.
    light_p: float = 0.3
    gamma: tuple[float, float] = (0.75, 1.33)
    temperature: float = 0.1
    blur_p: float = 0.2
    noise_p: float = 0.2
    white_threshold: float = 0.92

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 N x 3 x S x S to a normalised, augmented float batch on the same device."""
        x = batch.float().div_(255.0)
        n = x.shape[0]
        x = self._geometry(x, generator)
        x = self._background(x, generator)
        x = self._light(x, generator)
        x = self._colour(x, generator)
        x = self._blur(x, generator)
        if self.noise_p > 0:
            sigma = _uniform(n, 0.0, 0.04, generator, x.device) * _bernoulli(n, self.noise_p, generator, x.device)
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x = x + noise * sigma.view(n, 1, 1, 1)
        x = x.clamp_(0.0, 1.0)
        return normalize(x.mul_(255.0), self.mean, self.std)

    def _geometry(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        angle = _uniform(n, -self.rotation_degrees, self.rotation_degrees, g, x.device) * (math.pi / 180)
        zoom = _log_uniform(n, self.zoom, g, x.device)
        small = _bernoulli(n, self.small_p, g, x.device)
        zoom = torch.where(small > 0, _log_uniform(n, self.small_zoom, g, x.device), zoom)
        flip = torch.where(_bernoulli(n, 0.5, g, x.device) > 0, -1.0, 1.0)
        # theta maps output to input coordinates: a fruit shrunk by `zoom` stays whole for |shift| <= 1/zoom - 1
        room = self.translate + (1.0 / zoom - 1.0).clamp(min=0.0)
        tx = _uniform(n, -1.0, 1.0, g, x.device) * room
        ty = _uniform(n, -1.0, 1.0, g, x.device) * room
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # sample (x - 1) with zero padding so that what comes in from outside is white, like the studio background
        return F.grid_sample(x - 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1.0

    def _background(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        use = _bernoulli(n, self.background_p, g, x.device).view(n, 1, 1, 1)
        if not use.any():
            return x
        white = (x.min(dim=1, keepdim=True).values > self.white_threshold).float()
        # grow the background by a pixel into the light anti-aliased rim, then soften the cut: otherwise
        # every pasted fruit wears a white outline that no real photo has
        white = F.avg_pool2d(F.max_pool2d(white, 3, stride=1, padding=1), 3, stride=1, padding=1)
        # three kinds of surface: a flat colour, a smooth colour field, or a clutter of other fruit
        flat = torch.rand((n, 3, 1, 1), generator=g).to(x.device).expand(n, 3, h, w)
        field = F.interpolate(torch.rand((n, 3, 4, 4), generator=g).to(x.device), size=(h, w), mode="bicubic",
                              align_corners=False).clamp(0, 1)
        clutter = self._clutter(x, white, field, g)
        kind = torch.randint(0, 3, (n,), generator=g).to(x.device).view(n, 1, 1, 1)
        background = torch.where(kind == 0, flat, torch.where(kind == 1, field, clutter))
        replaced = x * (1 - white) + background * white
        return torch.where(use > 0, replaced, x)

    def _clutter(self, x: torch.Tensor, white: torch.Tensor, field: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """A shelf of other fruit: three shuffled, shifted copies of the batch laid over each other (the darker,
        i.e. fruit, pixel wins), slightly softened, on a colour field where no fruit lands. Small fruit leaves
        most of a frame white, so one copy alone would rarely look busy."""
        n, _, h, w = x.shape
        shelf = torch.ones_like(x)
        covered = torch.zeros_like(white)
        for _ in range(3):
            perm = torch.randperm(n, generator=g).to(x.device)
            dy, dx = (int(v) for v in torch.randint(0, max(h, w), (2,), generator=g))
            shift = (dy % h, dx % w)
            shelf = torch.minimum(shelf, x[perm].flip(-1).roll(shift, dims=(2, 3)))
            covered = torch.maximum(covered, 1 - white[perm].flip(-1).roll(shift, dims=(2, 3)))
        shelf = shelf * covered + field * (1 - covered)
        return F.avg_pool2d(shelf, 3, stride=1, padding=1, count_include_pad=False)

    def _light(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        use = _bernoulli(n, self.light_p, g, x.device).view(n, 1, 1, 1)
        gamma = 1 + (_log_uniform(n, self.gamma, g, x.device).view(n, 1, 1, 1) - 1) * use
        warm = _uniform(n, -self.temperature, self.temperature, g, x.device).view(n, 1, 1, 1) * use
        cast = torch.cat([1 + warm, torch.ones_like(warm), 1 - warm], dim=1)  # warm: more red, less blue
        return (x.clamp(min=0.0) ** gamma * cast).clamp(0, 1)

    def _colour(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        use = _bernoulli(n, self.color_p, g, x.device).view(n, 1, 1, 1)

        def factor(lo: float, hi: float) -> torch.Tensor:
            return 1 + (_uniform(n, lo, hi, g, x.device).view(n, 1, 1, 1) - 1) * use

        brightness, contrast, saturation = factor(*self.brightness), factor(*self.contrast), factor(*self.saturation)
        balance = 1 + (torch.rand((n, 3, 1, 1), generator=g).to(x.device) - 0.5) * self.white_balance * use
        x = x * brightness * balance
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = grey + (x - grey) * saturation
        mean = grey.mean(dim=(2, 3), keepdim=True)
        return (mean + (x - mean) * contrast).clamp(0, 1)

    def _blur(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        use = _bernoulli(n, self.blur_p, g, x.device).view(n, 1, 1, 1)
        if not use.any():
            return x
        sigma = float(_uniform(1, 0.5, 1.5, g, torch.device("cpu")))
        radius = 2
        t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        kernel = torch.exp(-(t**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        horizontal = kernel.view(1, 1, 1, -1).repeat(3, 1, 1, 1)
        vertical = kernel.view(1, 1, -1, 1).repeat(3, 1, 1, 1)
        blurred = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), horizontal, groups=3)
        blurred = F.conv2d(F.pad(blurred, (0, 0, radius, radius), mode="replicate"), vertical, groups=3)
        return torch.where(use > 0, blurred, x)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=g) * (hi - lo) + lo).to(device)


def _log_uniform(n: int, bounds: tuple[float, float], g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.exp(_uniform(n, math.log(bounds[0]), math.log(bounds[1]), g, device))


def _bernoulli(n: int, p: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=g) < p).float().to(device)

"""Images the model was not trained on, drawn in code from a run's own validation images.

Two uses: ``bench/robustness.py`` measures accuracy under the *shifts* (backgrounds, small and off-centre
fruit, light, blur and JPEG: a stand-in for shop photos), and the uncertainty fit (``train/uncertainty.py``)
needs inputs that must be flagged: shifted fruit, *composites* of several fruits in one frame, and *textures*
that are no fruit at all. All of it is made here from pixels the project may use; nothing is fetched.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

Shift = Callable[[Image.Image, random.Random], Image.Image]


def _mask(image: Image.Image) -> Image.Image:
    """Where the studio background is: near-white pixels, edges softened."""
    rgb = np.asarray(image, dtype=np.int16)
    white = (rgb.min(axis=2) > 235).astype(np.uint8) * 255
    return Image.fromarray(white, "L").filter(ImageFilter.GaussianBlur(1))


def _texture(size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    kind = rng.randrange(3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # wood-like stripes
        base = np.array([rng.randint(90, 170), rng.randint(50, 110), rng.randint(20, 60)], np.float32)
        stripes = 0.75 + 0.25 * np.sin(xx / rng.uniform(2, 5) + 3 * np.sin(yy / rng.uniform(8, 20)))
        arr = base * stripes[..., None]
    elif kind == 1:  # checkerboard (tiles, a tablecloth)
        cell = rng.randint(6, 16)
        on = ((xx // cell + yy // cell) % 2).astype(np.float32)[..., None]
        a = np.array([rng.randint(0, 255) for _ in range(3)], np.float32)
        b = np.array([rng.randint(0, 255) for _ in range(3)], np.float32)
        arr = a * on + b * (1 - on)
    else:  # coloured noise (a busy shelf, out of focus)
        small = np.random.default_rng(rng.randrange(2**32)).integers(0, 255, (h // 8 + 1, w // 8 + 1, 3))
        arr = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def background(image: Image.Image, rng: random.Random) -> Image.Image:
    return Image.composite(_texture(image.size, rng), image, _mask(image))


def small_on_white(image: Image.Image, rng: random.Random) -> Image.Image:
    return small_off_centre(image, rng, textured=False)


def smaller_on_white(image: Image.Image, rng: random.Random) -> Image.Image:
    return small_off_centre(image, rng, textured=False, scale=0.35)


def small_off_centre(image: Image.Image, rng: random.Random, textured: bool = True, scale: float = 0.55) -> Image.Image:
    w, h = image.size
    fruit = image.resize((int(w * scale), int(h * scale)), Image.BILINEAR)
    canvas = _texture(image.size, rng) if textured else Image.new("RGB", image.size, (255, 255, 255))
    x, y = rng.randint(0, w - fruit.width), rng.randint(0, h - fruit.height)
    canvas.paste(fruit, (x, y), _invert(_mask(fruit)))
    return canvas


def _invert(mask: Image.Image) -> Image.Image:
    return mask.point(lambda v: 255 - v)


def lighting(image: Image.Image, rng: random.Random) -> Image.Image:
    arr = np.asarray(image, np.float32) / 255
    tint = np.array([1.15, 1.0, 0.8] if rng.random() < 0.5 else [0.85, 0.95, 1.15], np.float32)
    gamma = rng.uniform(0.6, 1.6)
    return Image.fromarray((np.clip((arr * tint) ** gamma, 0, 1) * 255).astype(np.uint8), "RGB")


def blur_and_jpeg(image: Image.Image, rng: random.Random) -> Image.Image:
    kernel = [0.0] * 25
    for i in range(5):  # horizontal motion blur, 5 px
        kernel[10 + i] = 0.2
    blurred = image.filter(ImageFilter.Kernel((5, 5), kernel, scale=1))
    buffer = io.BytesIO()
    blurred.save(buffer, "JPEG", quality=25)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def everything(image: Image.Image, rng: random.Random) -> Image.Image:
    return blur_and_jpeg(lighting(small_off_centre(image, rng), rng), rng)


CONDITIONS: dict[str, Shift | None] = {
    "clean": None,
    "background": background,
    "small_on_white": small_on_white,
    "small_off_centre": small_off_centre,
    "smaller_on_white": smaller_on_white,
    "lighting": lighting,
    "blur_jpeg_q25": blur_and_jpeg,
    "all_together": everything,
}


def composite(images: Sequence[Image.Image], rng: random.Random) -> Image.Image:
    """Two to four different fruits in one frame (a grid, or a row): no single label is right."""
    size = images[0].size
    count = rng.choice((2, 3, 4))
    chosen = rng.sample(list(images), count)
    canvas = Image.new("RGB", size, (255, 255, 255))
    cols = 2 if count == 4 else count
    rows = 2 if count == 4 else 1
    cell = (size[0] // cols, size[1] // rows)
    for i, image in enumerate(chosen):
        tile = image.resize(cell, Image.BILINEAR)
        canvas.paste(tile, ((i % cols) * cell[0], (i // cols) * cell[1] + (size[1] - rows * cell[1]) // 2))
    return canvas


def texture(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A surface with no fruit: wood, tiles, noise, or a smooth colour field."""
    if rng.random() < 0.25:
        small = np.random.default_rng(rng.randrange(2**32)).integers(0, 255, (3, 3, 3)).astype(np.uint8)
        return Image.fromarray(small).resize(size, Image.BICUBIC)
    return _texture(size, rng)


def out_of_distribution(images: Sequence[Image.Image], count: int, seed: int = 0) -> dict[str, list[Image.Image]]:
    """``count`` images of each kind the uncertainty rule must flag, made from (validation) ``images``."""
    rng = random.Random(seed)
    picks = [rng.choice(images) for _ in range(count)]
    return {"shifted": [everything(image, rng) for image in picks],
            "composites": [composite(images, rng) for _ in range(count)],
            "textures": [texture(images[0].size, rng) for _ in range(count)]}

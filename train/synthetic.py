"""A small synthetic fruit dataset, drawn in code, so the demo and tests need no downloads.

Each class differs in shape, colour and texture; every image gets a random rotation,
scale, position, lighting and background, so the task is easy but not trivial.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

SIZE = 100
Draw = Callable[[ImageDraw.ImageDraw, random.Random, float], None]


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _round_fruit(colour: tuple[int, int, int], spots: tuple[int, int, int] | None, stem: bool) -> Draw:
    def draw(d: ImageDraw.ImageDraw, rng: random.Random, r: float) -> None:
        c = SIZE / 2
        d.ellipse((c - r, c - r * 0.95, c + r, c + r * 0.95), fill=_jitter(rng, colour))
        if spots:
            for _ in range(int(r * 1.5)):
                a, rad = rng.uniform(0, 2 * math.pi), rng.uniform(0, r * 0.85)
                x, y = c + rad * math.cos(a), c + rad * math.sin(a)
                d.ellipse((x - 1, y - 1, x + 1, y + 1), fill=_jitter(rng, spots, 10))
        # a highlight, like a shop light on a glossy skin
        d.ellipse((c - r * 0.5, c - r * 0.6, c - r * 0.1, c - r * 0.25), fill=_jitter(rng, (255, 240, 230), 10))
        if stem:
            d.line((c, c - r * 0.9, c + r * 0.15, c - r * 1.25), fill=(90, 60, 20), width=3)

    return draw


def _banana(d: ImageDraw.ImageDraw, rng: random.Random, r: float) -> None:
    c = SIZE / 2
    box = (c - r * 1.3, c - r * 1.0, c + r * 1.3, c + r * 1.4)
    d.chord(box, 200, 340, fill=_jitter(rng, (235, 205, 50)))
    d.chord((box[0] + r * 0.3, box[1] + r * 0.35, box[2] - r * 0.3, box[3]), 200, 340, fill=(255, 255, 255))
    d.line((c + r * 1.05, c - r * 0.35, c + r * 1.2, c - r * 0.5), fill=(80, 60, 20), width=3)


def _grapes(d: ImageDraw.ImageDraw, rng: random.Random, r: float) -> None:
    c = SIZE / 2
    berry = r * 0.28
    colour = _jitter(rng, (95, 40, 110))
    for row in range(4):
        for col in range(4 - row):
            x = c - (3 - row) * berry + col * berry * 2 + rng.uniform(-2, 2)
            y = c - r * 0.7 + row * berry * 1.7 + rng.uniform(-2, 2)
            d.ellipse((x - berry, y - berry, x + berry, y + berry), fill=colour, outline=(60, 20, 70))


def _carrot(d: ImageDraw.ImageDraw, rng: random.Random, r: float) -> None:
    c = SIZE / 2
    d.polygon([(c - r * 0.35, c - r), (c + r * 0.35, c - r), (c, c + r * 1.2)], fill=_jitter(rng, (235, 120, 30)))
    for i in range(3):
        d.line((c, c - r, c + (i - 1) * r * 0.3, c - r * 1.45), fill=(40, 140, 40), width=3)


CLASSES: dict[str, Draw] = {
    "Apple Red": _round_fruit((200, 30, 35), None, stem=True),
    "Banana": _banana,
    "Carrot": _carrot,
    "Grape Purple": _grapes,
    "Kiwi": _round_fruit((130, 95, 55), (70, 50, 30), stem=False),
    "Lime": _round_fruit((90, 170, 50), None, stem=False),
    "Orange": _round_fruit((245, 145, 25), (220, 120, 20), stem=False),
}


def _background(rng: random.Random) -> Image.Image:
    # mostly white, as in Fruits-360, sometimes a coloured or gradient surface
    if rng.random() < 0.7:
        return Image.new("RGB", (SIZE, SIZE), _jitter(rng, (250, 250, 250), 5))
    top, bottom = _jitter(rng, (rng.randint(60, 200),) * 3, 60), _jitter(rng, (rng.randint(60, 200),) * 3, 60)
    bg = Image.linear_gradient("L").resize((SIZE, SIZE))
    return Image.composite(Image.new("RGB", bg.size, bottom), Image.new("RGB", bg.size, top), bg)


def draw_image(class_name: str, rng: random.Random) -> Image.Image:
    layer = Image.new("RGBA", (SIZE, SIZE), (255, 255, 255, 0))
    fruit = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    CLASSES[class_name](ImageDraw.Draw(fruit), rng, rng.uniform(24, 36))
    mask = fruit.convert("L").point(lambda v: 0 if v > 245 else 255)
    layer.paste(fruit, (0, 0), mask)
    layer = layer.rotate(rng.uniform(0, 360), resample=Image.BILINEAR, translate=(rng.randint(-8, 8), rng.randint(-8, 8)))
    image = _background(rng)
    image.paste(layer, (0, 0), layer)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.75, 1.2))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return image


def make_demo_data(out: Path, train_per_class: int = 40, test_per_class: int = 15, seed: int = 0) -> Path:
    """Write ``out/Training/<class>/*.jpg`` and ``out/Test/<class>/*.jpg``; the same seed gives the same files."""
    out = Path(out)
    for split, count, split_seed in (("Training", train_per_class, seed), ("Test", test_per_class, seed + 1)):
        rng = random.Random(split_seed)
        for class_name in CLASSES:
            folder = out / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw_image(class_name, rng).save(folder / f"{i:04d}.jpg", quality=92)
    return out

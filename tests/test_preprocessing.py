"""The shared decoding and preprocessing: every PIL mode, safety limits, and one tensor for all paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import image_bytes, jpeg_bytes
from fruitserve.handler.preprocessing import (
    CorruptImage,
    EmptyInput,
    ImageTooLarge,
    PreprocessConfig,
    UnsupportedImage,
    decode_image,
    load_uint8,
    preprocess,
    resize_and_crop,
)
from PIL import Image

CONFIG = PreprocessConfig(input_size=32)


def test_jpeg_decodes_to_normalised_tensor():
    tensor = preprocess(jpeg_bytes(), CONFIG)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert -3 < float(tensor.min()) < float(tensor.max()) < 3


@pytest.mark.parametrize("size", [(100, 100), (300, 120), (40, 90), (1, 1), (1, 500)])
def test_resize_and_crop_gives_square(size):
    image = Image.new("RGB", size, (10, 200, 30))
    assert resize_and_crop(image, 32).size == (32, 32)


def test_extreme_strip_resamples_only_the_central_square(monkeypatch):
    # Resizing the whole 1x2,000,000 strip first would allocate a 32x64,000,000 image (6 GB).
    strip = Image.new("RGB", (1, 2_000_000), (0, 0, 255))
    strip.paste((200, 30, 30), (0, 1_000_000 - 1, 1, 1_000_000 + 1))  # red only at the very centre
    resized = []
    original = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: resized.append(size) or original(self, size, *a, **k))
    out = resize_and_crop(strip, 32)
    assert out.size == (32, 32) and resized == [(32, 32)]
    assert out.getpixel((16, 16))[0] > 150  # it is the centre that was kept


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    decoded = decode_image(image_bytes(rgba, "PNG"))
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (8, 8), (0, 128))
    assert decode_image(image_bytes(la, "PNG")).getpixel((0, 0)) == (127, 127, 127)


def test_palette_with_transparency():
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    data = image_bytes(palette, "PNG", transparency=1)
    assert decode_image(data).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_png_is_scaled_not_clipped():
    array = np.full((4, 4), 32768, dtype=np.uint16)
    data = image_bytes(Image.fromarray(array), "PNG")
    assert Image.open(__import__("io").BytesIO(data)).mode.startswith("I")
    assert decode_image(data).getpixel((0, 0)) == (128, 128, 128)


def test_cmyk_and_grayscale_become_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    r, g, b = decode_image(image_bytes(cmyk, "JPEG")).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60
    assert decode_image(image_bytes(Image.new("L", (8, 8), 90), "PNG")).getpixel((1, 1)) == (90, 90, 90)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    assert decode_image(image_bytes(image, "JPEG", exif=exif)).size == (20, 40)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = __import__("io").BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    r, g, b = decode_image(buffer.getvalue()).getpixel((1, 1))
    assert r > 200 and b < 60


@pytest.mark.parametrize(
    ("data", "error", "status"),
    [
        (b"", EmptyInput, 400),
        (b"hello, I am text", UnsupportedImage, 415),
        (b"<html><body>no</body></html>", UnsupportedImage, 415),
        (jpeg_bytes()[:200], CorruptImage, 400),
    ],
)
def test_bad_input_raises_typed_error(data, error, status):
    with pytest.raises(error) as info:
        load_uint8(data, CONFIG)
    assert info.value.status == status
    assert info.value.to_dict()["code"] == status


def test_pixel_limit_is_checked_before_decoding():
    huge = image_bytes(Image.new("1", (20000, 20000)), "PNG")  # small file, 400 MP once decoded
    assert len(huge) < 200_000
    with pytest.raises(ImageTooLarge) as info:
        decode_image(huge, max_pixels=50_000_000)
    assert info.value.status == 413
    small_limit = PreprocessConfig(input_size=32, max_pixels=100)
    with pytest.raises(ImageTooLarge):
        load_uint8(jpeg_bytes(), small_limit)


def test_pil_bomb_guard_is_left_on():
    assert Image.MAX_IMAGE_PIXELS is not None

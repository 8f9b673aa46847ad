"""The one source of truth for turning image bytes into model input.

Training, evaluation, the TorchServe handler and ``fruit-batch`` (``--local`` and Ray) all import
this module, so a picture gives the same tensor everywhere. It needs only Pillow,
NumPy and torch (no torchserve), because it is also shipped inside ``fruit.mar``.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from fruitserve.handler.errors import CorruptImage, EmptyInput, ImageTooLarge, UnsupportedImage
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Larger than any real photo a client sends (a 48 MP camera is 8000x6000), far below
# what would exhaust a worker's memory. PIL's own bomb guard stays on as well.
DEFAULT_MAX_PIXELS = 50_000_000
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".ico",
)


@dataclass(frozen=True)
class PreprocessConfig:
    """What the model expects; stored in ``metadata.json`` next to every exported model."""

    input_size: int = 80  # fruit-train's default; a model's own metadata.json always says which
    mean: Sequence[float] = field(default=IMAGENET_MEAN)
    std: Sequence[float] = field(default=IMAGENET_STD)
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_metadata(cls, metadata: dict) -> PreprocessConfig:
        return cls(
            input_size=int(metadata["input_size"]),
            mean=tuple(metadata["mean"]),
            std=tuple(metadata["std"]),
            max_pixels=int(metadata.get("max_pixels", DEFAULT_MAX_PIXELS)),
        )

    def to_metadata(self) -> dict:
        return {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "max_pixels": self.max_pixels,
            "resize": "shorter side to input_size (bilinear, antialiased), center crop",
        }


def decode_image(data: bytes | bytearray | memoryview, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode untrusted bytes into an RGB image, or raise an :class:`InputError`.

    The size is checked from the header before any pixel is decoded, so a
    decompression bomb costs nothing. EXIF orientation is applied; animations give
    their first frame.
    """
    if data is None or len(data) == 0:
        raise EmptyInput("empty input: no image bytes")
    try:
        image = Image.open(io.BytesIO(bytes(data)))
    except UnidentifiedImageError:
        kind = sniff_image_format(data)
        if kind:
            raise CorruptImage(f"starts like a {kind} image but cannot be decoded") from None
        raise UnsupportedImage("not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImage(f"image header could not be read: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise CorruptImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    try:
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise CorruptImage(f"image data could not be decoded: {exc}") from None


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"),
)


def sniff_image_format(data: bytes | bytearray | memoryview) -> str | None:
    """The image format that the first bytes claim, to tell a damaged image (400) from a non-image (415)."""
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha composited on white, 16-bit scaled, not clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.max(initial=0) > 255 else 1.0
        grey = np.clip(np.round(values / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if (mode == "P" and "transparency" in image.info) or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (antialiased bilinear), then the central ``size`` square.

    Only the central square of the source is resampled (Pillow's ``box``; the filter still
    reads the pixels just outside it), so a 1x1,000,000 strip costs a ``size``-square of
    memory, not a ``size`` x 64,000,000 intermediate image.
    """
    width, height = image.size
    if (width, height) == (size, size):
        return image
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side), reducing_gap=None)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to a CHW uint8 tensor (no copy of the pixel data beyond one array)."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def normalize(batch_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NCHW or CHW to normalised float32, the same arithmetic everywhere."""
    shape = (-1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=batch_uint8.device).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32, device=batch_uint8.device).view(shape)
    return (batch_uint8.to(torch.float32) / 255.0 - mean_t) / std_t


def load_uint8(data: bytes | bytearray | memoryview, config: PreprocessConfig) -> torch.Tensor:
    """Bytes to the model-sized uint8 CHW tensor; normalisation happens per batch."""
    return to_uint8_tensor(resize_and_crop(decode_image(data, config.max_pixels), config.input_size))


def preprocess(data: bytes | bytearray | memoryview, config: PreprocessConfig) -> torch.Tensor:
    """Bytes to the normalised float32 CHW tensor the model was evaluated on."""
    return normalize(load_uint8(data, config), config.mean, config.std)

"""A corpus of awkward and hostile inputs, drawn in code, each with the HTTP status we answer and why.

Used by tests/test_reliability.py (alone, mixed into concurrent batches, through ``fruit-batch``)
and by bench/reliability.py. Images that are odd but valid (16-bit, CMYK, 1x1, animated, ...)
must be answered 200 with a label; inputs that are not usable images get their own 4xx JSON.

``python -m bench.corpus`` prints the table that RELIABILITY.md shows.
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import zlib
from dataclasses import dataclass, field

from PIL import Image

MAX_REQUEST_SIZE = 20 * 1024 * 1024  # config.properties: max_request_size


@dataclass(frozen=True)
class Case:
    name: str
    status: int  # what the server answers; 200 means a normal prediction
    why: str
    body: bytes = b""  # the request body (raw upload), unless ``files`` is a multipart upload
    headers: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str | None, bytes, str]] | None = None
    file_name: str | None = None  # also scored by fruit-batch from a file of this name (None: HTTP-only)
    handler_answers: bool = True  # False: TorchServe's frontend answers before our handler sees it

    @property
    def bad(self) -> bool:
        return self.status != 200


def _fruit(size: tuple[int, int] = (100, 100), seed: int = 0) -> Image.Image:
    """A lime-green disc on white: what Fruits-360 images look like, enough for a valid prediction."""
    from fruitserve.train.synthetic import draw_image

    return draw_image("Lime", random.Random(seed)).resize(size)


def _save(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` grey pixels, with a few KB of zlib'd zero rows.

    Decoded it would be 400 MB; the pixel limit must refuse it from the header alone.
    """
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    data = b"".join(compressor.compress(row) for _ in range(64)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def gif_huge_screen() -> bytes:
    """A GIF whose logical screen claims 65535 x 65535 pixels (4.3 gigapixels), with a 1x1 frame."""
    small = bytearray(_save(Image.new("P", (1, 1)), "GIF"))
    small[6:10] = struct.pack("<HH", 65535, 65535)
    return bytes(small)


def jpeg_huge_header() -> bytes:
    """A JPEG whose frame header (SOF0) claims 60000 x 60000 pixels."""
    data = bytearray(_save(_fruit((16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    return bytes(data)


def jpeg_bad_huffman() -> bytes:
    """Entropy-coded data replaced by all-ones bits, which are no valid Huffman code."""
    data = bytearray(_save(_fruit((64, 64)), "JPEG", quality=90))
    sos = data.index(b"\xff\xda")
    start = sos + 2 + struct.unpack(">H", data[sos + 2:sos + 4])[0]
    end = len(data) - 2  # keep EOI
    data[start:end] = bytes([0xFF, 0x00] * ((end - start) // 2)) + b"\x00" * ((end - start) % 2)
    return bytes(data)


def ycck_jpeg() -> bytes:
    """A CMYK JPEG whose Adobe marker says YCCK (transform 2): decoders convert it, colours change."""
    data = bytearray(_save(_fruit().convert("CMYK"), "JPEG", quality=90))
    adobe = data.find(b"Adobe")
    if adobe < 0:  # Pillow always writes the APP14 Adobe marker for CMYK; fail loudly if that changes
        raise RuntimeError("no Adobe marker in Pillow's CMYK JPEG")
    data[adobe + 11] = 2
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    """The fruit stored rotated, with EXIF orientation 6 saying how to turn it upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(_fruit((120, 80)).rotate(90, expand=True), "JPEG", exif=exif)


def animated(fmt: str) -> bytes:
    frames = [_fruit(seed=i) for i in range(3)]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_transparent_png() -> bytes:
    image = _fruit().convert("P", palette=Image.ADAPTIVE, colors=16)
    return _save(image, "PNG", transparency=0)


def sixteen_bit_png() -> bytes:
    grey = _fruit().convert("L")
    return _save(grey.point(lambda v: v * 257, "I").convert("I;16"), "PNG")


def heic_like() -> bytes:
    """An ISO-BMFF ``ftypheic`` box (what an iPhone HEIC starts with) followed by junk."""
    return struct.pack(">I", 24) + b"ftypheic" + b"\0\0\0\0" + b"mif1heic" + random.Random(1).randbytes(4000)


def good_jpeg(seed: int = 0) -> bytes:
    return _save(_fruit(seed=seed), "JPEG", quality=90)


def cases() -> list[Case]:
    """At least 30 kinds; the order is the order of the RELIABILITY.md table."""
    rng = random.Random(0)
    jpeg = good_jpeg()
    png = _save(_fruit(), "PNG")
    b64 = base64.b64encode(png).decode()
    json_type = {"Content-Type": "application/json"}
    return [
        # --- not an image at all ---
        Case("zero_bytes", 400, "empty body: nothing to decode (empty_input)", b"", file_name="zero_bytes.jpg"),
        Case("random_bytes", 415, "no known image signature (unsupported_media_type)", rng.randbytes(4096),
             file_name="random_bytes.jpg"),
        Case("text", 415, "plain text is not an image", b"this is not a fruit\n" * 20, file_name="text.jpg"),
        Case("text_plain_not_base64", 400, "sent as text/plain, TorchServe hands the body over as a string, which we "
             "accept as base64 text: this one is not valid base64", b"this is not a fruit\n" * 20,
             {"Content-Type": "text/plain"}),
        Case("html", 415, "an HTML page is not an image", b"<!doctype html><html><body><img src=x></body></html>",
             file_name="html.png"),
        Case("json_without_image", 400, 'JSON with no "data" field: no image in the request',
             json.dumps({"hello": "world"}).encode(), json_type),
        Case("json_bad_base64", 400, '"data" is not valid base64', b'{"data": "***not base64***"}', json_type),
        Case("json_base64_of_text", 415, "valid base64, but of text", json.dumps(
            {"data": base64.b64encode(b"hello fruit").decode()}).encode(), json_type),
        Case("json_list_of_two", 400, "two images in one request: TorchServe batches requests itself",
             json.dumps({"data": [b64, b64]}).encode(), json_type),
        Case("json_top_k_zero", 400, "top_k must be a positive integer", json.dumps({"data": b64, "top_k": 0}).encode(),
             json_type),
        Case("header_top_k_text", 400, "X-Top-K must be a positive integer", jpeg, {"X-Top-K": "lots"}),
        Case("pdf", 415, "a PDF document is not an image",
             b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n", {"Content-Type": "application/pdf"},
             file_name="document.pdf.jpg"),
        Case("svg", 415, "vector graphics are not decoded (no SVG renderer in the worker, by design)",
             b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><circle cx="50" cy="50" r="40"/></svg>',
             {"Content-Type": "image/svg+xml"}, file_name="drawing.svg.png"),
        Case("heic_like", 415, "HEIC is not supported (no HEIF decoder); the junk after the header is never read",
             heic_like(), file_name="photo.heic.jpg"),
        # --- damaged images ---
        Case("truncated_jpeg", 400, "JPEG cut in half: image data could not be decoded (corrupt_image)",
             jpeg[: len(jpeg) // 2], file_name="truncated.jpg"),
        Case("truncated_png", 400, "PNG cut in half (corrupt_image)", png[: len(png) // 2], file_name="truncated.png"),
        Case("jpeg_header_only", 400, "JPEG signature followed by junk: header cannot be read",
             b"\xff\xd8\xff\xe0" + rng.randbytes(200), file_name="header_only.jpg"),
        Case("jpeg_bad_huffman", 200, "scan data that is no valid Huffman code: libjpeg only warns and fills the "
             "blocks with grey, like every libjpeg-based decoder; a low-confidence prediction, not an error",
             jpeg_bad_huffman(), file_name="bad_huffman.jpg"),
        Case("png_bad_crc", 400, "the header chunk's CRC does not match: refused rather than guessed",
             png[:29] + b"\0\0\0\0" + png[33:], file_name="bad_crc.png"),
        # --- too large: refused from the header, before any pixel is decoded ---
        Case("png_bomb_20000x20000", 413, "400 megapixels declared, over the 50-megapixel limit (image_too_large)",
             png_bomb(), file_name="bomb.png"),
        Case("png_60_megapixels", 413, "8000x7500 declared: under Pillow's own bomb threshold (179 MP), over our "
             "50-megapixel limit, checked from the header (image_too_large)", png_bomb(8000, 7500),
             file_name="sixty_megapixels.png"),
        Case("gif_huge_screen", 413, "GIF logical screen of 65535x65535 declared (image_too_large)",
             gif_huge_screen(), file_name="huge_screen.gif"),
        Case("jpeg_huge_header", 413, "JPEG frame header declares 60000x60000 (image_too_large)",
             jpeg_huge_header(), file_name="huge_header.jpg"),
        Case("body_over_max_request_size", 413, "21 MiB body, over max_request_size (20 MiB): TorchServe's "
             "frontend refuses it before the worker, with an empty body",
             b"\xff\xd8\xff" + b"\0" * (MAX_REQUEST_SIZE + MAX_REQUEST_SIZE // 20), handler_answers=False),
        # --- odd transport ---
        Case("multipart_without_file", 415, "a form with only a text field: its one value is taken as the upload, "
             "and it is text, not an image",
             files={"comment": (None, b"apple please", "text/plain")}),
        Case("wrong_content_type_json", 200, "JPEG bytes labelled application/json: TorchServe cannot parse JSON and "
             "passes the bytes on; we decode the bytes, not the label", jpeg, json_type),
        Case("wrong_content_type_png", 200, "JPEG bytes labelled image/png: the bytes decide", jpeg,
             {"Content-Type": "image/png"}),
        Case("data_url_json", 200, "a data: URL in JSON, as browsers produce", json.dumps(
            {"data": f"data:image/png;base64,{b64}"}).encode(), json_type),
        # --- valid but unusual images: a normal prediction ---
        Case("one_by_one", 200, "1x1 pixel: upscaled to the input size", _save(_fruit((1, 1)), "PNG"),
             file_name="one_by_one.png"),
        Case("one_by_n_strip", 200, "1x20000 strip: only the central square is resampled, memory stays small",
             _save(_fruit((1, 20000)), "PNG"), file_name="strip.png"),
        Case("animated_gif", 200, "animated GIF: first frame", animated("GIF"), file_name="animated.gif"),
        Case("animated_webp", 200, "animated WebP: first frame", animated("WEBP"), file_name="animated.webp"),
        Case("png_16_bit", 200, "16-bit greyscale PNG: scaled to 8 bits, not clipped", sixteen_bit_png(),
             file_name="sixteen_bit.png"),
        Case("cmyk_jpeg", 200, "CMYK JPEG (print workflows): converted to RGB", _save(_fruit().convert("CMYK"), "JPEG"),
             file_name="cmyk.jpg"),
        Case("ycck_jpeg", 200, "YCCK JPEG (Adobe transform 2): converted to RGB", ycck_jpeg(), file_name="ycck.jpg"),
        Case("palette_transparency_png", 200, "palette PNG with a transparent index: composited on white",
             palette_transparent_png(), file_name="palette_transparent.png"),
        Case("la_png", 200, "grey + alpha: composited on white", _save(_fruit().convert("LA"), "PNG"),
             file_name="grey_alpha.png"),
        Case("rgba_png", 200, "RGBA: composited on white", _save(_fruit().convert("RGBA"), "PNG"), file_name="rgba.png"),
        Case("exif_rotated_jpeg", 200, "EXIF orientation 6: turned upright before resizing", exif_rotated_jpeg(),
             file_name="exif_rotated.jpg"),
        Case("tiff", 200, "TIFF", _save(_fruit(), "TIFF"), file_name="fruit.tiff"),
        Case("bmp", 200, "BMP", _save(_fruit(), "BMP"), file_name="fruit.bmp"),
        Case("ico", 200, "ICO (largest size stored)", _save(_fruit(), "ICO", sizes=[(64, 64)]), file_name="fruit.ico"),
        Case("png_saved_as_txt", 200, "a PNG with a .txt name: fruit-batch sniffs the content", png,
             file_name="looks_like_text.txt"),
        Case("json_deeply_nested", 400, "JSON nested 100000 levels deep: TorchServe cannot parse it and passes "
             "the bytes on; the handler refuses it (JSON nested too deeply) instead of failing the whole batch "
             "with RecursionError", body=b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
             headers={"Content-Type": "application/json"}),
    ]


def table() -> str:
    rows = ["| # | input | we answer | why |", "|---|---|---|---|"]
    for i, case in enumerate(cases(), 1):
        rows.append(f"| {i} | `{case.name}` | {case.status} | {case.why} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())

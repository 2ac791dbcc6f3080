"""Write ``tests/data/bad_inputs/``: small hostile or broken images and masks, and ``cases.json``
saying which role each plays in a view and which words its error must contain.

Deterministic: ``python tests/data/make_bad_inputs.py`` rewrites the same files. Every file is a few
KiB at most; the "huge" ones only claim their size in a header, or compress a uniform image.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent / "bad_inputs"
WIDTH, HEIGHT = 64, 48


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8))


def target() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[10:40, 15:45] = 255
    return mask


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` greyscale pixels, with one tiny IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def tiff_with_compression(code: int) -> bytes:
    """A TIFF whose Compression tag (259) names ``code`` (the strip stays raw bytes)."""
    data = bytearray(encoded(photo(), "TIFF"))
    offset = struct.unpack("<I", data[4:8])[0]
    count = struct.unpack("<H", data[offset : offset + 2])[0]
    for entry in range(count):
        at = offset + 2 + 12 * entry
        if struct.unpack("<H", data[at : at + 2])[0] == 259:
            data[at + 8 : at + 10] = struct.pack("<H", code)
    return bytes(data)


def files() -> dict[str, bytes]:
    good_png = encoded(photo(), "PNG")
    good_jpeg = encoded(photo(), "JPEG", quality=90)
    good_tiff = encoded(photo(), "TIFF")
    mask = Image.fromarray(target())
    full = Image.fromarray(np.full((HEIGHT, WIDTH), 255, np.uint8))
    return {
        "good_image.png": good_png,
        "good_target.png": encoded(mask, "PNG"),
        "image_zero_bytes.png": b"",
        "image_text.png": b"this is not an image at all\n" * 4,
        "image_truncated.png": good_png[: len(good_png) // 2],
        "image_truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "image_truncated.tif": good_tiff[: len(good_tiff) // 2],
        "image_unknown_compression.tif": tiff_with_compression(61000),
        "image_corrupt.webp": encoded(photo(), "WEBP")[:40] + b"\xff" * 40,
        "image_bad_header.bmp": b"BM" + b"\xff" * 60,
        "image_eps.eps": encoded(photo(), "EPS"),
        "image_qoi.qoi": encoded(photo(), "QOI"),
        "image_dds.dds": encoded(photo(), "DDS"),
        "image_gif.gif": encoded(photo(), "GIF"),
        "image_svg.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48"/>',
        "image_huge_dimensions.png": png_claiming(100_000, 100_000),
        "image_bomb.png": encoded(Image.new("1", (12_000, 12_000)), "PNG"),
        "mask_zero_bytes.png": b"",
        "mask_text.png": b"not a mask\n",
        "mask_truncated.png": encoded(mask, "PNG")[:60],
        "mask_jpeg.jpg": encoded(mask, "JPEG"),
        "mask_gif.gif": encoded(mask, "GIF"),
        "mask_wrong_size.png": encoded(mask.resize((32, 24)), "PNG"),
        "mask_transposed.png": encoded(mask.transpose(Image.Transpose.TRANSPOSE), "PNG"),
        "mask_empty.png": encoded(Image.new("L", (WIDTH, HEIGHT)), "PNG"),
        "mask_huge_dimensions.png": png_claiming(100_000, 100_000),
        "mask_bomb.png": encoded(Image.new("1", (12_000, 12_000)), "PNG"),
        "occluder_everywhere.png": encoded(full, "PNG"),
        "combined_background_only.png": encoded(full, "PNG"),
        "combined_all_occluder.png": encoded(Image.new("L", (WIDTH, HEIGHT)), "PNG"),
    }


UNREADABLE = "it is not a readable"
CASES = [
    ("image_zero_bytes.png", "image", UNREADABLE),
    ("image_text.png", "image", UNREADABLE),
    ("image_truncated.png", "image", "cannot decode this image"),
    ("image_truncated.jpg", "image", "cannot decode this image"),
    ("image_truncated.tif", "image", "cannot decode this image"),
    ("image_unknown_compression.tif", "image", UNREADABLE),
    ("image_corrupt.webp", "image", "cannot"),
    ("image_bad_header.bmp", "image", "cannot read this image"),
    ("image_eps.eps", "image", UNREADABLE),
    ("image_qoi.qoi", "image", UNREADABLE),
    ("image_dds.dds", "image", UNREADABLE),
    ("image_gif.gif", "image", UNREADABLE),
    ("image_svg.svg", "image", UNREADABLE),
    ("image_huge_dimensions.png", "image", "pixels"),
    ("image_bomb.png", "image", "more than 100,000,000 pixels"),
    ("mask_zero_bytes.png", "target_mask", UNREADABLE),
    ("mask_text.png", "target_mask", UNREADABLE),
    ("mask_truncated.png", "target_mask", "cannot"),
    ("mask_jpeg.jpg", "target_mask", "not a readable PNG file"),
    ("mask_gif.gif", "target_mask", "not a readable PNG file"),
    ("mask_wrong_size.png", "target_mask", "mask is 32x24 but"),
    ("mask_transposed.png", "target_mask", "mask is 48x64 but"),
    ("mask_empty.png", "target_mask", "the target mask is empty"),
    ("mask_huge_dimensions.png", "target_mask", "pixels"),
    ("mask_bomb.png", "target_mask", "more than 100,000,000 pixels"),
    ("mask_jpeg.jpg", "mask", "not a readable PNG file"),
    ("mask_wrong_size.png", "occluder_mask", "mask is 32x24 but"),
    ("occluder_everywhere.png", "occluder_mask", "the occluder mask covers the whole target"),
    ("combined_background_only.png", "mask", "the target mask is empty"),
    ("combined_all_occluder.png", "mask", "the target mask is empty"),
]


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in files().items():
        (OUT / name).write_bytes(data)
    cases = [{"file": file, "role": role, "error": error} for file, role, error in CASES]
    good = {"image": "good_image.png", "target_mask": "good_target.png"}
    (OUT / "cases.json").write_text(json.dumps({"good": good, "cases": cases}, indent=1) + "\n")
    sizes = sorted(((p.stat().st_size, p.name) for p in OUT.iterdir()), reverse=True)
    print(f"wrote {len(sizes)} files to {OUT}; largest {sizes[0][1]} ({sizes[0][0]} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

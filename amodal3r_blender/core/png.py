# SPDX-License-Identifier: GPL-3.0-or-later
"""PNG files from and to numpy arrays, with zlib only: Blender's Python has no Pillow.

Masks go to the server as greyscale PNGs and SAM masks come back as PNGs; both directions work on
``uint8`` arrays of shape ``(height, width[, channels])`` with the top row first, as in the file.
The decoder reads every non-interlaced PNG (greyscale, grey+alpha, RGB, RGBA, palette; 1 to 16
bits) with any of the five row filters; 16-bit samples keep their high byte, 1-, 2- and 4-bit
greyscale is scaled to 0..255.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from amodal3r.api.errors import InputError
from amodal3r.api.protocol import MAX_IMAGE_PIXELS

SIGNATURE = b"\x89PNG\r\n\x1a\n"
GREY, RGB, PALETTE, GREY_ALPHA, RGBA = 0, 2, 3, 4, 6
CHANNELS = {GREY: 1, RGB: 3, PALETTE: 1, GREY_ALPHA: 2, RGBA: 4}
COLOUR_TYPE_OF_CHANNELS = {1: GREY, 2: GREY_ALPHA, 3: RGB, 4: RGBA}


class PNGError(InputError):
    """Not a PNG this module reads; the message says what is wrong and what to do."""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels: np.ndarray, compression: int = 6) -> bytes:
    """An 8-bit PNG of a ``(H, W)`` grey or ``(H, W, 1|2|3|4)`` array, top row first."""
    array = np.asarray(pixels)
    if array.dtype != np.uint8:
        raise PNGError(f"PNG pixels must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in COLOUR_TYPE_OF_CHANNELS:
        raise PNGError(f"PNG pixels must be (H, W) or (H, W, 1..4), got shape {array.shape}")
    height, width, channels = array.shape
    if height == 0 or width == 0:
        raise PNGError("a PNG needs at least one pixel")
    rows = np.zeros((height, 1 + width * channels), np.uint8)  # filter byte 0 (None) per row
    rows[:, 1:] = np.ascontiguousarray(array).reshape(height, -1)
    header = struct.pack(">IIBBBBB", width, height, 8, COLOUR_TYPE_OF_CHANNELS[channels], 0, 0, 0)
    return b"".join(
        (
            SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), compression)),
            _chunk(b"IEND", b""),
        )
    )


def read_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The ``(kind, body)`` chunks of a PNG file up to IEND, their checksums checked."""
    if not data.startswith(SIGNATURE):
        raise PNGError("not a PNG file (wrong signature): save the mask as PNG")
    chunks, offset = [], len(SIGNATURE)
    while offset + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        end = offset + 12 + length
        if end > len(data):
            break
        body = data[offset + 8 : end - 4]
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(kind + body) != crc:
            raise PNGError(f"the PNG is damaged (bad checksum in its {kind.decode(errors='replace')} chunk)")
        chunks.append((kind, body))
        offset = end
        if kind == b"IEND":
            return chunks
    raise PNGError("the PNG is truncated: save it again")


def _header(body: bytes) -> tuple[int, int, int, int]:
    """``(width, height, bit depth, colour type)`` after checking what this decoder supports."""
    if len(body) != 13:
        raise PNGError("the PNG header is malformed")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
    if colour not in CHANNELS:
        raise PNGError(f"unknown PNG colour type {colour}")
    allowed = (1, 2, 4, 8, 16) if colour == GREY else (1, 2, 4, 8) if colour == PALETTE else (8, 16)
    if depth not in allowed:
        raise PNGError(f"a {depth}-bit PNG of colour type {colour} breaks the PNG rules: the file is damaged")
    if interlace:
        raise PNGError("interlaced PNGs are not supported: save the image without interlacing")
    if width == 0 or height == 0 or width * height > MAX_IMAGE_PIXELS:  # guards against decompression bombs
        raise PNGError(f"the PNG is {width}x{height}: empty or too large")
    return width, height, depth, colour


def _predict(kind: np.ndarray, left: np.ndarray, up: np.ndarray, up_left: np.ndarray) -> np.ndarray:
    """The filter predictors (PNG spec 9.2) for bytes whose rows use filter ``kind``."""
    estimate = left + up - up_left
    dist_left, dist_up, dist_up_left = np.abs(estimate - left), np.abs(estimate - up), np.abs(estimate - up_left)
    paeth = np.where(
        (dist_left <= dist_up) & (dist_left <= dist_up_left), left, np.where(dist_up <= dist_up_left, up, up_left)
    )
    choices = [np.zeros_like(left), left, up, (left + up) // 2, paeth]
    return np.choose(kind, choices)


def _unfilter(raw: np.ndarray, height: int, stride: int, bpp: int) -> np.ndarray:
    """Undo the row filters; pixels depend on their left and upper neighbours, so the work
    goes along anti-diagonals of pixels, each one a vectorised step."""
    rows = raw.reshape(height, 1 + stride)
    kinds = rows[:, 0]
    if kinds.max(initial=0) > 4:
        raise PNGError(f"unknown PNG row filter {int(kinds.max())}: the file is damaged")
    if not kinds.any():
        return rows[:, 1:]
    width = stride // bpp
    filtered = rows[:, 1:].reshape(height, width, bpp).astype(np.int32)
    out = np.zeros((height + 1, width + 1, bpp), np.int32)  # a zero row above and column left
    for diagonal in range(height + width - 1):
        r = np.arange(max(0, diagonal - width + 1), min(height, diagonal + 1))
        c = diagonal - r
        kind = kinds[r].astype(np.intp)[:, None]
        predicted = _predict(kind, out[r + 1, c], out[r, c + 1], out[r, c])
        out[r + 1, c + 1] = (filtered[r, c] + predicted) & 0xFF
    return out[1:, 1:].astype(np.uint8).reshape(height, stride)


def header_size(chunks: list[tuple[bytes, bytes]]) -> tuple[int, int]:
    """``(width, height)`` from a PNG's chunks, without decoding its pixels."""
    width, height, _, _ = _first_header(chunks)
    return width, height


def _first_header(chunks: list[tuple[bytes, bytes]]) -> tuple[int, int, int, int]:
    if not chunks or chunks[0][0] != b"IHDR":
        raise PNGError("the PNG has no header: the file is damaged")
    return _header(chunks[0][1])


def decode_png(data: bytes, palette_indices: bool = False) -> np.ndarray:
    """``(H, W, C)`` uint8 pixels, top row first; C is 1 (grey), 2, 3 or 4. Palettes become RGB(A),
    or stay ``(H, W, 1)`` indices with ``palette_indices`` unless they have transparency (the alpha
    then counts), as the server reads label masks."""
    chunks = read_chunks(bytes(data))
    width, height, depth, colour = _first_header(chunks)
    bits = CHANNELS[colour] * depth
    bpp, stride = max(1, bits // 8), (width * bits + 7) // 8
    try:
        raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    except zlib.error as error:
        raise PNGError(f"the PNG's image data is damaged ({error})") from None
    if len(raw) < height * (1 + stride):
        raise PNGError("the PNG's image data is shorter than its size says: the file is damaged")
    rows = _unfilter(np.frombuffer(raw, np.uint8, height * (1 + stride)), height, stride, bpp)
    if depth == 16:
        rows = rows.reshape(height, -1, 2)[:, :, 0]  # big-endian: the high byte comes first
    elif depth < 8:
        rows = _unpack(rows, width, depth, scale=colour == GREY)
    pixels = rows.reshape(height, width, CHANNELS[colour])
    keep_indices = palette_indices and not any(kind == b"tRNS" for kind, _ in chunks)
    if colour == PALETTE and not keep_indices:
        return _apply_palette(pixels, chunks)
    return np.ascontiguousarray(pixels)


def _unpack(rows: np.ndarray, width: int, depth: int, scale: bool) -> np.ndarray:
    """Samples packed several to a byte, most significant first; grey levels scaled to 0..255."""
    bits = np.unpackbits(rows, axis=1).reshape(rows.shape[0], -1, depth)
    samples = (bits * (1 << np.arange(depth - 1, -1, -1, dtype=np.uint8))).sum(axis=2, dtype=np.uint8)
    samples = samples[:, :width]
    return samples * np.uint8(255 // ((1 << depth) - 1)) if scale else samples


def _apply_palette(indices: np.ndarray, chunks: list[tuple[bytes, bytes]]) -> np.ndarray:
    palette = next((body for kind, body in chunks if kind == b"PLTE"), None)
    if palette is None or len(palette) % 3:
        raise PNGError("the palette PNG has no valid palette: the file is damaged")
    colours = np.frombuffer(palette, np.uint8).reshape(-1, 3)
    transparency = next((body for kind, body in chunks if kind == b"tRNS"), None)
    if transparency is not None:
        alpha = np.full((len(colours), 1), 255, np.uint8)
        alpha[: len(transparency), 0] = np.frombuffer(transparency, np.uint8)[: len(colours)]
        colours = np.concatenate([colours, alpha], axis=1)
    index = indices[:, :, 0]
    if int(index.max()) >= len(colours):
        raise PNGError("the palette PNG uses colours its palette lacks: the file is damaged")
    return colours[index]

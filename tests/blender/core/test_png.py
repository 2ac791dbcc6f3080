# SPDX-License-Identifier: GPL-3.0-or-later
"""The zlib-only PNG codec: round trips, every row filter, bit depths, palettes and broken files."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from amodal3r_blender.core import png


def _paeth(left: int, up: int, up_left: int) -> int:
    estimate = left + up - up_left
    distances = (abs(estimate - left), abs(estimate - up), abs(estimate - up_left))
    if distances[0] <= distances[1] and distances[0] <= distances[2]:
        return left
    return up if distances[1] <= distances[2] else up_left


def _filter_row(kind: int, row: bytes, prior: bytes, bpp: int) -> bytes:
    """The PNG spec's forward filter, byte by byte: an independent reference for the decoder."""
    out = bytearray()
    for i, value in enumerate(row):
        left = row[i - bpp] if i >= bpp else 0
        up = prior[i]
        up_left = prior[i - bpp] if i >= bpp else 0
        predictor = (0, left, up, (left + up) // 2, _paeth(left, up, up_left))[kind]
        out.append((value - predictor) % 256)
    return bytes(out)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(
    raw_rows: list[bytes],
    width: int,
    depth: int,
    colour: int,
    kinds: list[int],
    bpp: int,
    extra: list[tuple[bytes, bytes]] = (),
    interlace: int = 0,
) -> bytes:
    prior = bytes(len(raw_rows[0]))
    body = b""
    for kind, row in zip(kinds, raw_rows, strict=True):
        body += bytes([kind]) + _filter_row(kind, row, prior, bpp)
        prior = row
    header = struct.pack(">IIBBBBB", width, len(raw_rows), depth, colour, 0, 0, interlace)
    chunks = [_chunk(b"IHDR", header), *(_chunk(k, d) for k, d in extra)]
    # the image data split over two IDAT chunks, as encoders may do
    data = zlib.compress(body)
    chunks += [_chunk(b"IDAT", data[:7]), _chunk(b"IDAT", data[7:]), _chunk(b"IEND", b"")]
    return png.SIGNATURE + b"".join(chunks)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_encode_decode_round_trip(channels):
    rng = np.random.default_rng(channels)
    pixels = rng.integers(0, 256, (17, 23, channels), dtype=np.uint8)
    decoded = png.decode_png(png.encode_png(pixels))
    assert decoded.shape == (17, 23, channels)
    assert np.array_equal(decoded, pixels)


def test_two_dimensional_input_is_greyscale():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    data = png.encode_png(grey)
    assert data[25] == png.GREY  # colour type byte of IHDR
    assert np.array_equal(png.decode_png(data)[:, :, 0], grey)


def test_first_row_is_the_top_of_the_file():
    pixels = np.zeros((2, 3), np.uint8)
    pixels[0] = 255
    decoded = png.decode_png(png.encode_png(pixels))
    assert decoded[0, :, 0].tolist() == [255, 255, 255]
    assert decoded[1, :, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("kinds", [[0] * 9, [1] * 9, [2] * 9, [3] * 9, [4] * 9, [0, 1, 2, 3, 4, 4, 3, 2, 1]])
@pytest.mark.parametrize("channels, colour", [(1, png.GREY), (3, png.RGB), (4, png.RGBA), (2, png.GREY_ALPHA)])
def test_every_row_filter(kinds, channels, colour):
    rng = np.random.default_rng(len(set(kinds)) * 10 + channels)
    smooth = (np.add.outer(np.arange(9) * 7, np.arange(13) * 3)[:, :, None] + np.arange(channels) * 50) % 256
    pixels = np.where(rng.random((9, 13, 1)) < 0.3, rng.integers(0, 256, (9, 13, channels)), smooth).astype(np.uint8)
    rows = [pixels[r].tobytes() for r in range(9)]
    decoded = png.decode_png(_png(rows, 13, 8, colour, kinds, channels))
    assert np.array_equal(decoded, pixels)


def test_sixteen_bit_keeps_the_high_byte():
    values = np.array([[0x1234, 0xFF00, 0x00FF]], dtype=">u2")
    data = _png([values.tobytes()], 3, 16, png.GREY, [4], 2)
    assert png.decode_png(data)[0, :, 0].tolist() == [0x12, 0xFF, 0x00]


def test_one_bit_greyscale_is_scaled():
    row = bytes([0b10110000])  # 4 pixels: 1 0 1 1, then padding
    decoded = png.decode_png(_png([row], 4, 1, png.GREY, [0], 1))
    assert decoded[0, :, 0].tolist() == [255, 0, 255, 255]


def test_palette_with_transparency():
    palette = bytes([10, 20, 30, 200, 100, 0])
    data = _png([bytes([0, 1, 1])], 3, 8, png.PALETTE, [1], 1, extra=[(b"PLTE", palette), (b"tRNS", bytes([0]))])
    decoded = png.decode_png(data)
    assert decoded.shape == (1, 3, 4)
    assert decoded[0].tolist() == [[10, 20, 30, 0], [200, 100, 0, 255], [200, 100, 0, 255]]


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda d: b"GIF89a" + d[6:], "not a PNG"),
        (lambda d: d[:-20], "truncated"),
        (lambda d: d[:40] + bytes([d[40] ^ 0xFF]) + d[41:], "damaged"),
    ],
)
def test_broken_files_say_what_is_wrong(mangle, message):
    data = png.encode_png(np.zeros((4, 4), np.uint8))
    with pytest.raises(png.PNGError, match=message):
        png.decode_png(mangle(data))


def test_interlaced_is_refused_clearly():
    data = _png([bytes(4)], 4, 8, png.GREY, [0], 1, interlace=1)
    with pytest.raises(png.PNGError, match="interlac"):
        png.decode_png(data)


@pytest.mark.parametrize(
    "bad", [np.zeros((2, 2), np.float32), np.zeros((2, 2, 5), np.uint8), np.zeros((0, 3), np.uint8)]
)
def test_encode_refuses_what_it_cannot_write(bad):
    with pytest.raises(png.PNGError):
        png.encode_png(bad)


def test_png_errors_are_input_errors():
    """Operators report a bad mask file like any other bad input, with one except clause."""
    from amodal3r.api.errors import InputError

    assert issubclass(png.PNGError, InputError)

# SPDX-License-Identifier: GPL-3.0-or-later
"""Image and mask files as the server will read them (``amodal3r.io.inputs``), checked before any
server starts (batch.py). No bpy and no Pillow.

A picture's size and EXIF orientation come from its header, so a photo is never decoded here: the
formats are the server's (``api.protocol.IMAGE_FORMATS``: PNG, JPEG, WebP, TIFF, BMP), recognised
by their content, not their name. Masks are PNGs (``MASK_FORMATS``); their values are decoded with
the server's rules: the alpha channel when there is one, palette indices, else the luma. Like the
server, a mask is turned upright by its own orientation, or else, when it has the size of the
image's stored pixels, by the image's.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amodal3r.api.errors import InputError
from amodal3r.api.protocol import MAX_IMAGE_PIXELS

from . import png

JPEG_START = b"\xff\xd8"
# Start-of-frame markers hold the size; C4 (Huffman tables), C8 (reserved) and CC (arithmetic
# coding) share the range but are not frames.
JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # markers without a length
JPEG_SCAN, JPEG_END, JPEG_EXIF = 0xDA, 0xD9, 0xE1
TIFF_STARTS = (b"II*\x00", b"MM\x00*")
TIFF_WIDTH, TIFF_HEIGHT, TIFF_ORIENTATION = 256, 257, 274
EXIF_PREFIX = b"Exif\x00\x00"
SIDEWAYS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
FORMATS_TEXT = "PNG, JPEG, WebP, TIFF or BMP"


@dataclass(frozen=True)
class Header:
    """A picture's size as stored in its file, and its EXIF orientation tag (None without one)."""

    stored: tuple[int, int]  # (width, height)
    orientation: int | None = None

    @property
    def size(self) -> tuple[int, int]:
        """The upright size: what the server's model sees and the masks must match."""
        return self.stored[::-1] if self.orientation in SIDEWAYS else self.stored


def mask_fits(mask: Header, image: Header) -> bool:
    """Whether the server takes a mask of this size for the image: drawn on the upright image, or on
    its stored pixels (then turned with it), and upright once turned."""
    return mask.stored in (image.size, image.stored) and upright_size(mask, image) == image.size


def upright_size(mask: Header, image: Header) -> tuple[int, int]:
    """The mask's size once the server has turned it (see ``mask_values``)."""
    if mask.orientation is not None:
        return mask.size
    return image.size if mask.stored == image.stored else mask.stored


# --- headers --------------------------------------------------------------------------------


def read_header(path: Path, mask: bool = False) -> Header:
    """The size and orientation of an image file (a mask: a PNG file); an InputError says what is
    wrong and what to do."""
    header = _with_file(path, _mask_header_of if mask else _header_of)
    width, height = header.stored
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{width}x{height} is more than {MAX_IMAGE_PIXELS:,} pixels: downscale it")
    return header


def _with_file(path: Path, read: Callable[[mmap.mmap | bytes], Header]) -> Header:
    """``read`` on the file's bytes, mapped rather than read: a header needs only a few pages."""
    try:
        with path.open("rb") as handle:
            if path.stat().st_size == 0:
                return read(b"")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return read(data)
    except OSError as error:
        raise InputError(f"cannot be read ({error.strerror or error})") from None


def _header_of(data: mmap.mmap | bytes) -> Header:
    start = bytes(data[:16])
    if start.startswith(png.SIGNATURE):
        return _png_header(data)
    if start.startswith(JPEG_START):
        return _jpeg_header(data)
    if start.startswith(b"RIFF") and start[8:12] == b"WEBP":
        return _webp_header(data)
    if start.startswith(TIFF_STARTS):
        return _tiff_header(data)
    if start.startswith(b"BM"):
        return _bmp_header(data)
    raise InputError(f"not a {FORMATS_TEXT} file (the content counts, not the name): save it as PNG")


def _mask_header_of(data: mmap.mmap | bytes) -> Header:
    if not bytes(data[:8]) == png.SIGNATURE:
        raise InputError("not a PNG file (the content counts, not the name): save masks as PNG")
    return _png_header(data)


def _png_header(data: mmap.mmap | bytes) -> Header:
    """The IHDR size and any eXIf orientation; the chunks are walked (not decoded) to the end."""
    offset, width, height, orientation = len(png.SIGNATURE), 0, 0, None
    while offset + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        body = offset + 8
        if body + length + 4 > len(data):
            break
        if kind == b"IHDR" and length >= 8:
            width, height = struct.unpack_from(">II", data, body)
        elif kind == b"eXIf":
            orientation = exif_orientation(bytes(data[body : body + length]))
        elif kind == b"IEND":
            if not (width and height):
                raise InputError("a PNG without a size: the file is damaged, save it again")
            return Header((width, height), orientation)
        offset = body + length + 4
    raise InputError("the PNG is truncated: save it again")


def _jpeg_header(data: mmap.mmap | bytes) -> Header:
    """The frame size and any EXIF orientation, from the markers before the first frame header."""
    offset, orientation = 2, None
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            raise InputError("a damaged JPEG (a marker is missing): save it again")
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in JPEG_STANDALONE:
            offset += 2
            continue
        if marker in (JPEG_SCAN, JPEG_END):
            break
        (length,) = struct.unpack_from(">H", data, offset + 2)
        segment = bytes(data[offset + 4 : offset + 2 + length])
        if marker == JPEG_EXIF and segment.startswith(EXIF_PREFIX):
            orientation = exif_orientation(segment[len(EXIF_PREFIX) :])
        elif marker in JPEG_FRAMES and len(segment) >= 5:
            height, width = struct.unpack_from(">HH", segment, 1)
            if width and height:
                return Header((width, height), orientation)
            break
        offset += 2 + length
    raise InputError("a JPEG without a readable size (damaged or truncated): save it again")


def _webp_header(data: mmap.mmap | bytes) -> Header:
    """The canvas size (VP8X) or the frame size (VP8, VP8L), and the orientation of an EXIF chunk."""
    offset, size, orientation = 12, None, None
    while offset + 8 <= len(data):
        kind, length = struct.unpack_from("<4sI", data, offset)
        body = offset + 8
        if kind == b"VP8X" and length >= 10:
            low = struct.unpack_from("<HBHB", data, body + 4)
            size = (low[0] + (low[1] << 16) + 1, low[2] + (low[3] << 16) + 1)
        elif kind == b"VP8L" and length >= 5 and size is None:
            (bits,) = struct.unpack_from("<I", data, body + 1)
            size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        elif kind == b"VP8 " and length >= 10 and size is None:
            width, height = struct.unpack_from("<HH", data, body + 6)
            size = (width & 0x3FFF, height & 0x3FFF)
        elif kind == b"EXIF":
            block = bytes(data[body : body + length])
            orientation = exif_orientation(block[len(EXIF_PREFIX) :] if block.startswith(EXIF_PREFIX) else block)
        offset = body + length + (length & 1)  # chunks are padded to an even length
    if not size or not all(size):
        raise InputError("a WebP without a readable size (damaged or truncated): save it again")
    return Header(size, orientation)


def _tiff_header(data: mmap.mmap | bytes) -> Header:
    tags = tiff_tags(data, (TIFF_WIDTH, TIFF_HEIGHT, TIFF_ORIENTATION))
    if not tags.get(TIFF_WIDTH) or not tags.get(TIFF_HEIGHT):
        raise InputError("a TIFF without a readable size (damaged or truncated): save it again")
    # Pillow turns a TIFF upright as it opens it and drops the tag: the server sees an upright picture
    # with no orientation, so masks are never turned with a TIFF.
    stored = (tags[TIFF_WIDTH], tags[TIFF_HEIGHT])
    return Header(stored[::-1] if tags.get(TIFF_ORIENTATION) in SIDEWAYS else stored)


def _bmp_header(data: mmap.mmap | bytes) -> Header:
    try:
        (info_size,) = struct.unpack_from("<I", data, 14)
        if info_size == 12:  # the OS/2 header: 16-bit sizes
            width, height = struct.unpack_from("<HH", data, 18)
        else:
            width, height = struct.unpack_from("<ii", data, 18)
    except struct.error:
        raise InputError("a BMP without a readable size (damaged or truncated): save it again") from None
    if width <= 0 or height == 0:
        raise InputError("a BMP without a readable size (damaged or truncated): save it again")
    return Header((width, abs(height)))  # a negative height stores the rows top down


def tiff_tags(tiff: mmap.mmap | bytes, wanted: tuple[int, ...]) -> dict[int, int]:
    """The wanted SHORT or LONG tags of a TIFF header's first directory (TIFF files, EXIF blocks);
    what is truncated or malformed is left out."""
    order = {b"II": "<", b"MM": ">"}.get(bytes(tiff[:2]))
    found: dict[int, int] = {}
    if order is None:
        return found
    try:
        (directory,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, directory)
        for index in range(count):
            entry = directory + 2 + 12 * index
            tag, kind = struct.unpack_from(order + "HH", tiff, entry)
            if tag in wanted and kind in (3, 4):  # SHORT, LONG
                (found[tag],) = struct.unpack_from(order + ("H" if kind == 3 else "I"), tiff, entry + 8)
    except struct.error:
        pass
    return found


def exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag of an EXIF block (a TIFF header and directory), None when it has none;
    like the server, a value outside 1..8 is kept (it turns nothing)."""
    return tiff_tags(tiff, (TIFF_ORIENTATION,)).get(TIFF_ORIENTATION)


# --- masks ----------------------------------------------------------------------------------


def mask_values(path: Path, mask: Header, image: Header) -> np.ndarray:
    """The ``(H, W)`` uint8 values of a PNG mask as the server reads them, turned upright: by the
    mask's own orientation, else by the image's when the mask has the image's stored size."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"cannot be read ({error.strerror or error})") from None
    pixels = png.decode_png(data, palette_indices=True)
    channels = pixels.shape[2]
    if channels in (2, 4):  # grey + alpha, RGBA and palettes with transparency: the alpha is the mask
        values = pixels[:, :, -1]
    elif channels == 3:  # Pillow's luma (ITU-R 601-2), as the server converts RGB masks
        weights = np.array([19595, 38470, 7471], np.uint32)
        values = ((pixels.astype(np.uint32) * weights).sum(axis=2) + 0x8000) >> 16
    else:  # grey, or palette indices (a label image keeps its labels)
        values = pixels[:, :, 0]
    values = np.asarray(values, np.uint8)
    if mask.orientation is not None:
        return _turned(values, mask.orientation)
    return _turned(values, image.orientation) if mask.stored == image.stored else values


# Pillow's transposes for EXIF orientations 2..8 on a top-row-first (H, W) array.
TURNS = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.T,  # TRANSPOSE
    6: lambda a: np.rot90(a, -1),  # ROTATE_270 (a quarter turn clockwise)
    7: lambda a: a[::-1, ::-1].T,  # TRANSVERSE
    8: lambda a: np.rot90(a, 1),  # ROTATE_90 (a quarter turn anticlockwise)
}


def _turned(values: np.ndarray, orientation: int | None) -> np.ndarray:
    turn = TURNS.get(orientation)
    return values if turn is None else np.ascontiguousarray(turn(values))

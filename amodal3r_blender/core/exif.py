# SPDX-License-Identifier: GPL-3.0-or-later
"""A photo's 35 mm equivalent focal length from its EXIF, with the standard library only.

The add-on sends the server the pixels Blender shows, as a PNG without the file's metadata, so the
focal length that Match Photo's first fit needs is read here, from the file (or packed bytes) the
image came from: a JPEG's ``APP1`` Exif segment (phones and cameras write JPEGs), or a TIFF's own
structure. Anything else, or a file without the tag, gives None and the 50 mm equivalent applies.
"""

from __future__ import annotations

import struct

TAG_EXIF_IFD = 0x8769
TAG_FOCAL_35MM = 0xA405  # FocalLengthIn35mmFilm, SHORT, 0 means unknown
SHORT, LONG = 3, 4
JPEG_START = b"\xff\xd8"
EXIF_HEADER = b"Exif\x00\x00"
TIFF_ORDERS = {b"II": "<", b"MM": ">"}
HEAD_BYTES = 1 << 17  # what to read of a file: a JPEG's Exif segment comes early and holds at most 64 KiB


def focal_35mm(data: bytes) -> float | None:
    """``FocalLengthIn35mmFilm`` in mm from a JPEG's or TIFF's bytes, or None (absent, 0, unreadable)."""
    try:
        tiff = _jpeg_exif(data) if data.startswith(JPEG_START) else data
        return _focal_in_tiff(tiff) if tiff else None
    except (struct.error, IndexError):  # a truncated or damaged file: no focal length, not a failure
        return None


def _jpeg_exif(data: bytes) -> bytes | None:
    """The TIFF structure inside a JPEG's Exif ``APP1`` segment, found by walking the markers."""
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no metadata after these
            return None
        (length,) = struct.unpack_from(">H", data, at + 2)
        body = data[at + 4 : at + 2 + length]
        if marker == 0xE1 and body.startswith(EXIF_HEADER):
            return body[len(EXIF_HEADER) :]
        at += 2 + length
    return None


def _focal_in_tiff(tiff: bytes) -> float | None:
    order = TIFF_ORDERS.get(tiff[:2])
    if order is None:
        return None
    (first,) = struct.unpack_from(order + "I", tiff, 4)
    ifd0 = _entries(tiff, order, first)
    focal = ifd0.get(TAG_FOCAL_35MM)  # some writers put it in IFD0
    if focal is None and TAG_EXIF_IFD in ifd0:
        focal = _entries(tiff, order, ifd0[TAG_EXIF_IFD]).get(TAG_FOCAL_35MM)
    return float(focal) if focal else None


def _entries(tiff: bytes, order: str, offset: int) -> dict[int, int]:
    """The SHORT and LONG values of one IFD's single-valued entries, by tag (stored in the entry itself)."""
    (count,) = struct.unpack_from(order + "H", tiff, offset)
    values = {}
    for index in range(count):
        tag, kind, number = struct.unpack_from(order + "HHI", tiff, offset + 2 + 12 * index)
        if number == 1 and kind in (SHORT, LONG):
            (values[tag],) = struct.unpack_from(order + ("H" if kind == SHORT else "I"), tiff, offset + 10 + 12 * index)
    return values

# SPDX-License-Identifier: GPL-3.0-or-later
"""The add-on's EXIF focal-length reader, on JPEGs that Pillow wrote (tests/blender/data/make_exif_photos.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from amodal3r_blender.core import exif

DATA = Path(__file__).parents[1] / "data"


@pytest.mark.parametrize(
    ("name", "focal"),
    [("focal_28mm.jpg", 28.0), ("focal_35mm_in_ifd0.jpg", 35.0), ("focal_0mm.jpg", None), ("no_focal.jpg", None)],
)
def test_the_35mm_focal_length_is_read_where_writers_put_it(name: str, focal: float | None) -> None:
    assert exif.focal_35mm((DATA / name).read_bytes()) == focal


def test_damaged_or_other_files_have_no_focal_length() -> None:
    whole = (DATA / "focal_28mm.jpg").read_bytes()
    for cut in (3, 20, 40, len(whole) // 2):
        assert exif.focal_35mm(whole[:cut]) in (None, 28.0)  # never an exception
    assert exif.focal_35mm(b"\x89PNG\r\n\x1a\n" + bytes(40)) is None
    assert exif.focal_35mm(b"") is None

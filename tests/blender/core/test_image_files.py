# SPDX-License-Identifier: GPL-3.0-or-later
"""Image headers and mask values read before a batch starts, against the server's own reading
(``amodal3r.io.inputs`` with Pillow, in the server's Python): the same sizes for every accepted
format and EXIF orientation, the same masks for every kind of PNG, turned as the server turns them;
broken files say what is wrong."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from amodal3r.api.errors import InputError
from amodal3r.api.masks import combined_to_masks
from amodal3r_blender.core import png
from amodal3r_blender.core.image_files import Header, exif_orientation, mask_fits, mask_values, read_header

# Writes files of every kind with Pillow, then reads them as the server does: the stored and upright
# size of each picture, and for each (image, mask) pair the masks of load_view (or its error).
SERVER_SIDE = r"""
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
from amodal3r.api.errors import InputError
from amodal3r.io.inputs import image_size, load_image, load_view

out = Path(sys.argv[1])
rng = np.random.default_rng(7)
def exif(orientation):
    data = Image.Exif()
    data[0x0112] = orientation
    return data
def noise(shape):
    return rng.integers(0, 256, shape, dtype=np.uint8)
photo = Image.fromarray(noise((5, 7, 3)))
photo.save(out / "plain.png")
photo.save(out / "plain.jpg")
photo.save(out / "progressive.jpg", progressive=True)
for orientation in range(1, 9):
    photo.save(out / f"turned{orientation}.jpg", exif=exif(orientation))
photo.save(out / "lossy.webp", quality=80)
photo.save(out / "lossless.webp", lossless=True)
photo.save(out / "turned6.webp", exif=exif(6))
photo.save(out / "plain.tif")
photo.save(out / "lzw.tif", compression="tiff_lzw")
photo.save(out / "turned8.tif", tiffinfo={274: 8})
photo.save(out / "plain.bmp")
Image.fromarray(noise((7, 5, 3))).save(out / "portrait.png")
masks = {
    "L.png": Image.fromarray(noise((5, 7))),
    "RGB.png": Image.fromarray(noise((5, 7, 3))),
    "RGBA.png": Image.fromarray(noise((5, 7, 4))),
    "LA.png": Image.fromarray(noise((5, 7, 2)), "LA"),
    "I16.png": Image.fromarray(noise((5, 7)).astype(np.uint16) * 257),
    "1bit.png": Image.fromarray(noise((5, 7)) > 127),
}
for name, mask in masks.items():
    mask.save(out / name)
labels = Image.fromarray(rng.integers(0, 3, (5, 7), dtype=np.uint8), "P")
labels.putpalette([0, 0, 0, 40, 40, 40, 250, 250, 250])
labels.save(out / "P_labels.png")
labels.save(out / "P_transparent.png", transparency=1)
# The photo is 7x5 as stored; turned6.jpg shows it 5x7.
Image.fromarray(noise((5, 7))).save(out / "own6.png", exif=exif(6))  # 7x5 stored, 5x7 upright
Image.fromarray(noise((7, 5))).save(out / "upright.png")  # drawn on turned6.jpg as seen: 5x7
Image.fromarray(noise((5, 7))).save(out / "stored.png")  # drawn on turned6.jpg's stored pixels: 7x5
pairs = [("plain.png", m, kind) for m in (*masks, "P_labels.png", "P_transparent.png") for kind in ("target", "mask")]
pairs += [(image, "own6.png", "target") for image in ("turned6.jpg", "plain.png", "portrait.png")]
pairs += [("turned6.jpg", m, "target") for m in ("upright.png", "stored.png")]
pairs += [("turned3.jpg", m, "target") for m in ("stored.png", "upright.png")]
pairs += [("turned8.tif", m, "target") for m in ("stored.png", "upright.png")]
sizes = {p.name: [list(image_size(p)), list(load_image(p)[1])] for p in sorted(out.iterdir())}
read = {}
for image, mask, kind in pairs:
    key = f"{image}+{mask}+{kind}"
    try:
        view = load_view(out / image, **({"target_mask": out / mask} if kind == "target" else {"mask": out / mask}))
    except InputError as error:
        read[key] = str(error)
        continue
    np.save(out / f"{key}.target.npy", view.target)
    np.save(out / f"{key}.occluder.npy", view.occluder)
    read[key] = ""
print(json.dumps({"sizes": sizes, "read": read}))
"""


@pytest.fixture(scope="module")
def server_read(server_python, tmp_path_factory) -> tuple[Path, dict]:
    """The files Pillow wrote and what the server read: (folder, {"sizes": ..., "read": ...})."""
    folder = tmp_path_factory.mktemp("pillow-files")
    result = subprocess.run(
        [server_python, "-c", SERVER_SIDE, str(folder)], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return folder, json.loads(result.stdout.strip().splitlines()[-1])


def test_headers_match_the_server(server_read):
    folder, found = server_read
    sizes = found["sizes"]
    assert len(sizes) == 30
    for name, (stored, upright) in sizes.items():
        header = read_header(folder / name)
        assert (header.stored, header.size) == (tuple(stored), tuple(upright)), name
    assert sizes["turned6.jpg"] == [[7, 5], [5, 7]] and sizes["turned6.webp"][1] == [5, 7]
    assert sizes["turned8.tif"] == [[5, 7], [5, 7]] and sizes["own6.png"] == [[7, 5], [5, 7]]


def _ours(folder: Path, image: str, mask: str, kind: str) -> tuple[np.ndarray, np.ndarray] | str:
    """What the checks make of the pair: (visible target, occluder), or why the server refuses it."""
    image_header, mask_header = read_header(folder / image), read_header(folder / mask, mask=True)
    if not mask_fits(mask_header, image_header):
        return "masks must be the size of their image"
    values = mask_values(folder / mask, mask_header, image_header)
    target, occluder = combined_to_masks(values) if kind == "mask" else (values > 127, np.zeros(values.shape, bool))
    if not (target & ~occluder).any():
        return "the target mask is empty"
    return target & ~occluder, occluder


def test_masks_match_the_server(server_read):
    folder, found = server_read
    read = found["read"]
    assert len(read) == 25 and sum(1 for error in read.values() if error) == 7
    for key, error in read.items():
        ours = _ours(folder, *key.split("+"))
        if error:
            assert isinstance(ours, str) and ("size of their image" in error) == ("size of" in ours), (key, error)
            continue
        assert not isinstance(ours, str), (key, ours)
        assert np.array_equal(ours[0], np.load(folder / f"{key}.target.npy")), key
        assert np.array_equal(ours[1], np.load(folder / f"{key}.occluder.npy")), key


def test_labels_stay_labels(server_read):
    folder, _ = server_read
    header = read_header(folder / "P_labels.png", mask=True)
    assert mask_values(folder / "P_labels.png", header, header).max() == 2  # the indices, not the palette's greys


def test_exif_orientation_of_both_byte_orders():
    little = b"II*\x00\x08\x00\x00\x00" + b"\x01\x00" + b"\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00\x00\x00"
    big = b"MM\x00*\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x08\x00\x00"
    assert exif_orientation(little) == 6 and exif_orientation(big) == 8
    assert exif_orientation(little[:14]) is None and exif_orientation(b"nonsense") is None


def test_top_down_bmp(tmp_path):
    header = b"BM" + bytes(12) + struct.pack("<Iii", 40, 7, -5) + bytes(40)
    (tmp_path / "top_down.bmp").write_bytes(header)
    assert read_header(tmp_path / "top_down.bmp") == Header((7, 5))


def test_broken_files_say_what_is_wrong(tmp_path, server_read):
    folder, _ = server_read
    cases = {
        "notes.png": (b"not an image", "not a PNG, JPEG, WebP, TIFF or BMP file"),
        "empty.png": (b"", "not a PNG, JPEG, WebP, TIFF or BMP file"),
        "cut.png": (png.encode_png(np.zeros((4, 4), np.uint8))[:-20], "the PNG is truncated"),
        "cut.jpg": ((folder / "plain.jpg").read_bytes()[:20], "JPEG without a readable size"),
        "cut.webp": ((folder / "lossy.webp").read_bytes()[:16], "WebP without a readable size"),
        "cut.tif": ((folder / "plain.tif").read_bytes()[:8], "TIFF without a readable size"),
        "huge.png": (
            png.SIGNATURE + b"\0\0\0\x0dIHDR" + struct.pack(">II", 20_000, 20_000) + bytes(9) + b"\0\0\0\0IEND\0\0\0\0",
            "20000x20000 is more than 100,000,000 pixels",
        ),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=message):
            read_header(tmp_path / name)
    with pytest.raises(InputError, match="save masks as PNG"):
        read_header(folder / "plain.jpg", mask=True)
    with pytest.raises(InputError, match="cannot be read"):
        read_header(tmp_path)

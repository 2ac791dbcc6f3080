"""Reading images and masks of every kind, and the errors bad inputs get."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from amodal3r.io.inputs import MAX_SIDE, InputError, load_view
from amodal3r.pipelines.conditioning import masks_to_grey

H, W = 40, 60


def masks() -> tuple[np.ndarray, np.ndarray]:
    target = np.zeros((H, W), bool)
    target[10:30, 10:40] = True
    occluder = np.zeros((H, W), bool)
    occluder[5:35, 30:50] = True
    return target & ~occluder, occluder


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode).save(path)
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    target, occluder = masks()
    rgb = (np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8)
    labels = target.astype(np.uint8) + 2 * occluder.astype(np.uint8)
    return {
        "image": save(tmp_path / "image.png", rgb),
        "target": save(tmp_path / "target.png", target.astype(np.uint8) * 255),
        "occluder": save(tmp_path / "occluder.png", occluder.astype(np.uint8) * 255),
        "grey": save(tmp_path / "grey.png", masks_to_grey(target, occluder)),
        "labels": save(tmp_path / "labels.png", labels),
    }


def test_three_mask_formats_agree(files: dict[str, Path]) -> None:
    target, occluder = masks()
    for view in (
        load_view(files["image"], files["target"], files["occluder"]),
        load_view(files["image"], mask=files["grey"]),
        load_view(files["image"], mask=files["labels"]),
    ):
        assert np.array_equal(view.target, target) and np.array_equal(view.occluder, occluder)
        assert view.image.mode == "RGB" and view.image.size == (W, H)
    only_target = load_view(files["image"], files["target"])
    assert not only_target.occluder.any()


@pytest.mark.parametrize("mode", ["L", "I;16", "P", "CMYK", "RGBA", "LA"])
def test_image_modes_become_rgb(files: dict[str, Path], tmp_path: Path, mode: str) -> None:
    source = Image.open(files["image"])
    if mode == "I;16":
        converted = Image.fromarray(np.asarray(source.convert("L")).astype(np.uint16) * 257)
        assert converted.mode == "I;16"
    else:
        converted = source.convert(mode)
    path = tmp_path / ("image.tif" if mode == "CMYK" else "image.png")
    converted.save(path)
    view = load_view(path, files["target"], files["occluder"])
    assert view.image.mode == "RGB"
    if mode in ("L", "I;16"):
        assert np.abs(np.asarray(view.image, int)[..., 0] - np.asarray(source.convert("L"), int)).max() <= 1


def test_exif_rotation_is_honoured(files: dict[str, Path], tmp_path: Path) -> None:
    rotated = Image.open(files["image"]).transpose(Image.Transpose.ROTATE_90)  # stored sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated.save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    view = load_view(tmp_path / "photo.jpg", files["target"], files["occluder"])
    assert view.image.size == (W, H)


def test_large_images_are_downscaled_with_a_notice(tmp_path: Path) -> None:
    big = (MAX_SIDE + 904, 200)
    Image.new("RGB", big, (9, 9, 9)).save(tmp_path / "big.png")
    target = np.zeros(big[::-1], np.uint8)
    target[50:150, 1000:3000] = 255
    save(tmp_path / "t.png", target)
    view = load_view(tmp_path / "big.png", tmp_path / "t.png")
    assert max(view.image.size) == MAX_SIDE and view.target.shape == view.image.size[::-1]
    assert "downscaled from 5000x200" in view.notices[0]


def test_bad_inputs_have_clear_errors(files: dict[str, Path], tmp_path: Path) -> None:
    empty = save(tmp_path / "empty.png", np.zeros((H, W), np.uint8))
    small = save(tmp_path / "small.png", np.full((H // 2, W), 255, np.uint8))
    full = save(tmp_path / "full.png", np.full((H, W), 255, np.uint8))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    cases = [
        (dict(image_path=files["image"], target_mask=empty), r"empty.png: the target mask is empty"),
        (dict(image_path=files["image"], target_mask=small), r"small.png: mask is 60x20 but image.png is 60x40"),
        (
            dict(image_path=files["image"], target_mask=files["target"], occluder_mask=full),
            r"target.png: the occluder mask covers the whole target",
        ),
        (dict(image_path=broken, target_mask=files["target"]), r"broken.png: cannot read this image"),
        (dict(image_path=tmp_path / "nope.png", target_mask=files["target"]), r"nope.png: image not found"),
        (dict(image_path=files["image"]), r"give either a target mask .* or one combined mask"),
        (
            dict(image_path=files["image"], mask=files["grey"], occluder_mask=files["occluder"]),
            r"combined mask already holds the occluders",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            load_view(**kwargs)


def encode(image: Image.Image, path: Path, fmt: str, **options) -> Path:
    image.save(path, format=fmt, **options)
    return path


def test_only_accepted_formats_open_judged_by_content(files: dict[str, Path], tmp_path: Path) -> None:
    photo = Image.open(files["image"]).convert("RGB")
    for fmt in ("JPEG", "WEBP", "TIFF", "BMP"):
        misnamed = encode(photo, tmp_path / f"photo_{fmt.lower()}.png", fmt)  # the name says PNG
        assert load_view(misnamed, files["target"]).image.size == (W, H)
    mpo = tmp_path / "phone.jpg"
    photo.save(mpo, format="MPO", save_all=True, append_images=[photo])
    assert Image.open(mpo).format == "MPO" and load_view(mpo, files["target"]).image.size == (W, H)
    for fmt in ("EPS", "GIF", "QOI", "DDS", "PPM", "TGA"):
        disguised = encode(photo, tmp_path / f"disguised_{fmt.lower()}.png", fmt)
        with pytest.raises(InputError, match="not a readable PNG, JPEG, WebP, TIFF or BMP file"):
            load_view(disguised, files["target"])
    jpeg_mask = encode(Image.open(files["target"]), tmp_path / "target.jpg", "JPEG")
    with pytest.raises(InputError, match="target.jpg: cannot read this mask: it is not a readable PNG file"):
        load_view(files["image"], jpeg_mask)


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_a_mask_without_exif_turns_with_its_image(files: dict[str, Path], tmp_path: Path) -> None:
    """A mask painted on the stored pixels of a phone photo (Blender ignores EXIF) used to be refused
    for its size, or, for a square photo, silently misaligned."""
    target, _ = masks()
    upright = Image.open(files["image"])
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back
    photo = encode(stored, tmp_path / "photo.jpg", "JPEG", exif=exif_bytes(6), quality=95)
    on_stored = save(tmp_path / "painted.png", np.rot90(target).astype(np.uint8) * 255)
    view = load_view(photo, on_stored)
    assert view.image.size == (W, H) and np.array_equal(view.target, target)
    assert view.notices == [
        "painted.png: turned with the EXIF orientation of photo.jpg (the mask has none, "
        "and has the size of the stored image)"
    ]
    upright_mask = load_view(photo, files["target"])  # drawn on the upright photo: used as it is
    assert np.array_equal(upright_mask.target, target) and upright_mask.notices == []


def test_a_square_photo_turns_its_mask_and_a_mask_with_exif_keeps_its_own(tmp_path: Path) -> None:
    side = 40
    rgb = (np.random.default_rng(1).random((side, side, 3)) * 255).astype(np.uint8)
    target = np.zeros((side, side), bool)
    target[5:15, 2:30] = True  # not symmetric under a half turn
    photo = encode(Image.fromarray(rgb[::-1, ::-1]), tmp_path / "square.jpg", "JPEG", exif=exif_bytes(3))
    on_stored = save(tmp_path / "on_stored.png", target[::-1, ::-1].astype(np.uint8) * 255)
    view = load_view(photo, on_stored)
    assert np.array_equal(view.target, target) and "turned with the EXIF orientation" in view.notices[0]
    own = encode(
        Image.fromarray(target[::-1, ::-1].astype(np.uint8) * 255), tmp_path / "own.png", "PNG", exif=exif_bytes(3)
    )
    view = load_view(photo, own)
    assert np.array_equal(view.target, target) and view.notices == []


def test_a_photo_given_as_a_mask_gets_a_swapped_warning(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    photo = (rng.random((60, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    target = np.zeros((60, 80), np.uint8)
    target[10:50, 20:60] = 255
    Image.fromarray(target).save(tmp_path / "target.png")
    Image.fromarray(np.full((60, 80), 255, np.uint8)).save(tmp_path / "everything.png")
    grey = np.full((60, 80), 255, np.uint8)
    grey[10:50, 20:60] = 188
    Image.fromarray(grey).save(tmp_path / "grey.png")

    swapped = load_view(tmp_path / "target.png", tmp_path / "photo.png")  # image and mask the wrong way round
    assert any("photo.png looks like a photo, not a mask" in n and "grey levels" in n for n in swapped.notices)
    covering = load_view(tmp_path / "photo.png", tmp_path / "everything.png")
    assert any("white over 100% of the frame" in n for n in covering.notices)
    for fine in (
        load_view(tmp_path / "photo.png", tmp_path / "target.png"),
        load_view(tmp_path / "photo.png", mask=tmp_path / "grey.png"),
    ):
        assert not any("looks like a photo" in n for n in fine.notices)

"""Reading user images and masks: accepted formats only, three mask formats, errors that say what to do.

A view is an RGB image plus two boolean masks of its size: the visible part of the target and the
occluders in front of it. Masks come as two binary images, as one label image (0 background,
1 target, 2 occluder) or in the reference's grey format (255 background, 188 target, 0 occluder).

Files are opened only as the formats ``api.protocol`` lists (images ``IMAGE_FORMATS``, masks
``MASK_FORMATS``), judged by their content, never by their name: no other decoder (EPS runs
Ghostscript) ever sees user data. Every failure to read or decode a file is an ``InputError`` that
names it. Each file's own EXIF orientation is applied; a mask without one, drawn on the stored
pixels of an image that has one (the same size as the stored image), is turned with its image,
with a notice. Files arrive as paths (the command line) or as ``Upload`` bytes (the server).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from amodal3r.api.errors import InputError
from amodal3r.api.masks import combined_to_masks, visible_target
from amodal3r.api.protocol import IMAGE_FORMATS, MASK_FORMATS, MAX_IMAGE_PIXELS

MAX_SIDE = 4096  # larger images are downscaled first: the model sees 518 pixels anyway
FORMAT_NAMES = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "TIFF": "TIFF", "BMP": "BMP"}
DECODED_AS = {"MPO": "JPEG"}  # phone cameras' multi-picture JPEGs open as MPO
ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the stored pixels upright (the EXIF specification's table).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
T = TypeVar("T")
# Pillow warns from 89 M pixels and refuses from 179 M; open_file refuses above MAX_IMAGE_PIXELS itself,
# so the warning would only add stderr lines to a one-line error.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# A mask has two levels (a few more along antialiased edges); a photo has hundreds. A binary mask
# white over nearly the whole frame is more often a photo given in its place.
PHOTO_GREY_LEVELS = 64
PHOTO_COVERAGE = 0.9


@dataclass(frozen=True)
class Upload:
    """A file received over the network, with the name errors call it by."""

    name: str
    data: bytes


Source = str | Path | Upload


@dataclass
class View:
    image: Image.Image  # RGB
    target: np.ndarray  # bool [H, W]: visible part of the target
    occluder: np.ndarray  # bool [H, W]: occluders in front of it
    name: str
    notices: list[str]

    @property
    def visible_fraction(self) -> float:
        return float(self.target.mean())


@dataclass
class _Picture:
    """A decoded image as the model will see it, and what its masks are checked against."""

    image: Image.Image  # RGB, upright, at most MAX_SIDE a side
    size: tuple[int, int]  # upright, before downscaling: the size masks must have
    stored_size: tuple[int, int]  # as stored in the file, before the EXIF orientation
    orientation: int | None  # the file's EXIF orientation, None when it has none
    notices: list[str]
    label: str


def label(source: Source) -> str:
    """What messages call a file: its path, or the name an upload came with."""
    return source.name if isinstance(source, Upload) else str(source)


def accepted(formats: tuple[str, ...]) -> str:
    names = [FORMAT_NAMES[f] for f in formats]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _guarded(source: Source, what: str, action: Callable[[], T]) -> T:
    """``action()`` with any decoder failure (Pillow raises many kinds) as an InputError naming the file."""
    try:
        return action()
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - truncated, corrupt or hostile files fail in many ways
        raise InputError(
            f"{label(source)}: cannot decode this {what} ({type(error).__name__}: {error}). Save it again as PNG"
        ) from None


def open_file(source: Source, what: str, formats: tuple[str, ...]) -> Image.Image:
    """The file opened (header only) when it is one of ``formats`` and not too large to decode."""
    if not isinstance(source, Upload) and not Path(source).is_file():
        raise InputError(f"{source}: {what} not found. Check the path")
    stream = io.BytesIO(source.data) if isinstance(source, Upload) else Path(source)
    try:
        image = Image.open(stream, formats=[f for f in formats])
    except UnidentifiedImageError:
        raise InputError(
            f"{label(source)}: cannot read this {what}: it is not a readable {accepted(formats)} file "
            "(the content counts, not the name). Save it as PNG"
        ) from None
    except Image.DecompressionBombError:
        raise InputError(
            f"{label(source)}: far too many pixels to decode. Downscale it below {MAX_SIDE} pixels a side"
        ) from None
    except Exception as error:  # noqa: BLE001 - a header the decoder rejects
        raise InputError(f"{label(source)}: cannot read this {what} ({error}). Save it again as PNG") from None
    if DECODED_AS.get(image.format or "", image.format) not in formats:
        raise InputError(f"{label(source)}: {image.format} {what}s are not accepted; use {accepted(formats)}")
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise InputError(
            f"{label(source)}: {image.width}x{image.height} is more than {MAX_IMAGE_PIXELS:,} pixels. "
            f"Downscale it below {MAX_SIDE} pixels a side first"
        )
    return image


def image_size(source: Source) -> tuple[int, int]:
    """Width and height of an image file from its header, after checking its format: cheap."""
    with open_file(source, "image", IMAGE_FORMATS) as image:
        return image.size


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation a file carries, None when it has none (or its EXIF is unreadable)."""
    try:
        return image.getexif().get(ORIENTATION_TAG)
    except Exception:  # noqa: BLE001 - a broken EXIF block means no usable orientation
        return None


def upright(image: Image.Image, orientation: int | None) -> Image.Image:
    return image.transpose(UPRIGHT[orientation]) if orientation in UPRIGHT else image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit and float greyscale are rescaled, alpha is dropped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / peak * 255 + 0.5, 0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def working_size(size: tuple[int, int]) -> tuple[int, int]:
    """``size`` scaled down to at most :data:`MAX_SIDE` a side (unchanged when it fits)."""
    if max(size) <= MAX_SIDE:
        return size
    scale = MAX_SIDE / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _picture(source: Source) -> _Picture:
    """Decode once: upright (EXIF), RGB, downscaled to the working size with a notice."""
    image = open_file(source, "image", IMAGE_FORMATS)
    stored = image.size

    def decode() -> tuple[Image.Image, int | None]:
        """Upright, RGB and at the working size before the file closes, copying as little as can be."""
        if image.format == "JPEG":
            image.draft("RGB", working_size(stored))  # decode big JPEGs at a fraction of the size
        image.load()
        orientation = _orientation(image)
        rgb = to_rgb(upright(image, orientation))
        target = working_size(stored[::-1] if orientation in (5, 6, 7, 8) else stored)
        if rgb.size != target:
            rgb = rgb.resize(target, Image.Resampling.LANCZOS)
        return (rgb.copy() if rgb is image else rgb), orientation

    with image:
        rgb, orientation = _guarded(source, "image", decode)
    size = stored[::-1] if orientation in (5, 6, 7, 8) else stored
    notices = []
    target = rgb.size
    if target != size:
        name = Path(label(source)).name
        notices.append(f"{name}: downscaled from {size[0]}x{size[1]} to {target[0]}x{target[1]}")
    return _Picture(rgb, size, stored, orientation, notices, label(source))


def load_image(source: Source) -> tuple[Image.Image, tuple[int, int], list[str]]:
    """The image as RGB and upright (EXIF), at most :data:`MAX_SIDE` a side (with a notice), and
    its original (upright) size."""
    picture = _picture(source)
    return picture.image, picture.size, picture.notices


def read_rgb(source: Source) -> np.ndarray:
    """The stored pixels as an 8-bit RGB array: no EXIF turn, no downscaling (click-to-mask
    answers masks on the pixel grid the client shows)."""
    with open_file(source, "image", IMAGE_FORMATS) as image:
        return _guarded(source, "image", lambda: np.asarray(to_rgb(image)))


def _mask_values(source: Source, picture: _Picture, binary: bool = True) -> np.ndarray:
    """Greyscale values of a mask file (alpha, if any, counts as the mask), upright like its image and
    at its working size. The size is checked from the header first: a huge mask is never decoded."""
    with open_file(source, "mask", MASK_FORMATS) as stored:
        if stored.size not in (picture.size, picture.stored_size):
            raise _size_mismatch(source, stored.size, picture)
        values = _guarded(source, "mask", lambda: _working_grey(source, stored, picture))
    swapped = _photo_like(values, binary)
    if swapped:
        picture.notices.append(
            f"{Path(label(source)).name} looks like a photo, not a mask ({swapped}): are the image and the mask "
            "swapped? A mask is white where the object is and black elsewhere"
        )
    return values


def _photo_like(values: np.ndarray, binary: bool) -> str:
    """Why a mask looks like a photo (many grey levels, or a binary mask over most of the frame), or ''."""
    levels = np.unique(values).size
    if levels > PHOTO_GREY_LEVELS:
        return f"{levels} grey levels"
    covered = float((values > 127).mean()) if binary else 0.0
    return f"white over {covered:.0%} of the frame" if covered > PHOTO_COVERAGE else ""


def _working_grey(source: Source, mask: Image.Image, picture: _Picture) -> np.ndarray:
    mask.load()
    own = _orientation(mask)
    if own is not None:
        mask = upright(mask, own)
    elif picture.orientation in UPRIGHT and mask.size == picture.stored_size:
        mask = upright(mask, picture.orientation)
        picture.notices.append(
            f"{Path(label(source)).name}: turned with the EXIF orientation of {Path(picture.label).name} "
            "(the mask has none, and has the size of the stored image)"
        )
    if mask.size != picture.size:
        raise _size_mismatch(source, mask.size, picture)
    if mask.size != picture.image.size:
        mask = mask.resize(picture.image.size, Image.Resampling.NEAREST)  # keeps labels and palette indices
    return _grey(mask)


def _grey(mask: Image.Image) -> np.ndarray:
    if mask.mode in ("RGBA", "LA") or (mask.mode == "P" and "transparency" in mask.info):
        return np.asarray(mask.convert("RGBA"))[..., 3]
    if mask.mode in ("P", "L"):
        return np.asarray(mask)  # palette indices: a label image keeps its labels
    return np.asarray(to_rgb(mask).convert("L"))


def _size_mismatch(source: Source, size: tuple[int, int], picture: _Picture) -> InputError:
    return InputError(
        f"{label(source)}: mask is {size[0]}x{size[1]} but {Path(picture.label).name} is "
        f"{picture.size[0]}x{picture.size[1]}. Masks must be the size of their image"
    )


def load_view(
    image_path: Source,
    target_mask: Source | None = None,
    occluder_mask: Source | None = None,
    mask: Source | None = None,
) -> View:
    """One view from files: the image with either ``target_mask`` [+ ``occluder_mask``] or ``mask``."""
    if (mask is None) == (target_mask is None):
        raise InputError(
            f"{label(image_path)}: give either a target mask (and optionally an occluder mask) or one "
            "combined mask, not both and not neither"
        )
    if mask is not None and occluder_mask is not None:
        raise InputError(f"{label(image_path)}: a combined mask already holds the occluders; drop the occluder mask")
    picture = _picture(image_path)
    if mask is not None:
        target, occluder = combined_to_masks(_mask_values(mask, picture, binary=False))
        target_source = mask
    else:
        target = _mask_values(target_mask, picture) > 127
        occluder = _mask_values(occluder_mask, picture) > 127 if occluder_mask is not None else np.zeros_like(target)
        target_source = target_mask
    name = Path(label(image_path)).stem
    return validate_view(View(picture.image, target, occluder, name, picture.notices), label(target_source))


def validate_view(view: View, source: Path | str) -> View:
    """The target must be visible somewhere that no occluder covers."""
    visible = visible_target(view.target, view.occluder, str(source))
    return View(view.image, visible, view.occluder, view.name, view.notices)


def checked_pngs(view: View) -> tuple[bytes, bytes]:
    """A checked view as two lossless PNGs: the working-size image and a label mask (0/1/2).

    The server keeps these as a job's input, so its worker never decodes the user's files again."""
    labels = view.target.astype(np.uint8) + 2 * (view.occluder & ~view.target).astype(np.uint8)
    return _png(view.image), _png(Image.fromarray(labels))


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def load_checked(image_png: Path, labels_png: Path, name: str) -> View:
    """A view that :func:`checked_pngs` wrote (no format guessing, no checks beyond the sizes)."""
    with open_file(image_png, "image", ("PNG",)) as image, open_file(labels_png, "mask", ("PNG",)) as mask:
        rgb = _guarded(image_png, "image", lambda: image.convert("RGB"))
        labels = _guarded(labels_png, "mask", lambda: np.asarray(mask))
    if labels.shape != rgb.size[::-1]:
        raise InputError(f"{labels_png}: the stored masks do not fit the stored image; submit the job again")
    return View(rgb, labels == 1, labels == 2, name, [])

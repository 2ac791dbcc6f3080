"""Reading user images and masks: any image mode, three mask formats, errors that say what to do.

A view is an RGB image plus two boolean masks of its size: the visible part of the target and the
occluders in front of it. Masks come as two binary images, as one label image (0 background,
1 target, 2 occluder) or in the reference's grey format (255 background, 188 target, 0 occluder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from amodal3r.api.errors import InputError
from amodal3r.api.masks import combined_to_masks, visible_target

MAX_SIDE = 4096  # larger images are downscaled first: the model sees 518 pixels anyway
REFUSED_PIXELS = 20_000 * 20_000  # beyond this, decoding alone would exhaust memory


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


def _open(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise InputError(f"{path}: {what} not found. Check the path")
    try:
        image = Image.open(path)
        if image.width * image.height > REFUSED_PIXELS:
            raise InputError(
                f"{path}: {image.width}x{image.height} is far too large. Downscale it below "
                f"{MAX_SIDE} pixels a side first"
            )
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: cannot read this {what} ({e}). Save it as PNG or JPEG") from e
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit and float greyscale are rescaled, alpha is dropped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / peak * 255 + 0.5, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def load_image(path: str | Path) -> tuple[Image.Image, tuple[int, int], list[str]]:
    """The image as RGB and upright (EXIF), at most :data:`MAX_SIDE` a side (with a notice), and
    its original size."""
    path = Path(path)
    image = to_rgb(_open(path, "image"))
    original, notices = image.size, []
    if max(image.size) > MAX_SIDE:
        scale = MAX_SIDE / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        notices.append(f"{path.name}: downscaled from {image.width}x{image.height} to {size[0]}x{size[1]}")
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image, original, notices


def _mask_array(path: Path) -> np.ndarray:
    """Greyscale values of a mask file (alpha, if any, counts as the mask)."""
    image = _open(path, "mask")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        return np.asarray(image.convert("RGBA"))[..., 3]
    if image.mode == "P":
        return np.asarray(image)  # palette indices: a label image keeps its labels
    return np.asarray(to_rgb(image).convert("L"))


def load_binary_mask(path: str | Path) -> np.ndarray:
    return _mask_array(Path(path)) > 127


def load_combined_mask(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(target, occluder)`` from a label image (values 0/1/2) or the reference's grey format."""
    return combined_to_masks(_mask_array(Path(path)))


def _matched(
    mask: np.ndarray, source: str | Path, image: Image.Image, original: tuple[int, int], image_path: Path
) -> np.ndarray:
    """The mask at the image's working size; it must have been drawn at the image's own size."""
    if mask.shape[::-1] != original:
        raise InputError(
            f"{source}: mask is {mask.shape[1]}x{mask.shape[0]} but {image_path.name} is "
            f"{original[0]}x{original[1]}. Masks must be the size of their image"
        )
    if image.size != original:
        mask = np.asarray(Image.fromarray(mask).resize(image.size, Image.Resampling.NEAREST))
    return mask


def load_view(
    image_path: str | Path,
    target_mask: str | Path | None = None,
    occluder_mask: str | Path | None = None,
    mask: str | Path | None = None,
) -> View:
    """One view from files: the image with either ``target_mask`` [+ ``occluder_mask``] or ``mask``."""
    image_path = Path(image_path)
    if (mask is None) == (target_mask is None):
        raise InputError(
            f"{image_path}: give either a target mask (and optionally an occluder mask) or one "
            "combined mask, not both and not neither"
        )
    if mask is not None and occluder_mask is not None:
        raise InputError(f"{image_path}: a combined mask already holds the occluders; drop the occluder mask")
    image, original, notices = load_image(image_path)
    if mask is not None:
        target, occluder = load_combined_mask(mask)
        target_source = occluder_source = mask
    else:
        target = load_binary_mask(target_mask)
        occluder = load_binary_mask(occluder_mask) if occluder_mask is not None else np.zeros_like(target)
        target_source, occluder_source = target_mask, occluder_mask or target_mask
    target = _matched(target, target_source, image, original, image_path)
    occluder = _matched(occluder, occluder_source, image, original, image_path)
    return validate_view(View(image, target, occluder, image_path.stem, notices), target_source)


def validate_view(view: View, source: Path | str) -> View:
    """The target must be visible somewhere that no occluder covers."""
    visible = visible_target(view.target, view.occluder, str(source))
    return View(view.image, visible, view.occluder, view.name, view.notices)

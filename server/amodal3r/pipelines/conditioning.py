"""Image-side conditioning: masks, preprocessing, patch ratios and the model condition.

Amodal3R conditions its flow models on one picture plus two per-pixel masks: the
*visible part of the target object* and the *occluders* in front of it.  The
reference implementation exchanges these masks as a single grey-level image:

========  =====  ============================================
value     name   meaning
========  =====  ============================================
255       white  background (neither target nor occluder)
188       grey   visible part of the target object
0         black  occluder hiding part of the target
========  =====  ============================================

and reads it back with thresholds: ``grey < 127`` is occluder, ``grey > 230`` is
background, anything in between is target.  The occluder region is grown by one
pixel (a dilation with the 3x3 cross-shaped "elliptical" structuring element)
before use.

The preprocessing produces, for one view:

* ``image_518``: the picture with every occluder/background pixel set to black,
  resized to 518x518 with PIL's LANCZOS filter (uint8 RGB);
* ``vis_ratio``: per 14x14 patch of the 37x37 grid, the fraction of pixels that
  are neither occluder nor background;
* ``occ_ratio``: per patch, the fraction of (dilated) occluder pixels.

The ratios are computed on the full-resolution mask brought to 518x518 by a
nearest-neighbour resize (floor indexing, as ``torch.nn.functional.interpolate``
with ``mode='nearest'`` does), and are ordered row-major over the grid
(index ``37 * row + col``).

:func:`assemble_cond` stacks the image tokens of the encoder and the two ratio
vectors into the ``[B, 4112, C]`` condition the flow models read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from amodal3r.api.masks import (
    GREY_BACKGROUND_ABOVE,
    GREY_OCCLUDER_BELOW,
    as_bool_mask,
    masks_to_grey,
    visible_target,
)
from amodal3r.modules.condition_tokens import (
    IMAGE_SIZE,
    NUM_IMAGE_TOKENS,
    NUM_PATCHES,
    NUM_REGISTER_TOKENS,
    PATCH_GRID,
    PATCH_SIZE,
)

# --------------------------------------------------------------------------- results


@dataclass
class PreprocessedView:
    """One view ready for encoding.

    Attributes:
        image_518: ``uint8 [518, 518, 3]`` masked, LANCZOS-resized RGB picture.
        vis_ratio: ``float32 [1369]`` visible-target fraction per patch (row-major 37x37).
        occ_ratio: ``float32 [1369]`` dilated-occluder fraction per patch.
        mask_combined: ``bool [H, W]`` full-resolution occluder-or-background mask
            (the pixels that were blacked out).
        mask_occ: ``bool [H, W]`` full-resolution dilated occluder mask.
    """

    image_518: np.ndarray
    vis_ratio: np.ndarray
    occ_ratio: np.ndarray
    mask_combined: np.ndarray
    mask_occ: np.ndarray


class SquareCrop(NamedTuple):
    """Result of :func:`crop_square`.

    ``box`` is ``(left, top, size)`` in pixels of the source image; it may extend past the
    image borders, where the crop is padded (black image, empty masks).
    """

    image: Image.Image
    target: np.ndarray
    occluder: np.ndarray | None
    box: tuple[int, int, int]


# --------------------------------------------------------------------------- masks


def dilate_cross(mask: np.ndarray) -> np.ndarray:
    """Dilate a boolean mask once with the 3x3 cross (OpenCV's 3x3 ``MORPH_ELLIPSE``).

    A pixel becomes set when it or one of its four edge neighbours is set.  Pixels outside
    the image do not contribute.
    """
    m = np.asarray(mask, dtype=bool)
    out = m.copy()
    out[1:, :] |= m[:-1, :]
    out[:-1, :] |= m[1:, :]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


def patch_ratios(mask: np.ndarray) -> np.ndarray:
    """Per-patch fraction of set pixels after a nearest-neighbour resize to 518x518.

    Returns ``float32 [1369]``, row-major over the 37x37 grid.  The resize uses torch's
    ``'nearest'`` mode (source index ``floor(dst * in / out)``), the same arithmetic as the
    reference, so values are bit-identical multiples of 1/196.
    """
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    m = F.interpolate(m, size=(IMAGE_SIZE, IMAGE_SIZE), mode="nearest")
    # [1,1,518,518] -> [37,14,37,14] -> patch means [37,37]
    m = m.reshape(PATCH_GRID, PATCH_SIZE, PATCH_GRID, PATCH_SIZE)
    ratios = m.permute(0, 2, 1, 3).mean(dim=(-1, -2))
    return ratios.reshape(NUM_PATCHES).numpy().astype(np.float32, copy=False)


# --------------------------------------------------------------------------- preprocessing


def _rgb_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            # Alpha is dropped without compositing; masks decide what is kept.
            image = image.convert("RGB")
        return np.asarray(image)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(
            f"image must be a PIL image or a uint8 array [height, width, 3], got {arr.dtype} array of shape {arr.shape}"
        )
    return arr


def preprocess_grey(image, grey, *, dilate: bool = True) -> PreprocessedView:
    """Preprocess a picture with a grey mask (255 background / 188 target / 0 occluder).

    Args:
        image: PIL image (any mode, converted to RGB) or uint8 ``[H, W, 3]`` array.
        grey: uint8 ``[H, W]`` array, or a PIL image which is converted with ``convert('L')``.
        dilate: grow the occluder by one pixel with the 3x3 cross (the reference default).

    Raises:
        ValueError: sizes differ, or no target pixel is left visible.
    """
    rgb = _rgb_array(image)
    g = np.asarray(grey.convert("L") if isinstance(grey, Image.Image) else grey)
    if g.shape != rgb.shape[:2]:
        raise ValueError(
            f"mask size {g.shape[1]}x{g.shape[0]} (WxH) does not match image size "
            f"{rgb.shape[1]}x{rgb.shape[0]}; resize the mask to the image with "
            "nearest-neighbour sampling (or crop both the same way) before preprocessing"
        )

    raw_occluder = g < GREY_OCCLUDER_BELOW
    occluder = dilate_cross(raw_occluder) if dilate else raw_occluder
    background = g > GREY_BACKGROUND_ABOVE
    visible_target(~(raw_occluder | background), occluder, "the grey mask")
    combined = occluder | background

    # The reference goes through float32 (v / 255 * (1 - m) * 255, truncated to uint8);
    # for every uint8 v that round trip is exact, so zeroing masked pixels is identical.
    masked = rgb.copy()
    masked[combined] = 0
    resized = Image.fromarray(masked).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return PreprocessedView(
        image_518=np.asarray(resized, dtype=np.uint8).copy(),
        vis_ratio=patch_ratios(~combined),
        occ_ratio=patch_ratios(occluder),
        mask_combined=combined,
        mask_occ=occluder,
    )


def preprocess_view(image: Image.Image, target, occluder=None) -> PreprocessedView:
    """Preprocess a picture given boolean target / occluder masks of the picture's size.

    Equivalent to encoding the masks with :func:`masks_to_grey` and calling
    :func:`preprocess_grey`; pixels marked as neither are background and are blacked out.

    Raises:
        ValueError: a mask is not ``[H, W]`` of the image size, or the target is empty.
    """
    width, height = image.size if isinstance(image, Image.Image) else np.asarray(image).shape[1::-1]
    t, o = _checked_masks(target, occluder, width, height)
    return preprocess_grey(image, masks_to_grey(t, o))


def _checked_masks(
    target: object, occluder: object | None, width: int, height: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Boolean masks of the image's size, with some of the target visible."""
    t = as_bool_mask(target, "target")
    o = None if occluder is None else as_bool_mask(occluder, "occluder")
    for name, m in (("target", t), ("occluder", o)):
        if m is not None and m.shape != (height, width):
            raise ValueError(
                f"{name} mask has shape {m.shape} (HxW) but the image is {height}x{width} (HxW); "
                "give masks at the image's resolution (resize with nearest-neighbour sampling)"
            )
    visible_target(t, o, "the view")
    return t, o


def image_to_tensor(image_518: np.ndarray) -> torch.Tensor:
    """``uint8 [518, 518, 3]`` -> ``float32 [3, 518, 518]`` in [0, 1] (exactly ``u8 / 255``)."""
    t = torch.from_numpy(np.ascontiguousarray(image_518))
    return t.permute(2, 0, 1).float() / 255


# --------------------------------------------------------------------------- condition


def assemble_cond(tokens: torch.Tensor, vis_ratio: torch.Tensor, occ_ratio: torch.Tensor) -> torch.Tensor:
    """Build the flow models' condition ``[B, 1374 + 1369 + 1369, C]``.

    Rows ``0:1374`` are the image tokens, rows ``1374:2743`` the visibility ratio of each
    patch repeated over all C channels, rows ``2743:4112`` the occlusion ratio likewise.
    The ratios are cast to the tokens' dtype and device.  The unconditional condition is
    ``torch.zeros_like`` of the result.
    """
    if tokens.ndim != 3 or tokens.shape[1] != NUM_IMAGE_TOKENS:
        raise ValueError(
            f"tokens must be [B, {NUM_IMAGE_TOKENS}, C] (class + {NUM_REGISTER_TOKENS} registers "
            f"+ {NUM_PATCHES} patches), got {tuple(tokens.shape)}"
        )
    b, _, c = tokens.shape
    parts = [tokens]
    for name, r in (("vis_ratio", vis_ratio), ("occ_ratio", occ_ratio)):
        r = torch.as_tensor(r)
        if tuple(r.shape) != (b, NUM_PATCHES):
            raise ValueError(f"{name} must be [B, {NUM_PATCHES}] with B={b} matching the tokens, got {tuple(r.shape)}")
        r = r.to(device=tokens.device, dtype=tokens.dtype)
        parts.append(r[:, :, None].expand(b, NUM_PATCHES, c))
    return torch.cat(parts, dim=1)


# --------------------------------------------------------------------------- cropping


def crop_square(image: Image.Image, target, occluder=None, margin: float = 0.1) -> SquareCrop:
    """Crop a square around the target and occluders, before :func:`preprocess_view`.

    The square is centred on the bounding box of ``target | occluder`` with side
    ``max(box_w, box_h) * (1 + 2 * margin)`` (at least 1 pixel).  Parts outside the picture
    are padded with black pixels and empty masks (i.e. background).

    Raises:
        ValueError: mask shape differs from the image, or the target is empty.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    w, h = image.size
    t, o = _checked_masks(target, occluder, w, h)
    union = t if o is None else (t | o)
    rows = np.flatnonzero(union.any(axis=1))
    cols = np.flatnonzero(union.any(axis=0))
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    side = max(1, int(round(max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin))))
    left = int(np.floor((x0 + x1 - side) / 2.0))
    top = int(np.floor((y0 + y1 - side) / 2.0))

    def cut(arr: np.ndarray) -> np.ndarray:
        out = np.zeros((side, side) + arr.shape[2:], dtype=arr.dtype)
        sx0, sy0 = max(left, 0), max(top, 0)
        sx1, sy1 = min(left + side, w), min(top + side, h)
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = arr[sy0:sy1, sx0:sx1]
        return out

    rgb = _rgb_array(image)
    return SquareCrop(
        image=Image.fromarray(cut(rgb)),
        target=cut(t),
        occluder=None if o is None else cut(o),
        box=(left, top, side),
    )

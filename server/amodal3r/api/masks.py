"""The mask formats, defined once for the server, the command line and the Blender add-on.

A view's masks are two boolean images the size of the picture: the visible part of the target and
the occluders in front of it. On disk and on the wire they travel as two binary PNGs (white =
inside), or as one combined image in either of two encodings:

========  ==========  ======  ========  ================================================
format    background  target  occluder  read back
========  ==========  ======  ========  ================================================
grey      255         188     0         occluder below 127, background above 230 (the
                                        reference implementation's thresholds)
labels    0           1       2         exact values; an image whose maximum is 2 or less
========  ==========  ======  ========  ================================================
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

GREY_BACKGROUND, GREY_TARGET, GREY_OCCLUDER = 255, 188, 0
GREY_OCCLUDER_BELOW, GREY_BACKGROUND_ABOVE = 127, 230
LABEL_BACKGROUND, LABEL_TARGET, LABEL_OCCLUDER = 0, 1, 2


def as_bool_mask(mask: object, name: str) -> np.ndarray:
    """A 2-D boolean array from any numeric or boolean one (non-zero is inside)."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise InputError(
            f"the {name} mask must be a 2-D array [height, width], got shape {arr.shape}; "
            "pass one channel (e.g. mask[..., 0]) or a boolean array"
        )
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"the {name} mask has unsupported dtype {arr.dtype}; pass a boolean array")
    return arr != 0


def check_same_size(first: np.ndarray, second: np.ndarray, first_name: str, second_name: str) -> None:
    if first.shape[:2] != second.shape[:2]:
        raise InputError(
            f"{first_name} is {size_text(first)} but {second_name} is {size_text(second)}: "
            "masks must be the size of their image"
        )


def size_text(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"


def masks_to_grey(target: object, occluder: object | None = None) -> np.ndarray:
    """The grey encoding (uint8 ``[H, W]``); where both are set the occluder wins, as it is in front."""
    t = as_bool_mask(target, "target")
    grey = np.full(t.shape, GREY_BACKGROUND, dtype=np.uint8)
    grey[t] = GREY_TARGET
    if occluder is not None:
        o = as_bool_mask(occluder, "occluder")
        check_same_size(o, t, "the occluder mask", "the target mask")
        grey[o] = GREY_OCCLUDER
    return grey


def grey_to_masks(grey: object) -> tuple[np.ndarray, np.ndarray]:
    """``(target, occluder)`` of a grey-encoded ``[H, W]`` array, with the reference's thresholds."""
    arr = np.asarray(grey)
    if arr.ndim != 2:
        raise InputError(f"a grey mask is single-channel [height, width], got shape {arr.shape}")
    occluder = arr < GREY_OCCLUDER_BELOW
    background = arr > GREY_BACKGROUND_ABOVE
    return ~(occluder | background), occluder


def combined_to_masks(values: object) -> tuple[np.ndarray, np.ndarray]:
    """``(target, occluder)`` of a combined mask in either encoding: labels when its maximum is 2."""
    arr = np.asarray(values)
    if arr.max(initial=0) <= LABEL_OCCLUDER:
        return arr == LABEL_TARGET, arr == LABEL_OCCLUDER
    return grey_to_masks(arr)


def visible_target(target: np.ndarray, occluder: np.ndarray | None, where: str) -> np.ndarray:
    """The target pixels no occluder covers; an error naming ``where`` when there are none."""
    if not np.any(target):
        raise InputError(
            f"{where}: the target mask is empty. Mark the visible part of the object "
            "(paint it white, or use click-to-mask)"
        )
    visible = np.asarray(target, bool) if occluder is None else np.asarray(target, bool) & ~np.asarray(occluder, bool)
    if not visible.any():
        raise InputError(
            f"{where}: the occluder mask covers the whole target. Mark only what is in front of the object as occluder"
        )
    return visible

# SPDX-License-Identifier: GPL-3.0-or-later
"""Mask logic on the pixel buffers Blender hands out, without bpy.

Blender gives an image as a flat float32 RGBA buffer whose FIRST ROW IS THE BOTTOM of the picture;
PNG files and the server count rows from the top. A mask "layer" here is a boolean ``(H, W)`` array
in Blender's order (white = inside); ``flip_rows`` converts at the file boundary, and the encode /
decode helpers do it for you. The mask formats themselves (the combined grey and label images)
and the checks every view must pass are the server's, from ``amodal3r.api.masks``.
"""

from __future__ import annotations

import numpy as np

from amodal3r.api.errors import InputError
from amodal3r.api.masks import check_same_size, combined_to_masks, masks_to_grey, visible_target

from . import png

GREEN, RED = (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)


def rgba(buffer: np.ndarray, width: int, height: int) -> np.ndarray:
    """The ``(H, W, 4)`` view of a flat RGBA buffer, after checking its length."""
    flat = np.asarray(buffer, np.float32).reshape(-1)
    if flat.size != width * height * 4:
        raise InputError(f"the pixel buffer holds {flat.size} values, not {width}x{height} RGBA pixels")
    return flat.reshape(height, width, 4)


def layer_from_pixels(buffer: np.ndarray, width: int, height: int) -> np.ndarray:
    """A mask layer from a mask image's pixels: white (red channel above one half) is inside."""
    return rgba(buffer, width, height)[:, :, 0] > 0.5


def pixels_from_layer(layer: np.ndarray) -> np.ndarray:
    """The flat float32 RGBA buffer of a mask image: opaque white inside, opaque black outside."""
    values = np.asarray(layer, bool).astype(np.float32)
    out = np.ones(values.shape + (4,), np.float32)
    out[:, :, :3] = values[:, :, None]
    return out.reshape(-1)


def alpha_layer(buffer: np.ndarray, width: int, height: int) -> np.ndarray:
    """The opaque part of an image (alpha above one half) as a layer, for cut-out images."""
    layer = rgba(buffer, width, height)[:, :, 3] > 0.5
    if layer.all():
        raise InputError(
            "the image has no transparent pixels, so its alpha cannot tell the object apart: "
            "paint the mask or use click-to-mask instead"
        )
    if not layer.any():
        raise InputError("the image is fully transparent: there is nothing to fill the mask from")
    return layer


def empty_layer(width: int, height: int) -> np.ndarray:
    return np.zeros((height, width), bool)


def invert(layer: np.ndarray) -> np.ndarray:
    return ~np.asarray(layer, bool)


def combine(layer: np.ndarray, other: np.ndarray, subtract: bool = False) -> np.ndarray:
    """``layer`` with ``other`` added (union) or, with ``subtract``, cut away."""
    layer, other = np.asarray(layer, bool), np.asarray(other, bool)
    check_same_size(layer, other, "the new mask", "the mask layer")
    return layer & ~other if subtract else layer | other


def flip_rows(array: np.ndarray) -> np.ndarray:
    """Blender's bottom-up rows to a file's top-down rows, or back (the same operation)."""
    return np.ascontiguousarray(np.asarray(array)[::-1])


# --- the grey format ----------------------------------------------------------------------------


def encode_grey(target: np.ndarray, occluder: np.ndarray) -> bytes:
    """A grey-format PNG file of two Blender-order layers."""
    return png.encode_png(flip_rows(masks_to_grey(target, occluder)))


def decode_grey(data: bytes, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Blender-order ``(target, occluder)`` layers of a grey-format or label PNG of the given size."""
    pixels = png.decode_png(data)
    if pixels.shape[2] in (2, 4):  # a grey PNG with alpha: the alpha is the mask, as on the server
        pixels = pixels[:, :, -1:]
    check_size(pixels, width, height, "the mask file")
    target, occluder = combined_to_masks(pixels[:, :, 0])
    return flip_rows(target), flip_rows(occluder)


# --- binary masks and images for the server -----------------------------------------------------


def encode_layer(layer: np.ndarray) -> bytes:
    """A greyscale PNG of one Blender-order layer, 255 inside (the server's binary mask format)."""
    return png.encode_png(flip_rows(np.where(np.asarray(layer, bool), 255, 0).astype(np.uint8)))


def decode_layer(data: bytes, width: int, height: int) -> np.ndarray:
    """A Blender-order layer from a binary mask PNG (e.g. SAM's reply), checked against the size."""
    pixels = png.decode_png(data)
    check_size(pixels, width, height, "the returned mask")
    return flip_rows(pixels[:, :, 0] > 127)


def check_size(array: np.ndarray, width: int, height: int, what: str) -> None:
    """An InputError unless ``array`` is ``height`` rows of ``width`` pixels, as the image is."""
    check_same_size(array, np.broadcast_to(False, (height, width)), what, "the image")


def srgb_from_linear(values: np.ndarray) -> np.ndarray:
    """The sRGB transfer curve, for float images whose pixels Blender keeps linear."""
    values = np.clip(values, 0.0, 1.0)
    return np.where(values <= 0.0031308, values * 12.92, 1.055 * np.power(values, 1.0 / 2.4) - 0.055)


def rgb8_from_pixels(buffer: np.ndarray, width: int, height: int, linear: bool) -> np.ndarray:
    """Top-down 8-bit RGB of an image's pixels (as the model and SAM see photos)."""
    colour = rgba(buffer, width, height)[::-1, :, :3]
    colour = srgb_from_linear(colour) if linear else np.clip(colour, 0.0, 1.0)
    return np.ascontiguousarray(np.round(colour * 255.0).astype(np.uint8))


def encode_image(buffer: np.ndarray, width: int, height: int, linear: bool) -> bytes:
    """An RGB PNG of an image's pixels; alpha is dropped, as the server would drop it."""
    return png.encode_png(rgb8_from_pixels(buffer, width, height, linear))


# --- preview and checks ---------------------------------------------------------------------------


def overlay(
    buffer: np.ndarray, width: int, height: int, target: np.ndarray, occluder: np.ndarray, opacity: float = 0.5
) -> np.ndarray:
    """The image with the target tinted green and occluders red, as a new flat buffer."""
    image = rgba(buffer, width, height)
    check_same_size(image, target, "the image", "the target mask")
    check_same_size(image, occluder, "the image", "the occluder mask")
    out = image.copy()
    for layer, colour in (
        (np.asarray(target, bool) & ~np.asarray(occluder, bool), GREEN),
        (np.asarray(occluder, bool), RED),
    ):
        out[layer, :3] = (1.0 - opacity) * out[layer, :3] + opacity * np.asarray(colour, np.float32)
    out[:, :, 3] = 1.0
    return out.reshape(-1)


def validate_view(
    target: np.ndarray, occluder: np.ndarray | None, width: int, height: int, where: str = "the image"
) -> None:
    """Raise InputError unless the masks fit the image and some of the target is visible."""
    check_size(target, width, height, f"The target mask of {where}")
    if occluder is not None:
        check_size(occluder, width, height, f"The occluder mask of {where}")
    visible_target(target, occluder, where)

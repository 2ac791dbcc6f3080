# SPDX-License-Identifier: GPL-3.0-or-later
"""Mask logic on the pixel buffers Blender hands out, without bpy.

Blender gives an image as a flat float32 RGBA buffer whose FIRST ROW IS THE BOTTOM of the picture;
PNG files and the server count rows from the top. A mask "layer" here is a boolean ``(H, W)`` array
in Blender's order (white = inside); ``flip_rows`` converts at the file boundary, and the encode /
decode helpers do it for you. The combined grey format is the reference implementation's:
255 background, 188 target, 0 occluder.
"""

from __future__ import annotations

import numpy as np

from . import png
from .server_package import ensure_client_importable

ensure_client_importable()  # before importing amodal3r: a checkout needs its path
from amodal3r.api.protocol import (
    GREY_BACKGROUND,
    GREY_BACKGROUND_ABOVE,
    GREY_OCCLUDER,
    GREY_OCCLUDER_BELOW,
    GREY_TARGET,
    LABEL_OCCLUDER,
    LABEL_TARGET,
)

GREEN, RED = (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)


class MaskError(ValueError):
    """Masks that cannot be used as they are; the message says what to do."""


def rgba(buffer: np.ndarray, width: int, height: int) -> np.ndarray:
    """The ``(H, W, 4)`` view of a flat RGBA buffer, after checking its length."""
    flat = np.asarray(buffer, np.float32).reshape(-1)
    if flat.size != width * height * 4:
        raise MaskError(f"the pixel buffer holds {flat.size} values, not {width}x{height} RGBA pixels")
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
        raise MaskError("the image has no transparent pixels, so its alpha cannot tell the object apart: "
                        "paint the mask or use click-to-mask instead")
    if not layer.any():
        raise MaskError("the image is fully transparent: there is nothing to fill the mask from")
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


def size_text(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"


def check_same_size(first: np.ndarray, second: np.ndarray, first_name: str, second_name: str) -> None:
    if first.shape[:2] != second.shape[:2]:
        raise MaskError(f"{first_name} is {size_text(first)} but {second_name} is {size_text(second)}: "
                        "masks must be the size of their image (create the masks again)")


# --- the grey format ----------------------------------------------------------------------------


def grey_from_layers(target: np.ndarray, occluder: np.ndarray) -> np.ndarray:
    """The combined uint8 mask; where both layers are set the occluder wins, as it is in front."""
    check_same_size(target, occluder, "the target mask", "the occluder mask")
    grey = np.full(target.shape, GREY_BACKGROUND, np.uint8)
    grey[np.asarray(target, bool)] = GREY_TARGET
    grey[np.asarray(occluder, bool)] = GREY_OCCLUDER
    return grey


def layers_from_grey(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(target, occluder)`` from a grey mask (255/188/0) or a label image (0/1/2)."""
    values = np.asarray(values)
    if values.ndim == 3:
        values = values[:, :, 0]
    if values.max(initial=0) <= LABEL_OCCLUDER:
        return values == LABEL_TARGET, values == LABEL_OCCLUDER
    occluder = values < GREY_OCCLUDER_BELOW
    background = values > GREY_BACKGROUND_ABOVE
    return ~(occluder | background), occluder


def encode_grey(target: np.ndarray, occluder: np.ndarray) -> bytes:
    """A grey-format PNG file of two Blender-order layers."""
    return png.encode_png(flip_rows(grey_from_layers(target, occluder)))


def decode_grey(data: bytes, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Blender-order ``(target, occluder)`` layers of a grey-format or label PNG of the given size."""
    pixels = png.decode_png(data)
    if pixels.shape[2] in (2, 4):  # a grey PNG with alpha: the alpha is the mask, as on the server
        pixels = pixels[:, :, -1:]
    check_size(pixels, width, height, "the mask file")
    target, occluder = layers_from_grey(pixels[:, :, 0])
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


def check_size(pixels: np.ndarray, width: int, height: int, what: str) -> None:
    if pixels.shape[:2] != (height, width):
        raise MaskError(f"{what} is {size_text(pixels)} but the image is {width}x{height}: "
                        "use a mask made for this image")


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


def overlay(buffer: np.ndarray, width: int, height: int, target: np.ndarray, occluder: np.ndarray,
            opacity: float = 0.5) -> np.ndarray:
    """The image with the target tinted green and occluders red, as a new flat buffer."""
    image = rgba(buffer, width, height)
    check_same_size(image, target, "the image", "the target mask")
    check_same_size(image, occluder, "the image", "the occluder mask")
    out = image.copy()
    for layer, colour in ((np.asarray(target, bool) & ~np.asarray(occluder, bool), GREEN),
                          (np.asarray(occluder, bool), RED)):
        out[layer, :3] = (1.0 - opacity) * out[layer, :3] + opacity * np.asarray(colour, np.float32)
    out[:, :, 3] = 1.0
    return out.reshape(-1)


def validate_view(target: np.ndarray, occluder: np.ndarray | None, width: int, height: int,
                  name: str = "the image") -> None:
    """Raise MaskError unless the masks fit the image and some of the target is visible."""
    shape = (height, width)
    if target.shape != shape:
        raise MaskError(f"The target mask of {name} is {size_text(target)} but the image is {width}x{height}: "
                        "create the masks again for this image")
    if occluder is not None and occluder.shape != shape:
        raise MaskError(f"The occluder mask of {name} is {size_text(occluder)} but the image is "
                        f"{width}x{height}: create the masks again for this image")
    if not target.any():
        raise MaskError(f"The target mask of {name} is empty: paint the visible part of the object white "
                        "(or use click-to-mask)")
    if occluder is not None and not (target & ~occluder).any():
        raise MaskError(f"The occluder mask of {name} covers the whole target: mark only what is in front "
                        "of the object as occluder")

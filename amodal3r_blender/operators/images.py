# SPDX-License-Identifier: GPL-3.0-or-later
"""Blender images as the add-on uses them: pixels of photos, the two mask images of a view, the overlay.

The mask images are ordinary Blender images ("<image> target", "<image> occluder"): white marks
the layer. The source photo itself is only ever read. The mask operators, click-to-mask and
Reconstruct share these helpers; the pixel logic without bpy is ``core.masks``.
"""

from __future__ import annotations

import bpy
import numpy as np

from ..core import masks
from ..ui.properties import AMODAL3R_PG_view

LAYER_ATTRIBUTES = {"TARGET": "target_mask", "OCCLUDER": "occluder_mask"}
LAYER_SUFFIXES = {"TARGET": "target", "OCCLUDER": "occluder"}


class UserError(Exception):
    """A problem the person can fix; operators report its message as it is."""


# --- pixels of Blender images -------------------------------------------------------------------


def image_size(image: bpy.types.Image) -> tuple[int, int]:
    """``(width, height)`` of an image whose pixels can be read, else a UserError."""
    width, height = image.size[:]
    if width == 0 or height == 0:
        where = f" from {image.filepath}" if image.filepath else ""
        raise UserError(
            f"The image {image.name!r} has no pixels (could it be read{where}?): reload it or choose another image"
        )
    return width, height


def read_pixels(image: bpy.types.Image) -> np.ndarray:
    """The image's flat float32 RGBA buffer, bottom row first."""
    width, height = image_size(image)
    buffer = np.empty(width * height * 4, np.float32)
    image.pixels.foreach_get(buffer)
    return buffer


def write_pixels(image: bpy.types.Image, buffer: np.ndarray) -> None:
    image.pixels.foreach_set(np.ascontiguousarray(buffer, np.float32).reshape(-1))
    image.update()


def read_layer(image: bpy.types.Image) -> np.ndarray:
    width, height = image_size(image)
    return masks.layer_from_pixels(read_pixels(image), width, height)


def write_layer(image: bpy.types.Image, layer: np.ndarray) -> None:
    width, height = image_size(image)
    masks.check_size(layer, width, height, f"the mask for {image.name!r}")
    write_pixels(image, masks.pixels_from_layer(layer))


def is_linear(image: bpy.types.Image) -> bool:
    """Whether Blender holds the image's pixels in linear light (float colour images)."""
    return image.is_float and not image.colorspace_settings.is_data


def encode_source(image: bpy.types.Image) -> bytes:
    """The image as an RGB PNG for the server, whatever its file format, packing or colour space."""
    width, height = image_size(image)
    return masks.encode_image(read_pixels(image), width, height, is_linear(image))


# --- views and their mask images ----------------------------------------------------------------


def view_image(view: AMODAL3R_PG_view) -> bpy.types.Image:
    if view.image is None:
        raise UserError(
            "No image to work on: choose the source image in the Source panel (or right-click an "
            "image in the Image Editor), or the image of an extra view in the Views panel"
        )
    return view.image


def new_mask_image(source: bpy.types.Image, layer: str) -> bpy.types.Image:
    """A black, Non-Color mask image the size of ``source``."""
    width, height = image_size(source)
    image = bpy.data.images.new(f"{source.name} {LAYER_SUFFIXES[layer]}", width, height, alpha=False, is_data=True)
    write_layer(image, masks.empty_layer(width, height))
    return image


def layer_image(view: AMODAL3R_PG_view, layer: str, create: bool = False) -> bpy.types.Image:
    """The view's mask image of one layer, made on request; a size mismatch is a UserError."""
    image = getattr(view, LAYER_ATTRIBUTES[layer])
    source = view_image(view)
    if image is None:
        if not create:
            raise UserError(f"{source.name!r} has no {LAYER_SUFFIXES[layer]} mask yet: click Create Masks")
        image = new_mask_image(source, layer)
        setattr(view, LAYER_ATTRIBUTES[layer], image)
    if tuple(image.size) != tuple(source.size):
        raise UserError(
            f"The {LAYER_SUFFIXES[layer]} mask {image.name!r} is {image.size[0]}x{image.size[1]} but "
            f"{source.name!r} is {source.size[0]}x{source.size[1]}: click Create Masks to remake it"
        )
    return image


def ensure_masks(view: AMODAL3R_PG_view) -> list[str]:
    """Make the missing mask images of a view and remake wrongly sized ones; names of new ones."""
    source = view_image(view)
    made = []
    for layer, attribute in LAYER_ATTRIBUTES.items():
        image = getattr(view, attribute)
        if image is None or tuple(image.size) != tuple(image_size(source)):
            setattr(view, attribute, new_mask_image(source, layer))
            made.append(getattr(view, attribute).name)
    return made


def overlay_image(source: bpy.types.Image) -> bpy.types.Image:
    """The "<image> overlay" image of a source, remade when its size or kind no longer matches."""
    name = f"{source.name} overlay"
    image = bpy.data.images.get(name)
    if image is not None and (tuple(image.size) != tuple(source.size) or image.is_float != source.is_float):
        bpy.data.images.remove(image)
        image = None
    if image is None:
        width, height = image_size(source)
        image = bpy.data.images.new(name, width, height, alpha=True, float_buffer=source.is_float)
        image.colorspace_settings.name = source.colorspace_settings.name
    return image

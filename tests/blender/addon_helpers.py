# SPDX-License-Identifier: GPL-3.0-or-later
"""Helpers of the tests that drive the enabled add-on in the bpy module: its modules, test photos,
mask pixels, and editor areas to run operators and draw panels in."""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np

from amodal3r_blender.core import masks

W, H = 8, 6  # the test photo's size: small, and not square, so a swapped width and height shows


def module(addon: str, name: str) -> ModuleType:
    """A module of the enabled add-on, e.g. ``module(addon, "ui.panels")``."""
    return importlib.import_module(f"{addon}.{name}")


def addon_of(settings) -> str:
    """The enabled add-on's module name, from its scene settings (a class of its ``ui.properties``)."""
    return type(settings).__module__.rsplit(".ui.", 1)[0]


def photo(name: str = "photo.png", width: int = W, height: int = H):
    """An RGBA photo whose left half is transparent (a cut-out) and a gradient elsewhere."""
    import bpy

    image = bpy.data.images.new(name, width, height, alpha=True)
    pixels = np.zeros((height, width, 4), np.float32)
    pixels[:, :, 0] = np.linspace(0, 1, width)[None, :]
    pixels[:, :, 1] = np.linspace(0, 1, height)[:, None]
    pixels[:, width // 2 :, 3] = 1.0
    image.pixels.foreach_set(pixels.reshape(-1))
    return image


def pixels(image) -> np.ndarray:
    """An image's flat float32 RGBA buffer, bottom row first."""
    buffer = np.empty(image.size[0] * image.size[1] * 4, np.float32)
    image.pixels.foreach_get(buffer)
    return buffer


def layer(image) -> np.ndarray:
    """A mask image as a Blender-order boolean layer."""
    return masks.layer_from_pixels(pixels(image), *image.size[:])


def paint(image, values: np.ndarray) -> None:
    """Set a mask image to a Blender-order boolean layer."""
    image.pixels.foreach_set(masks.pixels_from_layer(values))


def area(kind: str):
    """``(window, area)``: an area of the given type in the window (an existing one is retyped)."""
    import bpy

    window = bpy.context.window_manager.windows[0]
    areas = window.screen.areas
    found = next((a for a in areas if a.type == kind), None)
    if found is None:
        found = next(a for a in areas if a.type not in {"VIEW_3D", "IMAGE_EDITOR"})
        found.type = kind
    return window, found


def override(kind: str):
    """A context of the sidebar of an editor of the given type, as when its panels draw."""
    import bpy

    window, found = area(kind)
    region = next(r for r in found.regions if r.type == "UI")
    return bpy.context.temp_override(window=window, area=found, region=region, space_data=found.spaces.active)

# SPDX-License-Identifier: GPL-3.0-or-later
"""Amodal3R for Blender: reconstruct a partly hidden object from an image as a textured mesh.

The add-on never imports torch: a reconstruction server (the bundled ``amodal3r`` package, run
with its own Python) does the work, reached through ``amodal3r.api.client`` over loopback HTTP.
Three layers: ``core`` (no bpy: the server, background tasks, masks, PNGs), ``operators`` (what
the person runs) and ``ui`` (properties, preferences, panels, menus); ``batch.py`` runs
reconstructions without the UI.
"""

import importlib

from . import core  # noqa: F401 - first: it makes the server's ``amodal3r.api`` importable for every module

# Registration order: preferences and properties first, the UI that shows them last.
MODULES = (
    "ui.preferences",
    "ui.properties",
    "ui.placement",
    "operators.backend",
    "operators.masks",
    "operators.segment",
    "operators.placement",
    "operators.reconstruct",
    "operators.match_photo",
    "ui.panels",
    "ui.menus",
)


def _modules():
    return [importlib.import_module(f".{name}", __package__) for name in MODULES]


def register() -> None:
    for module in _modules():
        module.register()


def unregister() -> None:
    for module in reversed(_modules()):
        module.unregister()

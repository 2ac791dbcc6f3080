# SPDX-License-Identifier: GPL-3.0-or-later
"""Amodal3R for Blender: reconstruct a partly hidden object from an image as a textured mesh.

The add-on never imports torch: a reconstruction server (the bundled ``amodal3r`` package, run
with its own Python) does the work, reached through ``amodal3r.api.client`` over loopback HTTP.
Modules without bpy (masks, backend, jobs) hold the logic; the others are thin Blender layers.
"""

import importlib

# Registration order: preferences and properties first, the UI that shows them last.
MODULES = (
    "preferences",
    "properties",
    "ops_backend",
    "ops_masks",
    "ops_segment",
    "ops_reconstruct",
    "panels",
    "menus",
)


def _modules():
    return [importlib.import_module(f".{name}", __package__) for name in MODULES]


def register() -> None:
    for module in _modules():
        module.register()


def unregister() -> None:
    for module in reversed(_modules()):
        module.unregister()

# SPDX-License-Identifier: GPL-3.0-or-later
"""The Blender version differences of ``ui/compat.py``, checked against the running release: each
function must give what its docstring says this release has (the suite runs on 4.2, 4.5 and 5.0)."""

from __future__ import annotations

import bpy
from addon_helpers import module

SINCE_5_0 = bpy.app.version >= (5, 0, 0)


def test_unified_paint_settings_of_this_release(clean_scene):
    compat = module(clean_scene, "ui.compat")
    tool_settings = bpy.context.scene.tool_settings
    found = compat.unified_paint_settings(tool_settings)
    expected = tool_settings.image_paint.unified_paint_settings if SINCE_5_0 else tool_settings.unified_paint_settings
    assert found == expected and isinstance(found, bpy.types.UnifiedPaintSettings)


def test_png_output_settings_of_this_release(clean_scene):
    compat = module(clean_scene, "ui.compat")
    image_settings = bpy.context.scene.render.image_settings
    if SINCE_5_0:
        image_settings.media_type = "VIDEO"  # PNG cannot be chosen until the media type is IMAGE again
    wanted = compat.png_output_settings(image_settings)
    assert list(wanted)[0] == ("media_type" if SINCE_5_0 else "file_format")
    for name, value in wanted.items():
        setattr(image_settings, name, value)
    assert (image_settings.file_format, image_settings.color_mode, image_settings.color_depth) == ("PNG", "RGBA", "8")

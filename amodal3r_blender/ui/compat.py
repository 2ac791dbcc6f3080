# SPDX-License-Identifier: GPL-3.0-or-later
"""Where Blender's Python API differs between the releases the add-on supports: 4.2 LTS, 4.5 LTS
and 5.0 (``blender_version_min`` is 4.2.0). Each difference is one function here, named after what
it gives and saying which releases do what; nothing else in the add-on asks for Blender's version.
The functions look for the feature itself (``bl_rna``), so a later release that keeps it needs no
change. ``ui`` is the lowest layer with bpy, so operators and panels alike can use this module.
"""

from __future__ import annotations

import bpy


def unified_paint_settings(tool_settings: bpy.types.ToolSettings) -> bpy.types.UnifiedPaintSettings:
    """The paint settings brushes share (their colours). 4.2 and 4.5 keep one set in the tool
    settings (``ToolSettings.unified_paint_settings``); 5.0 keeps one per paint mode
    (``ImagePaint.unified_paint_settings``) and drops the other."""
    image_paint = tool_settings.image_paint
    if "unified_paint_settings" in image_paint.bl_rna.properties:  # 5.0
        return image_paint.unified_paint_settings
    return tool_settings.unified_paint_settings  # 4.2, 4.5


def png_output_settings(image_settings: bpy.types.ImageFormatSettings) -> dict[str, str]:
    """The output settings, in the order to set them, that save a render as an 8-bit RGBA PNG.
    5.0 added ``media_type`` (image, multi-layer image or video), which must be IMAGE before PNG can
    be chosen; 4.2 and 4.5 have the file format alone."""
    wanted = {"file_format": "PNG", "color_mode": "RGBA", "color_depth": "8"}
    if "media_type" in image_settings.bl_rna.properties:  # 5.0
        return {"media_type": "IMAGE", **wanted}
    return wanted  # 4.2, 4.5

# SPDX-License-Identifier: GPL-3.0-or-later
"""Operators that make and edit the two mask layers of a view, and pick the source image and views.

The masks are Blender images (see ``images``), so they can be painted in the Image Editor,
cleared, inverted, filled from the photo's alpha, imported from and exported to the combined
grey PNG format of ``amodal3r.api.masks``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import ClassVar

import bpy
from bpy.props import EnumProperty, StringProperty

from amodal3r.api.errors import InputError
from amodal3r.api.files import write_atomically
from amodal3r.api.protocol import MAX_VIEWS

from ..core import masks
from ..ui.compat import png_output_settings, unified_paint_settings
from ..ui.properties import LAYERS, active_view, get_settings, main_view
from .images import (
    UserError,
    ensure_masks,
    image_size,
    layer_image,
    overlay_image,
    read_layer,
    read_pixels,
    view_image,
    write_layer,
    write_pixels,
)


class _ViewOperator:
    """Runs ``run`` and reports UserError / InputError (a PNGError too) instead of raising them."""

    bl_options: ClassVar[set[str]] = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return context.scene is not None and hasattr(context.scene, "amodal3r")

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            return self.run(context)
        except (UserError, InputError) as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}

    def run(self, context: bpy.types.Context) -> set[str]:
        raise NotImplementedError


def _layer_property(description: str):
    return EnumProperty(name="Layer", items=LAYERS, default="TARGET", description=description)


# --- mask operators -----------------------------------------------------------------------------


class AMODAL3R_OT_create_masks(_ViewOperator, bpy.types.Operator):
    """Make black target and occluder mask images the size of the view's image"""

    bl_idname = "amodal3r.create_masks"
    bl_label = "Create Masks"

    def run(self, context: bpy.types.Context) -> set[str]:
        made = ensure_masks(active_view(get_settings(context)))
        self.report({"INFO"}, f"Created {', '.join(made)}" if made else "The masks already exist")
        return {"FINISHED"}


class AMODAL3R_OT_clear_mask(_ViewOperator, bpy.types.Operator):
    """Make a mask layer empty (all black)"""

    bl_idname = "amodal3r.clear_mask"
    bl_label = "Clear Mask"

    layer: _layer_property("The layer to clear")  # type: ignore[valid-type]

    def run(self, context: bpy.types.Context) -> set[str]:
        image = layer_image(active_view(get_settings(context)), self.layer)
        write_layer(image, masks.empty_layer(*image_size(image)))
        return {"FINISHED"}


class AMODAL3R_OT_invert_mask(_ViewOperator, bpy.types.Operator):
    """Swap the inside and outside of a mask layer"""

    bl_idname = "amodal3r.invert_mask"
    bl_label = "Invert Mask"

    layer: _layer_property("The layer to invert")  # type: ignore[valid-type]

    def run(self, context: bpy.types.Context) -> set[str]:
        image = layer_image(active_view(get_settings(context)), self.layer)
        write_layer(image, masks.invert(read_layer(image)))
        return {"FINISHED"}


class AMODAL3R_OT_fill_from_alpha(_ViewOperator, bpy.types.Operator):
    """Set a mask layer to the opaque part of the view's image (for cut-out photos)"""

    bl_idname = "amodal3r.fill_from_alpha"
    bl_label = "Fill from Alpha"

    layer: _layer_property("The layer to fill")  # type: ignore[valid-type]

    def run(self, context: bpy.types.Context) -> set[str]:
        view = active_view(get_settings(context))
        source = view_image(view)
        width, height = image_size(source)
        layer = masks.alpha_layer(read_pixels(source), width, height)
        write_layer(layer_image(view, self.layer, create=True), layer)
        return {"FINISHED"}


class AMODAL3R_OT_import_mask(_ViewOperator, bpy.types.Operator):
    """Load a combined mask PNG (255 background, 188 target, 0 occluder; or labels 0/1/2) into both layers"""

    bl_idname = "amodal3r.import_mask"
    bl_label = "Import Mask"

    filepath: StringProperty(subtype="FILE_PATH")  # type: ignore[valid-type]
    filter_glob: StringProperty(default="*.png", options={"HIDDEN"})  # type: ignore[valid-type]

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def run(self, context: bpy.types.Context) -> set[str]:
        view = active_view(get_settings(context))
        width, height = image_size(view_image(view))
        path = Path(bpy.path.abspath(self.filepath))
        try:
            data = path.read_bytes()
        except OSError as error:
            raise UserError(f"Cannot read {path}: {error.strerror}") from None
        target, occluder = masks.decode_grey(data, width, height)
        write_layer(layer_image(view, "TARGET", create=True), target)
        write_layer(layer_image(view, "OCCLUDER", create=True), occluder)
        self.report({"INFO"}, f"Imported {path.name} into both mask layers")
        return {"FINISHED"}


class AMODAL3R_OT_export_mask(_ViewOperator, bpy.types.Operator):
    """Save both layers as one grey PNG (255 background, 188 target, 0 occluder), as the reference uses"""

    bl_idname = "amodal3r.export_mask"
    bl_label = "Export Mask"

    filepath: StringProperty(subtype="FILE_PATH")  # type: ignore[valid-type]
    filter_glob: StringProperty(default="*.png", options={"HIDDEN"})  # type: ignore[valid-type]
    check_existing: bpy.props.BoolProperty(default=True, options={"HIDDEN"})  # type: ignore[valid-type]

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        if not self.filepath:
            image = active_view(get_settings(context)).image
            self.filepath = f"{bpy.path.clean_name(image.name if image else 'mask')}_mask.png"
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def run(self, context: bpy.types.Context) -> set[str]:
        if not self.filepath:
            raise UserError("Choose a file to export the mask to")
        view = active_view(get_settings(context))
        data = masks.encode_grey(read_layer(layer_image(view, "TARGET")), read_layer(layer_image(view, "OCCLUDER")))
        path = Path(bpy.path.abspath(bpy.path.ensure_ext(self.filepath, ".png")))
        try:
            write_atomically(path, data)
        except OSError as error:
            raise UserError(f"Cannot write {path}: {error.strerror}") from None
        self.report({"INFO"}, f"Saved {path}")
        return {"FINISHED"}


class AMODAL3R_OT_preview_overlay(_ViewOperator, bpy.types.Operator):
    """Show the image with the target tinted green and occluders red, in a separate "<image> overlay" image"""

    bl_idname = "amodal3r.preview_overlay"
    bl_label = "Preview Overlay"

    def run(self, context: bpy.types.Context) -> set[str]:
        view = active_view(get_settings(context))
        source = view_image(view)
        width, height = image_size(source)
        buffer = masks.overlay(
            read_pixels(source),
            width,
            height,
            read_layer(layer_image(view, "TARGET")),
            read_layer(layer_image(view, "OCCLUDER")),
        )
        preview = overlay_image(source)
        write_pixels(preview, buffer)
        space = context.space_data
        if space is not None and space.type == "IMAGE_EDITOR":
            space.image = preview
        self.report({"INFO"}, f"Updated {preview.name!r}")
        return {"FINISHED"}


# --- painting -----------------------------------------------------------------------------------


def find_image_editor(context: bpy.types.Context) -> bpy.types.Area | None:
    """The Image Editor to paint in: the current area, else one in the window, else a new one
    split off the current 3D View."""
    if context.area is not None and context.area.type == "IMAGE_EDITOR":
        return context.area
    screen = context.window.screen if context.window is not None else None
    if screen is None:
        return None
    for area in screen.areas:
        if area.type == "IMAGE_EDITOR":
            return area
    if context.area is not None and context.area.type == "VIEW_3D":
        return _split_off_image_editor(context, context.area)
    return None


def _split_off_image_editor(context: bpy.types.Context, area: bpy.types.Area) -> bpy.types.Area | None:
    screen = context.window.screen
    before = set(screen.areas)
    region = next((r for r in area.regions if r.type == "WINDOW"), None)
    try:
        with context.temp_override(window=context.window, area=area, region=region):
            bpy.ops.screen.area_split(direction="VERTICAL", factor=0.5)
    except RuntimeError:
        return None
    new = next((a for a in screen.areas if a not in before), None)
    if new is not None:
        new.type = "IMAGE_EDITOR"
    return new


def set_paint_colours(tool_settings: bpy.types.ToolSettings) -> None:
    """White paints the mask in, black (Ctrl, the secondary colour) paints it out, whichever brush
    paints: the shared colours are switched on (4.2 starts without them; since 4.3 the brush is an
    asset the person may pick only later, so there may be no brush yet to colour)."""
    unified = unified_paint_settings(tool_settings)
    unified.use_unified_color = True
    for holder in (unified, tool_settings.image_paint.brush):
        if holder is not None:
            holder.color = (1.0, 1.0, 1.0)
            holder.secondary_color = (0.0, 0.0, 0.0)


class AMODAL3R_OT_paint_mask(_ViewOperator, bpy.types.Operator):
    """Show a mask layer in the Image Editor in Paint mode with a white brush (Ctrl paints black)"""

    bl_idname = "amodal3r.paint_mask"
    bl_label = "Paint Mask"

    layer: _layer_property("The layer to paint")  # type: ignore[valid-type]

    def run(self, context: bpy.types.Context) -> set[str]:
        image = layer_image(active_view(get_settings(context)), self.layer, create=True)
        area = find_image_editor(context)
        if area is None:
            raise UserError(
                "No Image Editor to paint in: open one (or switch an area to the Image Editor) and "
                "click Paint again there"
            )
        if area.ui_type == "UV":
            area.ui_type = "IMAGE_EDITOR"
        space = area.spaces.active
        space.image = image
        space.ui_mode = "PAINT"
        paint = context.tool_settings.image_paint
        paint.mode = "IMAGE"
        paint.canvas = image
        set_paint_colours(context.tool_settings)
        area.tag_redraw()
        self.report({"INFO"}, f"Painting {image.name!r}: left mouse paints white, Ctrl+left mouse paints black")
        return {"FINISHED"}


# --- the source ---------------------------------------------------------------------------------


def render_camera(scene: bpy.types.Scene) -> bpy.types.Image:
    """Render the scene's camera with its own engine into a new packed image; output settings that
    saving needs are changed only for the moment and put back."""
    settings = scene.render.image_settings
    png = png_output_settings(settings)
    saved = {name: getattr(settings, name) for name in png}
    with tempfile.TemporaryDirectory(prefix="amodal3r-render-") as folder:
        path = os.path.join(folder, "render.png")
        try:
            for name, value in png.items():
                setattr(settings, name, value)
            bpy.ops.render.render(scene=scene.name)
            result = bpy.data.images.get("Render Result")
            if result is None:
                raise UserError("The render produced no image: check the render settings")
            result.save_render(path, scene=scene)
        finally:
            for name, value in saved.items():
                setattr(settings, name, value)
        image = bpy.data.images.load(path)
        image.pack()
    image.filepath_raw = ""
    image.name = f"{scene.camera.name} render"
    return image


class AMODAL3R_OT_render_camera_source(_ViewOperator, bpy.types.Operator):
    """Render the active camera with the scene's render engine and use the picture as the source"""

    bl_idname = "amodal3r.render_camera_source"
    bl_label = "Render Camera"

    def run(self, context: bpy.types.Context) -> set[str]:
        scene = context.scene
        if scene.camera is None:
            raise UserError("The scene has no active camera: add a camera or set one in the Scene properties")
        try:
            image = render_camera(scene)
        except RuntimeError as error:
            raise UserError(f"The camera render failed: {error}") from None
        settings = get_settings(context)
        settings.source_kind = "CAMERA"
        settings.source_image = image
        self.report({"INFO"}, f"Rendered {image.name!r} ({image.size[0]}x{image.size[1]})")
        return {"FINISHED"}


# --- views --------------------------------------------------------------------------------------


class AMODAL3R_OT_add_view(_ViewOperator, bpy.types.Operator):
    """Add another photo of the same object (a multi-view reconstruction)"""

    bl_idname = "amodal3r.add_view"
    bl_label = "Add View"

    def run(self, context: bpy.types.Context) -> set[str]:
        settings = get_settings(context)
        main_view(settings)
        if len(settings.views) >= MAX_VIEWS:
            raise UserError(f"A reconstruction takes at most {MAX_VIEWS} views")
        settings.views.add()
        settings.active_view_index = len(settings.views) - 1
        return {"FINISHED"}


class AMODAL3R_OT_remove_view(_ViewOperator, bpy.types.Operator):
    """Remove the selected extra view (its images stay in the file)"""

    bl_idname = "amodal3r.remove_view"
    bl_label = "Remove View"

    def run(self, context: bpy.types.Context) -> set[str]:
        settings = get_settings(context)
        index = settings.active_view_index
        if index == 0 or index >= len(settings.views):
            raise UserError("The main view follows the source image and cannot be removed: select an extra view")
        settings.views.remove(index)
        settings.active_view_index = min(index, len(settings.views) - 1)
        return {"FINISHED"}


classes = (
    AMODAL3R_OT_create_masks,
    AMODAL3R_OT_clear_mask,
    AMODAL3R_OT_invert_mask,
    AMODAL3R_OT_fill_from_alpha,
    AMODAL3R_OT_import_mask,
    AMODAL3R_OT_export_mask,
    AMODAL3R_OT_preview_overlay,
    AMODAL3R_OT_paint_mask,
    AMODAL3R_OT_render_camera_source,
    AMODAL3R_OT_add_view,
    AMODAL3R_OT_remove_view,
)
register, unregister = bpy.utils.register_classes_factory(classes)

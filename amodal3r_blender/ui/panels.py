# SPDX-License-Identifier: GPL-3.0-or-later
"""The "Reconstruct occluded object" sidebar panel, in the 3D View and in the Image Editor.

Each panel's body is written once (the ``_*Body`` mixins) and registered for both editors by
``panel_classes``. Drawing only reads: nothing here creates views or images (Blender forbids
writing data while drawing), so a missing view shows a hint instead.
"""

from __future__ import annotations

import textwrap
from typing import ClassVar

import bpy

from ..core.backend import current_backend
from ..core.jobs import random_weights
from .placement import placement_of, pose_summary
from .properties import AMODAL3R_PG_settings, AMODAL3R_PG_view

CATEGORY = "Amodal3R"
SPACES = {"VIEW_3D": "VIEW3D", "IMAGE_EDITOR": "IMAGE"}  # space type -> class name prefix
WRAP = 56
LAYER_ROWS = (
    ("TARGET", "target_mask", "Target", "Visible part of the object"),
    ("OCCLUDER", "occluder_mask", "Occluder", "What is in front of it"),
)


def settings_of(context: bpy.types.Context) -> AMODAL3R_PG_settings:
    return context.scene.amodal3r


def view_or_none(settings: AMODAL3R_PG_settings) -> AMODAL3R_PG_view | None:
    """The active view (the main one when the index is stale), or None before any exists."""
    if not settings.views:
        return None
    index = settings.active_view_index
    return settings.views[index] if index < len(settings.views) else settings.views[0]


def draw_wrapped(layout: bpy.types.UILayout, text: str, icon: str = "NONE") -> None:
    """A long message as several labels, the icon on the first."""
    column = layout.column(align=True)
    lines = [part for line in text.splitlines() for part in (textwrap.wrap(line, WRAP) or [""])]
    for number, line in enumerate(lines[:14]):
        column.label(text=line, icon=icon if number == 0 else "BLANK1")


class AMODAL3R_UL_views(bpy.types.UIList):
    """Views: image name and which masks it has."""

    def draw_item(self, context, layout, data, item, icon, active_data, active_property, index=0, flt_flag=0):
        name = item.image.name if item.image is not None else "(no image)"
        row = layout.row(align=True)
        row.label(text=f"{index + 1}. {name}" + (" (main)" if index == 0 else ""), icon="IMAGE_DATA")
        row.label(text="", icon="CHECKMARK" if item.target_mask is not None else "DOT")
        row.label(text="", icon="CHECKMARK" if item.occluder_mask is not None else "DOT")


class _Amodal3RPanel:
    """What all the panels share: the sidebar tab and the need for the add-on's scene settings."""

    bl_region_type = "UI"
    bl_category = CATEGORY

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return context.scene is not None and hasattr(context.scene, "amodal3r")


# --- the main panel: Reconstruct, progress, errors, server ---------------------------------------


def draw_run(layout: bpy.types.UILayout, context: bpy.types.Context) -> None:
    settings = settings_of(context)
    if settings.running:
        row = layout.row(align=True)
        row.progress(factor=settings.progress, type="BAR", text=settings.message or "Working")
        row.operator("amodal3r.cancel", text="", icon="CANCEL")
    else:
        column = layout.column()
        column.scale_y = 1.5
        column.enabled = settings.source_image is not None
        column.operator("amodal3r.reconstruct", icon="MESH_ICOSPHERE")
        layout.prop(settings, "match_photo")
        if settings.source_image is None:
            layout.label(text="Choose a source image below", icon="INFO")
        elif settings.message:
            layout.label(text=settings.message)
        if settings.notices:
            draw_notices(layout.box(), settings.notices.splitlines())
    if settings.last_error:
        draw_wrapped(layout.box(), settings.last_error, icon="ERROR")
    draw_server(layout, settings)


def draw_notices(layout: bpy.types.UILayout, notices: list[str]) -> None:
    """What the server said about the result, beside it; random weights get the button for real ones."""
    for notice in notices:
        draw_wrapped(layout, notice, icon="INFO")
    if random_weights(notices):
        layout.operator("amodal3r.download_models", text="Download the Real Models", icon="IMPORT")


def draw_server(layout: bpy.types.UILayout, settings: AMODAL3R_PG_settings) -> None:
    backend = current_backend()
    if settings.server_dead:
        row = layout.row()
        row.alert = True
        row.label(text="The reconstruction server stopped", icon="ERROR")
        layout.operator("amodal3r.restart_server", icon="FILE_REFRESH")
    elif backend is not None:
        draw_wrapped(layout, backend.status_text().splitlines()[0], icon="LINKED")


class _MainBody(_Amodal3RPanel):
    bl_label = "Reconstruct occluded object"
    key = ""

    def draw(self, context: bpy.types.Context) -> None:
        draw_run(self.layout, context)


# --- source -------------------------------------------------------------------------------------


def draw_source(layout: bpy.types.UILayout, context: bpy.types.Context) -> None:
    settings = settings_of(context)
    layout.row().prop(settings, "source_kind", expand=True)
    if settings.source_kind == "IMAGE":
        layout.template_ID(settings, "source_image", open="image.open")
        space = context.space_data
        if space is not None and space.type == "IMAGE_EDITOR" and space.image not in (None, settings.source_image):
            layout.operator("amodal3r.use_displayed_image", text="Use Displayed Image", icon="IMAGE_DATA")
    elif settings.source_kind == "FILE":
        layout.prop(settings, "source_filepath", text="")
    else:
        layout.prop(context.scene, "camera")
        layout.operator("amodal3r.render_camera_source", icon="RENDER_STILL")
    image = settings.source_image
    if image is not None:
        width, height = image.size[:]
        layout.label(
            text=f"{image.name}: {width}x{height}" if width else f"{image.name}: not readable",
            icon="IMAGE_DATA" if width else "ERROR",
        )


class _SourceBody(_Amodal3RPanel):
    bl_label = "Source"
    key = "source"

    def draw(self, context: bpy.types.Context) -> None:
        draw_source(self.layout, context)


# --- masks --------------------------------------------------------------------------------------


def draw_masks(layout: bpy.types.UILayout, context: bpy.types.Context) -> None:
    settings = settings_of(context)
    view = view_or_none(settings)
    if view is None or view.image is None:
        layout.label(text="Choose a source image first", icon="INFO")
        return
    if len(settings.views) > 1:
        layout.label(text=f"View {settings.active_view_index + 1}: {view.image.name}", icon="IMAGE_DATA")
    if view.target_mask is None or view.occluder_mask is None:
        layout.operator("amodal3r.create_masks", icon="ADD")
    for layer, attribute, title, hint in LAYER_ROWS:
        draw_layer(layout, view, layer, attribute, title, hint)
    draw_click_to_mask(layout, context, settings)
    row = layout.row(align=True)
    row.operator("amodal3r.fill_from_alpha", icon="IMAGE_ALPHA").layer = "TARGET"
    row.operator("amodal3r.preview_overlay", icon="OVERLAY")
    row = layout.row(align=True)
    row.operator("amodal3r.import_mask", icon="IMPORT")
    row.operator("amodal3r.export_mask", icon="EXPORT")


def draw_layer(
    layout: bpy.types.UILayout, view: AMODAL3R_PG_view, layer: str, attribute: str, title: str, hint: str
) -> None:
    box = layout.box()
    image = getattr(view, attribute)
    box.label(text=f"{title}: {image.name if image is not None else 'none yet'}", icon="IMAGE_ZDEPTH")
    if image is None:
        box.label(text=hint)
        return
    row = box.row(align=True)
    row.operator("amodal3r.paint_mask", text="Paint", icon="BRUSH_DATA").layer = layer
    row.operator("amodal3r.invert_mask", text="Invert", icon="ARROW_LEFTRIGHT").layer = layer
    row.operator("amodal3r.clear_mask", text="Clear", icon="X").layer = layer


def draw_click_to_mask(layout: bpy.types.UILayout, context: bpy.types.Context, settings: AMODAL3R_PG_settings) -> None:
    box = layout.box()
    box.label(text="Click to Mask", icon="RESTRICT_SELECT_OFF")
    box.row().prop(settings, "segment_layer", expand=True)
    box.prop(settings, "sam_model", text="Model")
    if context.area is not None and context.area.type == "IMAGE_EDITOR":
        row = box.row(align=True)
        row.operator("amodal3r.click_mask", text="Add", icon="ADD").subtract = False
        row.operator("amodal3r.click_mask", text="Subtract", icon="REMOVE").subtract = True
    else:
        box.label(text="Works in the Image Editor's Amodal3R tab", icon="INFO")


class _MasksBody(_Amodal3RPanel):
    bl_label = "Masks"
    key = "masks"

    def draw(self, context: bpy.types.Context) -> None:
        draw_masks(self.layout, context)


# --- views --------------------------------------------------------------------------------------


def draw_views(layout: bpy.types.UILayout, context: bpy.types.Context) -> None:
    settings = settings_of(context)
    row = layout.row()
    row.template_list("AMODAL3R_UL_views", "", settings, "views", settings, "active_view_index", rows=3)
    column = row.column(align=True)
    column.operator("amodal3r.add_view", text="", icon="ADD")
    column.operator("amodal3r.remove_view", text="", icon="REMOVE")
    view = view_or_none(settings)
    if view is not None and settings.active_view_index > 0:
        layout.prop(view, "image")
    if len(settings.views) > 1:
        layout.prop(settings, "multiview_mode")


class _ViewsBody(_Amodal3RPanel):
    bl_label = "Views"
    key = "views"
    bl_options: ClassVar[set[str]] = {"DEFAULT_CLOSED"}

    def draw(self, context: bpy.types.Context) -> None:
        draw_views(self.layout, context)


# --- settings -----------------------------------------------------------------------------------


def draw_settings(layout: bpy.types.UILayout, context: bpy.types.Context) -> None:
    settings = settings_of(context)
    layout.use_property_split = True
    layout.use_property_decorate = False
    column = layout.column()
    column.prop(settings, "seed")
    column.prop(settings, "variants")
    column = layout.column(heading="Shape", align=True)
    draw_optional(column, settings, "structure_steps", "Steps")
    draw_optional(column, settings, "structure_guidance", "Guidance")
    column = layout.column(heading="Details", align=True)
    draw_optional(column, settings, "slat_steps", "Steps")
    draw_optional(column, settings, "slat_guidance", "Guidance")
    column = layout.column()
    column.prop(settings, "texture_size")
    draw_optional(column, settings, "faces", "Simplify to")
    column.prop(settings, "gaussians")


def draw_optional(layout: bpy.types.UILayout, settings: AMODAL3R_PG_settings, name: str, text: str) -> None:
    """A value with its ``use_`` switch in front; greyed out while the model's own value applies."""
    row = layout.row(align=True, heading=text)
    row.prop(settings, f"use_{name}", text="")
    value = row.row(align=True)
    value.active = getattr(settings, f"use_{name}")
    value.prop(settings, name, text="")


class _SettingsBody(_Amodal3RPanel):
    bl_label = "Settings"
    key = "settings"
    bl_options: ClassVar[set[str]] = {"DEFAULT_CLOSED"}

    def draw(self, context: bpy.types.Context) -> None:
        draw_settings(self.layout, context)


# --- placement ------------------------------------------------------------------------------------


def draw_placement(layout: bpy.types.UILayout, context: bpy.types.Context) -> None:
    """The active object's fit to the photo: Match Photo, the pose shown, Real Size."""
    obj = context.active_object
    if obj is None or obj.type != "MESH":
        layout.label(text="Select a mesh to match it to the photo", icon="INFO")
        return
    layout.operator("amodal3r.match_photo", icon="CAMERA_DATA")
    placement = placement_of(obj)
    if placement is None:
        layout.label(text=f"{obj.name} is not matched yet", icon="INFO")
        return
    row = layout.row(align=True)
    row.operator("amodal3r.cycle_pose", text="", icon="TRIA_LEFT").step = -1
    row.label(text=pose_summary(obj))
    row.operator("amodal3r.cycle_pose", text="", icon="TRIA_RIGHT").step = 1
    layout.prop(placement, "real_size")
    if placement.camera is None:
        layout.label(text="Its camera is gone: Match Photo again", icon="ERROR")
    else:
        layout.label(text=f"Seen through {placement.camera.name}", icon="VIEW_CAMERA")


class _PlacementBody(_Amodal3RPanel):
    bl_label = "Match Photo"
    key = "placement"

    def draw(self, context: bpy.types.Context) -> None:
        draw_placement(self.layout, context)


BODIES = (_MainBody, _SourceBody, _MasksBody, _ViewsBody, _SettingsBody, _PlacementBody)


def panel_classes() -> list[type]:
    """Every body as a Panel of each editor's sidebar, sub-panels under that editor's main panel."""
    made = []
    for space, prefix in SPACES.items():
        main_id = f"{prefix}_PT_amodal3r"
        for body in BODIES:
            idname = f"{main_id}_{body.key}" if body.key else main_id
            attributes = {"bl_idname": idname, "bl_space_type": space}
            if body.key:
                attributes["bl_parent_id"] = main_id
            made.append(type(idname, (body, bpy.types.Panel), attributes))
    return made


classes = (AMODAL3R_UL_views, *panel_classes())
register, unregister = bpy.utils.register_classes_factory(classes)

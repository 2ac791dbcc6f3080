# SPDX-License-Identifier: GPL-3.0-or-later
"""Right-click > "Reconstruct occluded object" in the Image Editor, and the same in its Image menu.

The Image Editor's View mode has no context menu of its own, so an add-on keymap item in the
"Image" keymap opens ours on right-click. In Mask mode the mask menu would be hidden behind it,
so our menu then shows the mask menu's entries too.
"""

from __future__ import annotations

from typing import ClassVar

import bpy

from .panels import CATEGORY
from .properties import get_settings

_keymap_items: list[tuple[bpy.types.KeyMap, bpy.types.KeyMapItem]] = []


def show_sidebar_tab(area: bpy.types.Area) -> None:
    """Open the editor's sidebar on the Amodal3R tab."""
    area.spaces.active.show_region_ui = True
    for region in area.regions:
        if region.type == "UI":
            try:
                region.active_panel_category = CATEGORY
            except (AttributeError, TypeError):
                pass  # settable only once the sidebar has drawn its tabs; it then opens on the last tab
    area.tag_redraw()


class AMODAL3R_OT_use_displayed_image(bpy.types.Operator):
    """Use the image shown in this Image Editor as the source and open the Amodal3R sidebar"""

    bl_idname = "amodal3r.use_displayed_image"
    bl_label = "Reconstruct occluded object"
    bl_options: ClassVar[set[str]] = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        space = context.space_data
        return (
            space is not None
            and space.type == "IMAGE_EDITOR"
            and space.image is not None
            and hasattr(context.scene, "amodal3r")
        )

    def execute(self, context: bpy.types.Context) -> set[str]:
        settings = get_settings(context)
        settings.source_kind = "IMAGE"
        settings.source_image = context.space_data.image
        settings.active_view_index = 0
        if context.area is not None:
            show_sidebar_tab(context.area)
        return {"FINISHED"}


class IMAGE_MT_amodal3r_context(bpy.types.Menu):
    bl_idname = "IMAGE_MT_amodal3r_context"
    bl_label = "Amodal3R"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        space = context.space_data
        if space is not None and getattr(space, "show_maskedit", False):
            layout.menu_contents("IMAGE_MT_mask_context_menu")
            layout.separator()
        layout.operator(AMODAL3R_OT_use_displayed_image.bl_idname, icon="MESH_ICOSPHERE")


def draw_image_menu(menu: bpy.types.Menu, context: bpy.types.Context) -> None:
    menu.layout.separator()
    menu.layout.operator(AMODAL3R_OT_use_displayed_image.bl_idname, icon="MESH_ICOSPHERE")


classes = (AMODAL3R_OT_use_displayed_image, IMAGE_MT_amodal3r_context)
_register, _unregister = bpy.utils.register_classes_factory(classes)


def register() -> None:
    _register()
    bpy.types.IMAGE_MT_image.append(draw_image_menu)
    keyconfig = bpy.context.window_manager.keyconfigs.addon
    if keyconfig is None:  # no window manager keymaps (e.g. some command-line runs)
        return
    keymap = keyconfig.keymaps.new(name="Image", space_type="IMAGE_EDITOR")
    item = keymap.keymap_items.new("wm.call_menu", "RIGHTMOUSE", "PRESS")
    item.properties.name = IMAGE_MT_amodal3r_context.bl_idname
    _keymap_items.append((keymap, item))


def unregister() -> None:
    for keymap, item in _keymap_items:
        keymap.keymap_items.remove(item)
    _keymap_items.clear()
    bpy.types.IMAGE_MT_image.remove(draw_image_menu)
    _unregister()

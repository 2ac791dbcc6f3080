# SPDX-License-Identifier: GPL-3.0-or-later
"""The sidebar panels and the Image Editor menu, in the bpy module. Blender never draws here, so
each draw() runs on a recording stand-in layout that checks every call against the real UILayout
API and every property and operator it names."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from addon_helpers import addon_of, module, override, photo

from amodal3r.api.protocol import RANDOM_WEIGHTS_NOTICE_START

# --- a recording layout ---------------------------------------------------------------------------


def _function(name: str):
    import bpy

    functions = bpy.types.UILayout.bl_rna.functions
    assert name in functions, f"UILayout has no {name}()"
    return functions[name]


def _check_icon(icon: str) -> None:
    icons = _function("label").parameters["icon"].enum_items.keys()
    assert icon in icons, f"unknown icon {icon!r}"


def _check_property(data, name: str) -> None:
    assert data is not None, f"no data for property {name!r}"
    assert name in data.bl_rna.properties, f"{data.bl_rna.identifier} has no property {name!r}"


def _operator_rna(idname: str):
    import bpy

    module, _, name = idname.partition(".")
    try:
        return getattr(getattr(bpy.ops, module), name).get_rna_type()
    except (AttributeError, KeyError):
        raise AssertionError(f"no operator {idname}") from None


class OperatorProperties:
    """What layout.operator() returns: assignments must name the operator's properties."""

    def __init__(self, idname: str, record: list):
        object.__setattr__(self, "_rna", _operator_rna(idname))
        object.__setattr__(self, "_record", record)
        object.__setattr__(self, "_idname", idname)

    def __setattr__(self, name, value):
        assert name in self._rna.properties, f"{self._idname} has no property {name!r}"
        self._record.append(("set", self._idname, name, value))


class Layout:
    """Stands in for UILayout: checks arguments, records calls, nests for row/column/box/split."""

    PAIRS = (("data", "property"), ("dataptr", "propname"), ("active_dataptr", "active_propname"))
    NESTING = ("row", "column", "box", "split", "column_flow", "grid_flow")

    def __init__(self, record: list | None = None):
        object.__setattr__(self, "record", record if record is not None else [])

    def __setattr__(self, name, value):
        import bpy

        assert name in bpy.types.UILayout.bl_rna.properties, f"UILayout has no attribute {name!r}"
        self.record.append(("attr", name, value))

    def __getattr__(self, name):
        function = _function(name)

        def call(*args, **kwargs):
            parameters = list(function.parameters.keys())
            assert len(args) <= len(parameters), f"{name}() got too many arguments"
            bound = dict(zip(parameters, args, strict=False))  # the arguments not given keep their defaults
            for key in kwargs:
                assert key in parameters, f"{name}() has no argument {key!r}"
            bound.update(kwargs)
            for data_key, prop_key in self.PAIRS:
                if prop_key in bound:
                    _check_property(bound[data_key], bound[prop_key])
            if bound.get("icon"):
                _check_icon(bound["icon"])
            for key in ("text", "heading"):
                assert isinstance(bound.get(key, ""), str), f"{name}({key}=...) must be a string"
            self.record.append((name, bound))
            return self._result(name, bound)

        return call

    def _result(self, name: str, bound: dict):
        import bpy

        if name in self.NESTING:
            return Layout(self.record)
        if name == "panel":
            return Layout(self.record), Layout(self.record)
        if name == "operator":
            return OperatorProperties(bound["operator"], self.record)
        if name == "template_list":
            assert hasattr(bpy.types, bound["listtype_name"]), f"no UIList {bound['listtype_name']}"
        if name == "menu_contents":
            assert hasattr(bpy.types, bound["menu"]), f"no menu {bound['menu']}"
        return None

    def calls(self, name: str) -> list[dict]:
        return [bound for call, bound in ((c[0], c[1]) for c in self.record) if call == name]

    def texts(self) -> str:
        return "\n".join(str(c[1].get("text", "")) for c in self.record if c[0] in {"label", "progress", "operator"})


# --- panels ---------------------------------------------------------------------------------------


def _panels(addon: str) -> list[type]:
    import bpy

    panels = [cls for cls in module(addon, "ui.panels").classes if issubclass(cls, bpy.types.Panel)]
    assert {cls.bl_space_type for cls in panels} == {"VIEW_3D", "IMAGE_EDITOR"}
    return panels


def _draw_all(addon: str) -> dict[tuple[str, str], Layout]:
    """Every panel drawn in its own editor: {(space, bl_label): layout}."""
    import bpy

    drawn = {}
    for panel in _panels(addon):
        with override(panel.bl_space_type):
            assert panel.poll(bpy.context)
            layout = Layout()
            panel.draw(SimpleNamespace(layout=layout), bpy.context)
            drawn[(panel.bl_space_type, panel.bl_label)] = layout
    return drawn


def test_panels_exist_in_both_sidebars(clean_scene):
    import bpy

    panels = _panels(clean_scene)
    assert len(panels) == 12  # six bodies, in each of the two sidebars
    for panel in panels:
        assert panel.bl_region_type == "UI" and panel.bl_category == "Amodal3R"
        assert getattr(bpy.types, panel.bl_idname) is not None
    mains = [p for p in panels if not getattr(p, "bl_parent_id", "")]
    assert sorted(p.bl_label for p in mains) == ["Reconstruct occluded object"] * 2
    for panel in panels:
        if getattr(panel, "bl_parent_id", ""):
            parent = getattr(bpy.types, panel.bl_parent_id)
            assert parent.bl_space_type == panel.bl_space_type


def test_draw_without_a_source(settings):
    drawn = _draw_all(addon_of(settings))
    for space in ("VIEW_3D", "IMAGE_EDITOR"):
        main = drawn[(space, "Reconstruct occluded object")]
        assert [c["operator"] for c in main.calls("operator")] == ["amodal3r.reconstruct"]
        assert "Choose a source image" in main.texts()
        assert "Choose a source image first" in drawn[(space, "Masks")].texts()
        assert not main.calls("progress")


def test_draw_with_masks_views_and_an_error(with_masks, settings):
    import bpy

    assert bpy.ops.amodal3r.add_view() == {"FINISHED"}
    settings.active_view_index = 0
    settings.last_error = "The reconstruction server stopped while working (exit code -9).\nIts last output: ..."
    settings.server_dead = True
    for kind in ("IMAGE", "FILE", "CAMERA"):
        settings.source_kind = kind
        drawn = _draw_all(addon_of(settings))
    main = drawn[("IMAGE_EDITOR", "Reconstruct occluded object")]
    assert "restart_server" in str(main.calls("operator"))
    assert "stopped while working" in main.texts() and "Its last output" in main.texts()
    masks_ui = drawn[("IMAGE_EDITOR", "Masks")]
    operators = [c["operator"] for c in masks_ui.calls("operator")]
    assert "amodal3r.click_mask" in operators and "amodal3r.paint_mask" in operators
    assert "amodal3r.create_masks" not in operators
    assert "amodal3r.click_mask" not in [c["operator"] for c in drawn[("VIEW_3D", "Masks")].calls("operator")]
    assert drawn[("VIEW_3D", "Views")].calls("template_list")
    settings.source_kind = "IMAGE"
    settings.active_view_index = 1
    _draw_all(addon_of(settings))


def test_draw_while_running(with_masks, settings):
    settings.running = True
    settings.progress = 0.4
    settings.message = "Sampling the shape 3/12"
    drawn = _draw_all(addon_of(settings))
    main = drawn[("VIEW_3D", "Reconstruct occluded object")]
    (progress,) = main.calls("progress")
    assert progress["factor"] == pytest.approx(0.4) and progress["text"] == "Sampling the shape 3/12"
    assert [c["operator"] for c in main.calls("operator")] == ["amodal3r.cancel"]


def test_notices_stand_beside_the_result(with_masks, settings):
    settings.message = "Imported mug"
    settings.notices = "view0_image.png: downscaled from 6000x4000 to 4096x2731"
    main = _draw_all(addon_of(settings))[("VIEW_3D", "Reconstruct occluded object")]
    assert "Imported mug\nview0_image.png: downscaled" in main.texts()
    assert "amodal3r.download_models" not in [c["operator"] for c in main.calls("operator")]
    settings.notices += f"\n{RANDOM_WEIGHTS_NOTICE_START} (made by amodal3r tiny-weights): the result is noise"
    for space in ("VIEW_3D", "IMAGE_EDITOR"):
        main = _draw_all(addon_of(settings))[(space, "Reconstruct occluded object")]
        assert main.texts().count("RANDOM weights") == 1
        assert [c["operator"] for c in main.calls("operator")] == ["amodal3r.reconstruct", "amodal3r.download_models"]
    settings.running = True
    main = _draw_all(addon_of(settings))[("VIEW_3D", "Reconstruct occluded object")]
    assert "RANDOM" not in main.texts()  # a new job is running: the last result's notices are gone


def test_operator_polls(with_masks, settings):
    import bpy

    addon = addon_of(settings)
    assert bpy.ops.amodal3r.reconstruct.poll()
    assert not bpy.ops.amodal3r.cancel.poll()
    assert not bpy.ops.amodal3r.click_mask.poll()  # needs an Image Editor
    with override("IMAGE_EDITOR"):
        bpy.context.space_data.image = with_masks.photo
        assert bpy.ops.amodal3r.click_mask.poll()
        assert bpy.ops.amodal3r.use_displayed_image.poll()
    ui_list = module(addon, "ui.panels").AMODAL3R_UL_views
    layout = Layout()
    ui_list.draw_item(None, bpy.context, layout, settings, settings.views[0], 0, settings, "active_view_index", 0)
    assert "photo.png (main)" in layout.texts()


# --- the Image Editor menu and keymap ---------------------------------------------------------------


def _our_keymap_items():
    import bpy

    keymap = bpy.context.window_manager.keyconfigs.addon.keymaps.get("Image")
    if keymap is None:
        return []
    return [
        item
        for item in keymap.keymap_items
        if item.idname == "wm.call_menu" and item.properties.name == "IMAGE_MT_amodal3r_context"
    ]


def test_right_click_menu_and_image_menu(with_masks, settings):
    import bpy

    (item,) = _our_keymap_items()
    assert item.type == "RIGHTMOUSE" and item.value == "PRESS"
    menus = module(addon_of(settings), "ui.menus")
    assert menus.draw_image_menu in bpy.types.IMAGE_MT_image._dyn_ui_initialize()
    with override("IMAGE_EDITOR"):
        space = bpy.context.space_data
        for mode in ("VIEW", "MASK"):
            space.ui_mode = mode
            layout = Layout()
            bpy.types.IMAGE_MT_amodal3r_context.draw(SimpleNamespace(layout=layout), bpy.context)
            assert [c["operator"] for c in layout.calls("operator")] == ["amodal3r.use_displayed_image"]
            assert bool(layout.calls("menu_contents")) == (mode == "MASK")
        other = photo("other.png")
        space.image = other
        space.show_region_ui = False
        assert bpy.ops.amodal3r.use_displayed_image() == {"FINISHED"}
        assert space.show_region_ui
    assert settings.source_image == other and settings.views[0].image == other


def test_menu_and_keymap_are_removed_on_disable(clean_scene):
    import bpy

    menus = module(clean_scene, "ui.menus")
    draw = menus.draw_image_menu
    bpy.ops.preferences.addon_disable(module=clean_scene)
    try:
        assert not _our_keymap_items()
        assert draw not in bpy.types.IMAGE_MT_image._dyn_ui_initialize()
        assert not hasattr(bpy.types, "IMAGE_MT_amodal3r_context")
        assert not hasattr(bpy.types, "VIEW3D_PT_amodal3r")
        assert not hasattr(bpy.types.Scene, "amodal3r")
    finally:
        bpy.ops.preferences.addon_enable(module=clean_scene)
    assert len(_our_keymap_items()) == 1

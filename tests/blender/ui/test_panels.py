# SPDX-License-Identifier: GPL-3.0-or-later
"""The sidebar panels, the mask operators, click-to-mask's pieces and the Image Editor menu, in the
bpy module. Blender never draws here, so each draw() runs on a recording stand-in layout that
checks every call against the real UILayout API and every property and operator it names."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import numpy as np
import pytest

from amodal3r_blender import masks, png

W, H = 8, 6


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
            bound = dict(zip(parameters, args))
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


# --- fixtures -----------------------------------------------------------------------------------


def _module(addon: str, name: str):
    return importlib.import_module(f"{addon}.{name}")


def _area(kind: str):
    """An area of the given type in the window (an existing one is retyped)."""
    import bpy

    window = bpy.context.window_manager.windows[0]
    areas = window.screen.areas
    found = next((a for a in areas if a.type == kind), None)
    if found is None:
        found = next(a for a in areas if a.type not in {"VIEW_3D", "IMAGE_EDITOR"})
        found.type = kind
    return window, found


def _override(kind: str):
    import bpy

    window, area = _area(kind)
    region = next(r for r in area.regions if r.type == "UI")
    return bpy.context.temp_override(window=window, area=area, region=region, space_data=area.spaces.active)


def _photo(name: str = "photo.png", width: int = W, height: int = H):
    """An RGBA photo whose left half is transparent (a cut-out) and a gradient elsewhere."""
    import bpy

    image = bpy.data.images.new(name, width, height, alpha=True)
    pixels = np.zeros((height, width, 4), np.float32)
    pixels[:, :, 0] = np.linspace(0, 1, width)[None, :]
    pixels[:, :, 1] = np.linspace(0, 1, height)[:, None]
    pixels[:, width // 2:, 3] = 1.0
    image.pixels.foreach_set(pixels.reshape(-1))
    return image


def _pixels(image) -> np.ndarray:
    buffer = np.empty(image.size[0] * image.size[1] * 4, np.float32)
    image.pixels.foreach_get(buffer)
    return buffer


def _layer(image) -> np.ndarray:
    return masks.layer_from_pixels(_pixels(image), *image.size[:])


def _paint(image, layer: np.ndarray) -> None:
    image.pixels.foreach_set(masks.pixels_from_layer(layer))


@pytest.fixture
def settings(clean_scene):
    import bpy

    return bpy.context.scene.amodal3r


@pytest.fixture
def with_masks(settings):
    """A source photo with both mask images, the target painted in."""
    import bpy

    photo = _photo()
    settings.source_image = photo
    assert bpy.ops.amodal3r.create_masks() == {"FINISHED"}
    view = settings.views[0]
    target = np.zeros((H, W), bool)
    target[1:4, 4:7] = True
    _paint(view.target_mask, target)
    return SimpleNamespace(photo=photo, view=view, target=target, before=_pixels(photo))


# --- panels ---------------------------------------------------------------------------------------


def _panels(addon: str) -> list[type]:
    import bpy

    panels = [cls for cls in _module(addon, "panels").classes if issubclass(cls, bpy.types.Panel)]
    assert {cls.bl_space_type for cls in panels} == {"VIEW_3D", "IMAGE_EDITOR"}
    return panels


def _draw_all(addon: str) -> dict[tuple[str, str], Layout]:
    """Every panel drawn in its own editor: {(space, bl_label): layout}."""
    import bpy

    drawn = {}
    for panel in _panels(addon):
        with _override(panel.bl_space_type):
            assert panel.poll(bpy.context)
            layout = Layout()
            panel.draw(SimpleNamespace(layout=layout), bpy.context)
            drawn[(panel.bl_space_type, panel.bl_label)] = layout
    return drawn


def test_panels_exist_in_both_sidebars(clean_scene):
    import bpy

    panels = _panels(clean_scene)
    assert len(panels) == 10
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
    drawn = _draw_all(_addon_of(settings))
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
        drawn = _draw_all(_addon_of(settings))
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
    _draw_all(_addon_of(settings))


def test_draw_while_running(with_masks, settings):
    settings.running = True
    settings.progress = 0.4
    settings.message = "Sampling the shape 3/12"
    drawn = _draw_all(_addon_of(settings))
    main = drawn[("VIEW_3D", "Reconstruct occluded object")]
    (progress,) = main.calls("progress")
    assert progress["factor"] == pytest.approx(0.4) and progress["text"] == "Sampling the shape 3/12"
    assert [c["operator"] for c in main.calls("operator")] == ["amodal3r.cancel"]


def _addon_of(settings) -> str:
    return settings.__class__.__module__.rsplit(".", 1)[0]


def test_operator_polls(with_masks, settings):
    import bpy

    addon = _addon_of(settings)
    assert bpy.ops.amodal3r.reconstruct.poll()
    assert not bpy.ops.amodal3r.cancel.poll()
    assert not bpy.ops.amodal3r.click_mask.poll()  # needs an Image Editor
    with _override("IMAGE_EDITOR"):
        bpy.context.space_data.image = with_masks.photo
        assert bpy.ops.amodal3r.click_mask.poll()
        assert bpy.ops.amodal3r.use_displayed_image.poll()
    ui_list = _module(addon, "panels").AMODAL3R_UL_views
    layout = Layout()
    ui_list.draw_item(None, bpy.context, layout, settings, settings.views[0], 0, settings, "active_view_index", 0)
    assert "photo.png (main)" in layout.texts()


# --- mask operators -------------------------------------------------------------------------------


def test_create_masks_matches_the_source(with_masks):
    import bpy

    view = with_masks.view
    for image, suffix in ((view.target_mask, "target"), (view.occluder_mask, "occluder")):
        assert image.name == f"photo.png {suffix}"
        assert tuple(image.size) == (W, H)
        assert image.colorspace_settings.name == "Non-Color"
    assert not _layer(view.occluder_mask).any()
    assert bpy.ops.amodal3r.create_masks() == {"FINISHED"}  # a second time keeps the painted masks
    assert np.array_equal(_layer(view.target_mask), with_masks.target)


def test_mask_operators_need_a_source(settings):
    import bpy

    with pytest.raises(RuntimeError, match="No image to work on"):
        bpy.ops.amodal3r.create_masks()
    settings.source_image = _photo()
    with pytest.raises(RuntimeError, match="no target mask yet: click Create Masks"):
        bpy.ops.amodal3r.invert_mask(layer="TARGET")


def test_invert_clear_and_fill_from_alpha(with_masks):
    import bpy

    view = with_masks.view
    assert bpy.ops.amodal3r.invert_mask(layer="TARGET") == {"FINISHED"}
    assert np.array_equal(_layer(view.target_mask), ~with_masks.target)
    assert bpy.ops.amodal3r.clear_mask(layer="TARGET") == {"FINISHED"}
    assert not _layer(view.target_mask).any()
    assert bpy.ops.amodal3r.fill_from_alpha(layer="TARGET") == {"FINISHED"}
    expected = np.zeros((H, W), bool)
    expected[:, W // 2:] = True
    assert np.array_equal(_layer(view.target_mask), expected)
    assert np.array_equal(_pixels(with_masks.photo), with_masks.before)


def test_fill_from_alpha_of_an_opaque_image_says_why_not(with_masks):
    import bpy

    with_masks.photo.pixels.foreach_set(np.ones(W * H * 4, np.float32))
    with pytest.raises(RuntimeError, match="no transparent pixels"):
        bpy.ops.amodal3r.fill_from_alpha(layer="TARGET")


def test_mask_of_another_size_is_reported(with_masks):
    import bpy

    with_masks.view.occluder_mask.scale(4, 4)
    with pytest.raises(RuntimeError, match="is 4x4 but 'photo.png' is 8x6"):
        bpy.ops.amodal3r.invert_mask(layer="OCCLUDER")
    assert bpy.ops.amodal3r.create_masks() == {"FINISHED"}  # remakes the wrongly sized one
    assert tuple(with_masks.view.occluder_mask.size) == (W, H)


def test_export_import_grey_round_trip(with_masks, tmp_path):
    import bpy

    view = with_masks.view
    occluder = np.zeros((H, W), bool)
    occluder[0:2, 5:8] = True
    _paint(view.occluder_mask, occluder)
    path = tmp_path / "mask.png"
    assert bpy.ops.amodal3r.export_mask(filepath=str(path)) == {"FINISHED"}
    grey = png.decode_png(path.read_bytes())[:, :, 0]
    assert grey.shape == (H, W) and set(np.unique(grey).tolist()) == {0, 188, 255}
    expected = masks.flip_rows(masks.grey_from_layers(with_masks.target, occluder))
    assert np.array_equal(grey, expected)
    assert grey[H - 1, 5] == 0  # Blender's bottom row is the file's last
    bpy.ops.amodal3r.clear_mask(layer="TARGET")
    bpy.ops.amodal3r.clear_mask(layer="OCCLUDER")
    assert bpy.ops.amodal3r.import_mask(filepath=str(path)) == {"FINISHED"}
    assert np.array_equal(_layer(view.target_mask), with_masks.target & ~occluder)
    assert np.array_equal(_layer(view.occluder_mask), occluder)


def test_exported_mask_reads_back_in_blender(with_masks, tmp_path):
    """Blender's own PNG reader agrees with the file we write (values and orientation)."""
    import bpy

    path = tmp_path / "mask.png"
    bpy.ops.amodal3r.export_mask(filepath=str(path))
    loaded = bpy.data.images.load(str(path))
    loaded.colorspace_settings.is_data = True
    values = np.round(_pixels(loaded).reshape(H, W, 4)[:, :, 0] * 255).astype(np.uint8)
    assert np.array_equal(values, masks.grey_from_layers(with_masks.target, np.zeros((H, W), bool)))


def test_blender_written_png_decodes(with_masks, tmp_path):
    """A PNG saved by Blender (libpng, adaptive row filters) decodes to the same pixels."""
    path = tmp_path / "saved.png"
    image = with_masks.photo
    image.filepath_raw = str(path)
    image.file_format = "PNG"
    image.save()
    decoded = png.decode_png(path.read_bytes())
    expected = np.round(np.clip(_pixels(image).reshape(H, W, 4)[::-1], 0, 1) * 255)
    assert decoded.shape == (H, W, 4)
    assert np.abs(decoded.astype(int) - expected).max() <= 1


def test_import_errors_are_plain(with_masks, tmp_path):
    import bpy

    wrong_size = tmp_path / "small.png"
    wrong_size.write_bytes(png.encode_png(np.full((3, 3), 188, np.uint8)))
    with pytest.raises(RuntimeError, match="3x3 but the image is 8x6"):
        bpy.ops.amodal3r.import_mask(filepath=str(wrong_size))
    not_png = tmp_path / "mask.jpg"
    not_png.write_bytes(b"\xff\xd8\xff\xe0 not a png")
    with pytest.raises(RuntimeError, match="not a PNG"):
        bpy.ops.amodal3r.import_mask(filepath=str(not_png))
    with pytest.raises(RuntimeError, match="Cannot read"):
        bpy.ops.amodal3r.import_mask(filepath=str(tmp_path / "missing.png"))


def test_overlay_is_a_separate_image(with_masks):
    import bpy

    with _override("IMAGE_EDITOR"):
        assert bpy.ops.amodal3r.preview_overlay() == {"FINISHED"}
        overlay = bpy.data.images["photo.png overlay"]
        assert bpy.context.space_data.image == overlay
    pixels = _pixels(overlay).reshape(H, W, 4)
    source = with_masks.before.reshape(H, W, 4)
    assert pixels[2, 5, 1] > source[2, 5, 1]  # target: greener
    assert np.allclose(pixels[0, 0, :3], source[0, 0, :3])  # outside both layers: unchanged
    assert np.array_equal(_pixels(with_masks.photo), with_masks.before)


def test_paint_mask_sets_up_the_image_editor(with_masks):
    import bpy

    with _override("IMAGE_EDITOR"):
        assert bpy.ops.amodal3r.paint_mask(layer="OCCLUDER") == {"FINISHED"}
        space = bpy.context.space_data
        assert space.image == with_masks.view.occluder_mask
        assert space.ui_mode == "PAINT"
    paint = bpy.context.scene.tool_settings.image_paint
    assert paint.canvas == with_masks.view.occluder_mask
    assert tuple(paint.unified_paint_settings.color) == (1.0, 1.0, 1.0)
    assert tuple(paint.unified_paint_settings.secondary_color) == (0.0, 0.0, 0.0)


def test_paint_mask_from_the_3d_view_opens_an_image_editor(with_masks):
    import bpy

    window, area = _area("VIEW_3D")
    for other in window.screen.areas:
        if other.type == "IMAGE_EDITOR":
            other.type = "OUTLINER"
    region = next(r for r in area.regions if r.type == "WINDOW")
    with bpy.context.temp_override(window=window, area=area, region=region):
        assert bpy.ops.amodal3r.paint_mask(layer="TARGET") == {"FINISHED"}
    editors = [a for a in window.screen.areas if a.type == "IMAGE_EDITOR"]
    assert len(editors) == 1 and editors[0].spaces.active.image == with_masks.view.target_mask


def test_render_camera_source_restores_the_output_settings(settings):
    import bpy

    scene = bpy.context.scene
    camera = bpy.data.objects.new("Cam", bpy.data.cameras.new("Cam"))
    scene.collection.objects.link(camera)
    camera.location = (0, -4, 0)
    camera.rotation_euler = (1.5708, 0, 0)
    with pytest.raises(RuntimeError, match="no active camera"):
        bpy.ops.amodal3r.render_camera_source()
    scene.camera = camera
    scene.render.engine = "CYCLES"
    scene.cycles.samples = 1
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 32, 24, 100
    scene.render.image_settings.file_format = "JPEG"
    scene.render.image_settings.color_mode = "RGB"
    assert bpy.ops.amodal3r.render_camera_source() == {"FINISHED"}
    assert scene.render.image_settings.file_format == "JPEG"
    assert scene.render.image_settings.color_mode == "RGB"
    image = settings.source_image
    assert image.name == "Cam render" and tuple(image.size) == (32, 24)
    assert image.packed_file is not None and settings.source_kind == "CAMERA"
    assert settings.views[0].image == image


def test_add_and_remove_views(with_masks, settings):
    import bpy

    assert bpy.ops.amodal3r.add_view() == {"FINISHED"}
    assert len(settings.views) == 2 and settings.active_view_index == 1
    with pytest.raises(RuntimeError, match="No image to work on"):
        bpy.ops.amodal3r.create_masks()
    settings.views[1].image = _photo("side.png")
    assert bpy.ops.amodal3r.create_masks() == {"FINISHED"}
    assert settings.views[1].target_mask.name == "side.png target"
    settings.active_view_index = 0
    with pytest.raises(RuntimeError, match="cannot be removed"):
        bpy.ops.amodal3r.remove_view()
    settings.active_view_index = 1
    assert bpy.ops.amodal3r.remove_view() == {"FINISHED"}
    assert len(settings.views) == 1 and settings.active_view_index == 0


def test_source_file_loads_into_an_image(settings, tmp_path):
    path = tmp_path / "shot.png"
    path.write_bytes(png.encode_png(np.full((5, 7, 3), 90, np.uint8)))
    settings.source_kind = "FILE"
    settings.source_filepath = str(path)
    assert settings.source_image is not None and tuple(settings.source_image.size) == (7, 5)
    assert settings.views[0].image == settings.source_image
    settings.source_filepath = str(tmp_path / "missing.png")
    assert "Cannot open" in settings.last_error


# --- click-to-mask pieces ---------------------------------------------------------------------------


class FakeClient:
    """Answers segment requests with a fixed mask; forgets images on request (a restarted server)."""

    def __init__(self, mask_png: bytes):
        self.mask_png = mask_png
        self.calls: list[tuple[object, bool]] = []
        self.forget = False

    def segment(self, params, image=None):
        from amodal3r.api.client import ServerError
        from amodal3r.api.protocol import SegmentReply

        self.calls.append((params, image is not None))
        if image is None and self.forget:
            raise ServerError(404, "no image: upload it again")
        return self.mask_png, SegmentReply("", 0.9, "ab" * 8, image is None, 0.01)


def test_view_to_pixel(clean_scene):
    segment = _module(clean_scene, "ops_segment")
    assert segment.view_to_pixel(0.0, 1.0, 100, 50) == (0.0, 0.0)  # top left
    assert segment.view_to_pixel(0.5, 0.25, 100, 50) == (50.0, 37.5)
    assert segment.view_to_pixel(1.0, 0.0, 100, 50) == (99.5, 49.5)
    assert segment.view_to_pixel(1.2, 0.5, 100, 50) is None
    assert segment.view_to_pixel(0.5, -0.1, 100, 50) is None


def test_segment_session_adds_subtracts_and_resets(with_masks, settings):
    segment = _module(_addon_of(settings), "ops_segment")
    ops_masks = _module(_addon_of(settings), "ops_masks")
    sam = np.zeros((H, W), bool)
    sam[4:6, 0:3] = True
    client = FakeClient(masks.encode_layer(sam))
    backend = SimpleNamespace(client=lambda: client)
    session = segment.SegmentSession(_layer(with_masks.view.target_mask), "vit_b")
    session.add_click(1.0, 1.0, positive=True)
    session.add_click(6.0, 2.0, positive=False)
    params = session.params()
    assert params.points == [[1.0, 1.0], [6.0, 2.0]] and params.labels == [1, 0] and params.model == "vit_b"
    request = segment.SegmentRequest(backend, params, b"png", session.revision).start()
    assert request.wait(10) and not request.error
    ops_masks.write_layer(with_masks.view.target_mask, session.apply(*request.result))
    assert np.array_equal(_layer(with_masks.view.target_mask), with_masks.target | sam)
    assert session.image_id == "ab" * 8 and client.calls[0][1]  # the first request sent the image
    client.forget = True  # the server restarted: it gets the image again
    request = segment.SegmentRequest(backend, session.params(), b"png", session.revision).start()
    assert request.wait(10) and not request.error
    assert [sent for _, sent in client.calls[1:]] == [False, True]
    subtract = segment.SegmentSession(with_masks.target, "vit_b", subtract=True)
    cut = np.zeros((H, W), bool)
    cut[1, 4] = True
    assert np.array_equal(subtract.apply(masks.encode_layer(cut), request.result[1]), with_masks.target & ~cut)
    assert np.array_equal(session.reset(), with_masks.target)


def test_segment_errors_are_plain(clean_scene):
    segment = _module(clean_scene, "ops_segment")
    from amodal3r.api.client import ServerError, ServerUnavailable

    def failing():
        raise ServerUnavailable("no reconstruction server answers at http://127.0.0.1:9")

    session = segment.SegmentSession(np.zeros((H, W), bool), "vit_h")
    session.add_click(1, 1, positive=True)
    request = segment.SegmentRequest(SimpleNamespace(client=failing), session.params(), b"png", 1).start()
    assert request.wait(10) and "could not reach the server" in request.error
    assert "checkpoint missing" in segment.segment_error_text(ServerError(422, "checkpoint missing"))
    wrong = segment.SegmentSession(np.zeros((3, 3), bool), "vit_h")
    with pytest.raises(_module(clean_scene, "masks").MaskError, match="returned mask"):
        wrong.apply(masks.encode_layer(np.zeros((H, W), bool)), SimpleNamespace(image_id="ab" * 8))


def test_click_mask_without_clicks_reports(with_masks):
    import bpy

    with _override("IMAGE_EDITOR"), pytest.raises(RuntimeError, match="needs mouse clicks"):
        bpy.ops.amodal3r.click_mask()  # the module has no events: invoke() never runs


# --- the Image Editor menu and keymap ---------------------------------------------------------------


def _our_keymap_items():
    import bpy

    keymap = bpy.context.window_manager.keyconfigs.addon.keymaps.get("Image")
    if keymap is None:
        return []
    return [item for item in keymap.keymap_items
            if item.idname == "wm.call_menu" and item.properties.name == "IMAGE_MT_amodal3r_context"]


def test_right_click_menu_and_image_menu(with_masks, settings):
    import bpy

    (item,) = _our_keymap_items()
    assert item.type == "RIGHTMOUSE" and item.value == "PRESS"
    menus = _module(_addon_of(settings), "menus")
    assert menus.draw_image_menu in bpy.types.IMAGE_MT_image._dyn_ui_initialize()
    with _override("IMAGE_EDITOR"):
        space = bpy.context.space_data
        for mode in ("VIEW", "MASK"):
            space.ui_mode = mode
            layout = Layout()
            bpy.types.IMAGE_MT_amodal3r_context.draw(SimpleNamespace(layout=layout), bpy.context)
            assert [c["operator"] for c in layout.calls("operator")] == ["amodal3r.use_displayed_image"]
            assert bool(layout.calls("menu_contents")) == (mode == "MASK")
        other = _photo("other.png")
        space.image = other
        space.show_region_ui = False
        assert bpy.ops.amodal3r.use_displayed_image() == {"FINISHED"}
        assert space.show_region_ui
    assert settings.source_image == other and settings.views[0].image == other


def test_menu_and_keymap_are_removed_on_disable(clean_scene):
    import bpy

    menus = _module(clean_scene, "menus")
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

# SPDX-License-Identifier: GPL-3.0-or-later
"""The mask, source and view operators in the bpy module: Blender images as mask layers, the grey
file format in and out, painting, the camera render, extra views."""

from __future__ import annotations

import numpy as np
import pytest
from addon_helpers import H, W, addon_of, area, layer, module, override, paint, photo, pixels

from amodal3r.api.masks import masks_to_grey
from amodal3r_blender.core import masks, png

# --- mask operators -------------------------------------------------------------------------------


def test_create_masks_matches_the_source(with_masks):
    import bpy

    view = with_masks.view
    for image, suffix in ((view.target_mask, "target"), (view.occluder_mask, "occluder")):
        assert image.name == f"photo.png {suffix}"
        assert tuple(image.size) == (W, H)
        assert image.colorspace_settings.name == "Non-Color"
    assert not layer(view.occluder_mask).any()
    assert bpy.ops.amodal3r.create_masks() == {"FINISHED"}  # a second time keeps the painted masks
    assert np.array_equal(layer(view.target_mask), with_masks.target)


def test_mask_operators_need_a_source(settings):
    import bpy

    with pytest.raises(RuntimeError, match="No image to work on"):
        bpy.ops.amodal3r.create_masks()
    settings.source_image = photo()
    with pytest.raises(RuntimeError, match="no target mask yet: click Create Masks"):
        bpy.ops.amodal3r.invert_mask(layer="TARGET")


def test_invert_clear_and_fill_from_alpha(with_masks):
    import bpy

    view = with_masks.view
    assert bpy.ops.amodal3r.invert_mask(layer="TARGET") == {"FINISHED"}
    assert np.array_equal(layer(view.target_mask), ~with_masks.target)
    assert bpy.ops.amodal3r.clear_mask(layer="TARGET") == {"FINISHED"}
    assert not layer(view.target_mask).any()
    assert bpy.ops.amodal3r.fill_from_alpha(layer="TARGET") == {"FINISHED"}
    expected = np.zeros((H, W), bool)
    expected[:, W // 2 :] = True
    assert np.array_equal(layer(view.target_mask), expected)
    assert np.array_equal(pixels(with_masks.photo), with_masks.before)


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
    paint(view.occluder_mask, occluder)
    path = tmp_path / "mask.png"
    assert bpy.ops.amodal3r.export_mask(filepath=str(path)) == {"FINISHED"}
    grey = png.decode_png(path.read_bytes())[:, :, 0]
    assert grey.shape == (H, W) and set(np.unique(grey).tolist()) == {0, 188, 255}
    expected = masks.flip_rows(masks_to_grey(with_masks.target, occluder))
    assert np.array_equal(grey, expected)
    assert grey[H - 1, 5] == 0  # Blender's bottom row is the file's last
    bpy.ops.amodal3r.clear_mask(layer="TARGET")
    bpy.ops.amodal3r.clear_mask(layer="OCCLUDER")
    assert bpy.ops.amodal3r.import_mask(filepath=str(path)) == {"FINISHED"}
    assert np.array_equal(layer(view.target_mask), with_masks.target & ~occluder)
    assert np.array_equal(layer(view.occluder_mask), occluder)


def test_exported_mask_reads_back_in_blender(with_masks, tmp_path):
    """Blender's own PNG reader agrees with the file we write (values and orientation)."""
    import bpy

    path = tmp_path / "mask.png"
    bpy.ops.amodal3r.export_mask(filepath=str(path))
    loaded = bpy.data.images.load(str(path))
    loaded.colorspace_settings.is_data = True
    values = np.round(pixels(loaded).reshape(H, W, 4)[:, :, 0] * 255).astype(np.uint8)
    assert np.array_equal(values, masks_to_grey(with_masks.target, np.zeros((H, W), bool)))


def test_blender_written_png_decodes(with_masks, tmp_path):
    """A PNG saved by Blender (libpng, adaptive row filters) decodes to the same pixels."""
    path = tmp_path / "saved.png"
    image = with_masks.photo
    image.filepath_raw = str(path)
    image.file_format = "PNG"
    image.save()
    decoded = png.decode_png(path.read_bytes())
    expected = np.round(np.clip(pixels(image).reshape(H, W, 4)[::-1], 0, 1) * 255)
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

    with override("IMAGE_EDITOR"):
        assert bpy.ops.amodal3r.preview_overlay() == {"FINISHED"}
        overlay = bpy.data.images["photo.png overlay"]
        assert bpy.context.space_data.image == overlay
    shown = pixels(overlay).reshape(H, W, 4)
    source = with_masks.before.reshape(H, W, 4)
    assert shown[2, 5, 1] > source[2, 5, 1]  # target: greener
    assert np.allclose(shown[0, 0, :3], source[0, 0, :3])  # outside both layers: unchanged
    assert np.array_equal(pixels(with_masks.photo), with_masks.before)


def test_paint_mask_sets_up_the_image_editor(with_masks, settings):
    import bpy

    with override("IMAGE_EDITOR"):
        assert bpy.ops.amodal3r.paint_mask(layer="OCCLUDER") == {"FINISHED"}
        space = bpy.context.space_data
        assert space.image == with_masks.view.occluder_mask
        assert space.ui_mode == "PAINT"
    tool_settings = bpy.context.scene.tool_settings
    assert tool_settings.image_paint.canvas == with_masks.view.occluder_mask
    unified = module(addon_of(settings), "ui.compat").unified_paint_settings(tool_settings)
    assert unified.use_unified_color  # off in 4.2's factory settings: then the brush's own colour paints
    assert tuple(unified.color) == (1.0, 1.0, 1.0)
    assert tuple(unified.secondary_color) == (0.0, 0.0, 0.0)


def test_paint_mask_from_the_3d_view_opens_an_image_editor(with_masks):
    import bpy

    window, view3d = area("VIEW_3D")
    for other in window.screen.areas:
        if other.type == "IMAGE_EDITOR":
            other.type = "OUTLINER"
    region = next(r for r in view3d.regions if r.type == "WINDOW")
    with bpy.context.temp_override(window=window, area=view3d, region=region):
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
    settings.views[1].image = photo("side.png")
    assert bpy.ops.amodal3r.create_masks() == {"FINISHED"}
    assert settings.views[1].target_mask.name == "side.png target"
    settings.active_view_index = 0
    with pytest.raises(RuntimeError, match="cannot be removed"):
        bpy.ops.amodal3r.remove_view()
    settings.active_view_index = 1
    assert bpy.ops.amodal3r.remove_view() == {"FINISHED"}
    assert len(settings.views) == 1 and settings.active_view_index == 0

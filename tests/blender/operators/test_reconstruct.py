# SPDX-License-Identifier: GPL-3.0-or-later
"""Reconstruct end to end in the bpy module against a real local server with tiny random weights:
masks painted into Blender images, the job followed by calling the timer function (timers never
fire here), the result imported; cancelling; the server dying mid-job and restarting."""

from __future__ import annotations

import importlib
import json
import os
import signal
import time
from pathlib import Path
from unittest.mock import MagicMock

import numpy as np
import pytest

from amodal3r.api.protocol import RANDOM_WEIGHTS_NOTICE_START
from amodal3r_blender.core import masks, png

pytestmark = pytest.mark.usefixtures("server_env")
JOB_TIMEOUT = 300.0


def _ops(addon: str):
    return importlib.import_module(f"{addon}.operators.reconstruct")


def _pixels(image) -> np.ndarray:
    buffer = np.empty(image.size[0] * image.size[1] * 4, np.float32)
    image.pixels.foreach_get(buffer)
    return buffer


@pytest.fixture
def scene(mug_scene):
    """The example scene (conftest's ``mug_scene``) without Match Photo: the import stays at the cursor
    (tests/blender/operators/test_match_photo.py has the placed import)."""
    mug_scene.match_photo = False
    return mug_scene


def _follow(ops, until=None) -> float:
    """Call the timer function as Blender would, until the job ends or ``until()`` holds."""
    start = time.monotonic()
    while time.monotonic() - start < JOB_TIMEOUT:
        interval = ops.tick()
        if interval is None or (until is not None and until()):
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"the job did not end within {JOB_TIMEOUT} s")


def _base_colour_image(obj):
    (material,) = [slot.material for slot in obj.material_slots]
    bsdf = next(n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    (link,) = bsdf.inputs["Base Color"].links
    assert link.from_node.type == "TEX_IMAGE"
    return link.from_node.image


def _assert_result(obj, location=(1.0, 2.0, 3.0)) -> None:
    import bpy

    assert obj.type == "MESH" and len(obj.data.polygons) > 0
    assert tuple(obj.location) == pytest.approx(location)
    assert obj.select_get() and bpy.context.view_layer.objects.active == obj
    texture = _base_colour_image(obj)
    assert texture is not None and tuple(texture.size) == (256, 256)


def test_reconstruct_imports_a_textured_object_at_the_cursor(scene, clean_scene):
    import bpy

    ops = _ops(clean_scene)
    photo = scene.source_image
    photo_before, photo_path = _pixels(photo), photo.filepath
    assert bpy.ops.amodal3r.reconstruct(mode="TIMER") == {"FINISHED"}
    assert scene.running and ops.active_job() is not None
    folder = ops.active_job().request.folder
    progress = []
    seconds = _follow(ops, until=lambda: progress.append(scene.progress) and False)
    print(f"timer-driven reconstruction: {seconds:.1f} s")
    assert not scene.running and not scene.last_error and not scene.server_dead
    assert scene.message == "Imported mug"
    assert max(progress) > 0.0
    _assert_result(bpy.data.objects["mug"])
    assert not folder.exists()  # the uploads and downloads were temporary
    assert photo.filepath == photo_path and np.array_equal(_pixels(photo), photo_before)
    assert ops.active_job() is None and bpy.ops.amodal3r.reconstruct.poll()
    _assert_random_weights_notice(clean_scene, scene)


def _assert_random_weights_notice(addon: str, settings) -> None:
    """The tiny weights' notice, from the real server, once, beside the result with its button."""
    import bpy

    panels = importlib.import_module(f"{addon}.ui.panels")
    (notice,) = settings.notices.splitlines()
    assert notice.startswith(RANDOM_WEIGHTS_NOTICE_START) and "Download models" in notice
    layout = MagicMock()
    panels.draw_run(layout, bpy.context)
    drawn = "\n".join(str(call) for call in layout.mock_calls)
    assert drawn.count("RANDOM weights") == 1 and drawn.count("'amodal3r.download_models'") == 1


def test_background_mode_waits_and_imports_each_variant(scene, clean_scene):
    import bpy

    scene.variants = 2
    start = time.monotonic()
    assert bpy.ops.amodal3r.reconstruct() == {"FINISHED"}  # bpy.app.background: runs to the end
    print(f"blocking reconstruction of 2 variants: {time.monotonic() - start:.1f} s")
    for name in ("mug 1", "mug 2"):
        obj = bpy.data.objects[name]
        assert tuple(obj.location) == pytest.approx((1.0, 2.0, 3.0))
        assert _base_colour_image(obj) is not None
    assert bpy.context.view_layer.objects.active.name == "mug 2"
    _assert_random_weights_notice(clean_scene, scene)  # once for the two variants


def test_missing_target_is_reported_before_anything_starts(scene, clean_scene):
    import bpy

    scene.views[0].target_mask.pixels.foreach_set(masks.pixels_from_layer(np.zeros((512, 512), bool)))
    with pytest.raises(RuntimeError, match="'mug.png': the target mask is empty"):
        bpy.ops.amodal3r.reconstruct(mode="TIMER")
    assert _ops(clean_scene).active_job() is None and not scene.running


def test_cancel_during_sampling_changes_nothing(scene, clean_scene):
    import bpy

    ops = _ops(clean_scene)
    scene.structure_steps = scene.slat_steps = 200  # a window long enough to cancel in
    objects_before = set(bpy.data.objects.keys())
    assert bpy.ops.amodal3r.reconstruct(mode="TIMER") == {"FINISHED"}
    _follow(ops, until=lambda: scene.stage in ("structure", "slat"))
    assert bpy.ops.amodal3r.cancel.poll()
    assert bpy.ops.amodal3r.cancel() == {"FINISHED"}
    _follow(ops)
    assert scene.message == "Cancelled" and not scene.running and not scene.last_error
    assert set(bpy.data.objects.keys()) == objects_before
    assert not bpy.ops.amodal3r.cancel.poll()


def test_server_killed_mid_job_is_reported_then_restarted(scene, clean_scene):
    import bpy

    ops = _ops(clean_scene)
    scene.structure_steps = 200
    objects_before = set(bpy.data.objects.keys())
    assert bpy.ops.amodal3r.reconstruct(mode="TIMER") == {"FINISHED"}
    backend = ops.active_job().request.backend
    _follow(ops, until=lambda: scene.stage == "structure")
    state = json.loads((Path(backend.settings.data_dir) / "server.json").read_text())
    os.kill(state["pid"], signal.SIGKILL)
    _follow(ops)
    assert "server stopped while working" in scene.last_error and "Start the job again" in scene.last_error
    assert scene.server_dead and not scene.running and scene.message == "The server stopped"
    assert set(bpy.data.objects.keys()) == objects_before
    scene.structure_steps = 2
    assert bpy.ops.amodal3r.reconstruct(mode="TIMER") == {"FINISHED"}
    assert not scene.server_dead and not scene.last_error
    _follow(ops)
    assert not scene.last_error, scene.last_error
    _assert_result(bpy.data.objects["mug"])
    assert (
        backend.alive()
        and state["pid"] != json.loads((Path(backend.settings.data_dir) / "server.json").read_text())["pid"]
    )


def test_click_to_mask_round_trip(scene, clean_scene, server_python, tiny_model_dir):
    """Real segment calls: without SAM weights the answer is a plain error that says what to download;
    with a (random) SAM ViT-B in the model folder, the photo goes up as a PNG and a mask comes back."""
    import subprocess

    import bpy

    addon = clean_scene
    segment = importlib.import_module(f"{addon}.operators.segment")
    images = importlib.import_module(f"{addon}.operators.images")
    backend_module = importlib.import_module(f"{addon}.core.backend")
    preferences = importlib.import_module(f"{addon}.ui.preferences")
    backend = backend_module.get_backend(preferences.backend_settings(bpy.context))
    photo = images.encode_source(scene.source_image)

    def click():
        session = segment.SegmentSession(np.zeros((512, 512), bool), "vit_b")
        session.add_click(256, 200, positive=True)
        request = segment.request_mask(backend, session.params(), photo)
        assert request.wait(JOB_TIMEOUT)
        return session, request

    sam = tiny_model_dir / "sam" / "sam_vit_b_random.pth"
    if not sam.exists():
        _, request = click()
        assert request.result is None and request.error.startswith("Click-to-mask"), request.error
        assert "sam_vit_b" in request.error
        write = f"from amodal3r.pipelines.segment import write_random_sam; write_random_sam({str(sam)!r}, 'vit_b')"
        subprocess.run([server_python, "-c", write], check=True)
    session, request = click()
    assert request.result is not None, request.error
    mask_png, reply = request.result
    assert png.decode_png(mask_png).shape[:2] == (512, 512) and reply.image_id and np.isfinite(reply.score)
    layer = session.apply(mask_png, reply)
    assert layer.shape == (512, 512) and layer.dtype == bool
    np.testing.assert_array_equal(layer, masks.decode_layer(mask_png, 512, 512))

# SPDX-License-Identifier: GPL-3.0-or-later
"""Match Photo in the bpy module: the glTF importer's and exporter's frames, Blender's own camera
projection against the intrinsics math, and the real fit (``POST /v1/place``) of a mesh to masks
rendered from a scene camera, checked by rendering it again through that camera."""

from __future__ import annotations

import importlib
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from amodal3r.api.camera import Intrinsics
from amodal3r_blender.core import placement

SIZE = (200, 150)  # the test renders: small, so Cycles on a CPU takes a moment


def _module(addon: str, name: str):
    return importlib.import_module(f"{addon}.{name}")


def _glb_positions_bounds(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The POSITION accessor's min and max of a one-mesh GLB (glTF coordinates)."""
    data = path.read_bytes()
    length = struct.unpack_from("<I", data, 12)[0]
    document = json.loads(data[20 : 20 + length])
    accessor = document["accessors"][document["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]
    return np.array(accessor["min"]), np.array(accessor["max"])


def _mesh_object(name: str, parts: list[tuple[list, list]]):
    """An object of several vertex/face lists joined in one mesh."""
    import bpy

    vertices, faces = [], []
    for part_vertices, part_faces in parts:
        faces += [[index + len(vertices) for index in face] for face in part_faces]
        vertices += part_vertices
    mesh = bpy.data.meshes.new(name)
    mesh.from_pydata(vertices, [], faces)
    mesh.update()
    obj = bpy.data.objects.new(name, mesh)
    bpy.context.scene.collection.objects.link(obj)
    return obj


def _box(centre, size) -> tuple[list, list]:
    (cx, cy, cz), (sx, sy, sz) = centre, size
    vertices = [
        (cx + dx * sx / 2, cy + dy * sy / 2, cz + dz * sz / 2) for dx in (-1, 1) for dy in (-1, 1) for dz in (-1, 1)
    ]
    faces = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    return vertices, faces


def _cylinder(centre, radius, height, segments=24) -> tuple[list, list]:
    cx, cy, cz = centre
    ring = [
        (cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in np.linspace(0, 2 * math.pi, segments, False)
    ]
    vertices = [(x, y, cz + dz * height / 2) for dz in (-1, 1) for x, y in ring]
    sides = [(i, (i + 1) % segments, segments + (i + 1) % segments, segments + i) for i in range(segments)]
    caps = [tuple(reversed(range(segments))), tuple(range(segments, 2 * segments))]
    return vertices, sides + caps


def test_the_glb_match_photo_sends_is_in_the_gltf_frame(clean_scene, tmp_path):
    """Match Photo writes the object's mesh data scaled as the object is, in glTF's frame (x, z, -y),
    leaving its place and turn out; the importer turns it back into the mesh data and leaves the
    object's matrix the identity."""
    import bpy
    from mathutils import Matrix

    match_photo = _module(clean_scene, "operators.match_photo")
    scene_import = _module(clean_scene, "operators.scene_import")
    obj = _mesh_object("probe", [_box((0.1, 0.2, 0.3), (0.4, 0.6, 1.0))])
    obj.matrix_world = Matrix.LocRotScale((5, 6, 7), Matrix.Rotation(0.5, 3, "Z").to_quaternion(), (2, 2, 2))
    before = obj.matrix_world.copy()
    glb_from_mesh = match_photo.export_mesh(bpy.context, obj, tmp_path / "probe.glb")
    assert obj.matrix_world == before
    low, high = _glb_positions_bounds(tmp_path / "probe.glb")
    corners = np.array([(-0.1, -0.1, -0.2), (0.3, 0.5, 0.8)])  # the box's mesh-data bounds
    assert np.array([low, high]) == pytest.approx(np.array([(-0.2, -0.4, -1.0), (0.6, 1.6, 0.2)]), abs=1e-6)
    glb = np.array([glb_from_mesh @ [*corner, 1] for corner in corners])[:, :3]
    assert np.sort(glb, axis=0) == pytest.approx(np.array([low, high]), abs=1e-6)
    imported = scene_import.import_result(bpy.context, tmp_path / "probe.glb", "back")
    assert np.array(imported.matrix_world) == pytest.approx(np.eye(4))
    data = np.array([v.co for v in imported.data.vertices])
    assert data.min(axis=0) == pytest.approx(2 * corners[0]) and data.max(axis=0) == pytest.approx(2 * corners[1])


def test_match_photo_refuses_a_mesh_without_faces(clean_scene, tmp_path):
    import bpy

    match_photo = _module(clean_scene, "operators.match_photo")
    images = _module(clean_scene, "operators.images")
    points = _mesh_object("points", [([(0, 0, 0), (1, 0, 0), (0, 1, 0)], [])])
    with pytest.raises(images.UserError, match="has no faces"):
        match_photo.export_mesh(bpy.context, points, tmp_path / "points.glb")
    assert not (tmp_path / "points.glb").exists()


@pytest.mark.parametrize(
    "intrinsics",
    [
        Intrinsics(200, 150, 180.0, 180.0, 100.0, 75.0),
        Intrinsics(150, 200, 230.0, 230.0, 60.0, 120.0),
        Intrinsics(200, 150, 220.0, 180.0, 110.0, 70.0),
        Intrinsics(200, 150, 170.0, 210.0, 95.0, 80.0),
    ],
    ids=str,
)
def test_the_camera_sees_as_the_intrinsics_say(clean_scene, intrinsics):
    """Blender's own projection (world_to_camera_view) of a camera set from intrinsics, and the
    intrinsics read back from it, for shifts, portrait frames and non-square pixels."""
    import bpy
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Euler, Vector

    placement_ops = _module(clean_scene, "operators.placement")
    scene = bpy.context.scene
    camera = bpy.data.objects.new("cam", bpy.data.cameras.new("cam"))
    scene.collection.objects.link(camera)
    camera.location = (0.5, -4.0, 1.0)
    camera.rotation_euler = Euler((math.radians(80), 0.1, 0.2))
    scene.camera = camera
    settings = placement.camera_settings(intrinsics)
    placement_ops.set_camera_data(camera.data, settings)
    placement_ops.set_render(scene.render, settings)
    bpy.context.view_layer.update()
    read = placement_ops.scene_intrinsics(scene)
    assert np.allclose(list(read.to_dict().values()), list(intrinsics.to_dict().values()))
    for point in [(0, 0, 0), (0.7, 0.3, -0.4), (-0.5, 1.0, 0.8)]:
        seen = world_to_camera_view(scene, camera, Vector(point))
        pixel = placement.project(intrinsics, np.array(camera.matrix_world), point)
        assert pixel == pytest.approx((seen.x * intrinsics.width, (1 - seen.y) * intrinsics.height), abs=1e-3)


# --- the real fit -----------------------------------------------------------------------------------


def _silhouette(addon: str, scene, visible) -> np.ndarray:
    """Where the given objects cover the camera's render (alpha), top row first."""
    masks_ops = _module(addon, "operators.masks")
    hidden = {obj: obj.hide_render for obj in scene.objects if obj.type == "MESH"}
    try:
        for obj in hidden:
            obj.hide_render = obj not in visible
        image = masks_ops.render_camera(scene)
    finally:
        for obj, state in hidden.items():
            obj.hide_render = state
    width, height = image.size[:]
    pixels = np.empty(width * height * 4, np.float32)
    image.pixels.foreach_get(pixels)
    import bpy

    bpy.data.images.remove(image)
    return pixels.reshape(height, width, 4)[::-1, :, 3] > 0.5


def _paint(image, layer_top_first: np.ndarray) -> None:
    from amodal3r_blender.core import masks

    image.pixels.foreach_set(masks.pixels_from_layer(masks.flip_rows(layer_top_first)))


@pytest.fixture
def camera_scene(clean_scene):
    """A camera looking down at an asymmetric object (a box with an off-centre cylinder on top),
    turned 35 degrees, partly hidden by a post in front; rendered by Cycles on the CPU."""
    import bpy
    from mathutils import Vector

    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 4
    scene.render.film_transparent = True
    scene.render.resolution_x, scene.render.resolution_y = SIZE
    scene.render.resolution_percentage = 100
    world = bpy.data.worlds.new("world")
    scene.world = world
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(camera)
    camera.location = (0.4, -3.2, 1.6)
    camera.rotation_euler = (Vector((0, 0, 0.25)) - camera.location).to_track_quat("-Z", "Y").to_euler()
    camera.data.lens = 45
    scene.camera = camera
    target = _mesh_object("target", [_box((0, 0, 0), (1.0, 0.5, 0.5)), _cylinder((0.3, 0.1, 0.45), 0.13, 0.4)])
    target.rotation_euler = (0, 0, math.radians(35))
    occluder = _mesh_object("post", [_box((-0.1, -1.0, 0.6), (0.25, 0.08, 1.6))])
    bpy.context.view_layer.update()
    return scene, camera, target, occluder


def test_match_photo_fits_a_mesh_to_a_camera_render(camera_scene, clean_scene, server_env):
    import bpy
    from mathutils import Matrix

    scene, camera, target, occluder = camera_scene
    full = _silhouette(clean_scene, scene, {target})
    occluded = _silhouette(clean_scene, scene, {occluder})
    visible = full & ~occluded
    hidden_share = 1 - visible.sum() / full.sum()
    assert 0.2 <= hidden_share <= 0.55, hidden_share  # the scene is as meant: partly hidden
    settings = scene.amodal3r
    assert bpy.ops.amodal3r.render_camera_source() == {"FINISHED"}
    assert settings.source_kind == "CAMERA" and tuple(settings.source_image.size) == SIZE
    assert bpy.ops.amodal3r.create_masks() == {"FINISHED"}
    _paint(settings.views[0].target_mask, visible)
    _paint(settings.views[0].occluder_mask, occluded)

    copy = target.copy()
    copy.data = target.data.copy()
    copy.name = "fitted"
    copy.matrix_world = Matrix.Identity(4)  # at the origin, upright, unturned: the fit must find the pose
    scene.collection.objects.link(copy)
    bpy.context.view_layer.objects.active = copy
    copy.select_set(True)
    assert bpy.ops.amodal3r.match_photo() == {"FINISHED"}, settings.last_error
    assert not settings.last_error and settings.message.startswith("Matched 'fitted'")
    fitted = copy.amodal3r_placement
    assert fitted.camera == camera and len(fitted.poses) >= 1 and fitted.index == 0

    seen = _silhouette(clean_scene, scene, {copy})
    open_pixels = ~occluded
    iou = (seen & visible & open_pixels).sum() / ((seen | visible) & open_pixels).sum()
    print(f"Match Photo silhouette IoU over the unoccluded pixels: {iou:.3f} (score {fitted.poses[0].score:.3f})")
    assert iou >= 0.85


# --- after a reconstruction -------------------------------------------------------------------------


def test_reconstruct_with_match_photo_places_through_a_photo_camera(mug_scene, clean_scene, server_env):
    """A tiny-weights job with Match Photo on: a camera "mug camera" shows the photo, the object
    stays at the cursor, Real Size keeps its centre's pixel, the pose arrows cycle the candidates."""
    import bpy

    scene = bpy.context.scene
    assert mug_scene.match_photo and scene.camera is None
    assert bpy.ops.amodal3r.reconstruct() == {"FINISHED"}, mug_scene.last_error
    assert not mug_scene.last_error and mug_scene.message == "Imported mug"
    obj, camera = bpy.data.objects["mug"], bpy.data.objects["mug camera"]
    fitted = obj.amodal3r_placement
    assert fitted.camera == camera and len(fitted.poses) >= 1
    assert tuple(obj.location) == pytest.approx((1.0, 2.0, 3.0))  # the new camera came to the object
    assert camera.data.background_images[0].image == mug_scene.source_image and camera.data.show_background_images
    assert scene.camera == camera and (scene.render.resolution_x, scene.render.resolution_y) == (512, 512)

    placement_ops = _module(clean_scene, "operators.placement")
    intrinsics = placement_ops.scene_intrinsics(scene)
    centre = np.array(obj.matrix_world.translation)
    pixel = placement.project(intrinsics, np.array(camera.matrix_world), centre)
    size = fitted.real_size
    fitted.real_size = 2.5 * size
    assert fitted.real_size == pytest.approx(2.5 * size) and max(obj.dimensions) == pytest.approx(2.5 * size)
    moved = np.array(obj.matrix_world.translation)
    assert placement.project(intrinsics, np.array(camera.matrix_world), moved) == pytest.approx(pixel, abs=1e-3)
    eye = np.array(camera.matrix_world.translation)
    assert np.linalg.norm(moved - eye) == pytest.approx(2.5 * np.linalg.norm(centre - eye))

    if len(fitted.poses) > 1:
        best = np.array(obj.matrix_world)
        assert bpy.ops.amodal3r.cycle_pose(step=1) == {"FINISHED"} and fitted.index == 1
        assert not np.allclose(np.array(obj.matrix_world), best)
        assert bpy.ops.amodal3r.cycle_pose(step=-1) == {"FINISHED"} and fitted.index == 0
        assert np.array(obj.matrix_world) == pytest.approx(best, abs=1e-5)
        assert fitted.real_size == pytest.approx(2.5 * size)  # the size stays with the object

    # The next fit (Match Photo, Reconstruct again) sees the photo through that camera, its lens as set now.
    reconstruct = _module(clean_scene, "operators.reconstruct")
    camera.data.lens = 80.0
    sent = reconstruct.source_camera(bpy.context, mug_scene)
    assert (sent.width, sent.height) == (512, 512) and sent.fx == pytest.approx(80.0 * 512 / 36.0)
    bpy.data.objects.remove(camera)
    assert reconstruct.source_camera(bpy.context, mug_scene) is None  # no camera: the server reads the EXIF


def test_a_damaged_pose_file_is_an_error_and_the_object_stays(mug_scene, clean_scene, tmp_path):
    import bpy

    reconstruct = _module(clean_scene, "operators.reconstruct")
    match_photo = _module(clean_scene, "operators.match_photo")
    source = _mesh_object("source", [_box((0, 0, 0), (1, 1, 1))])
    glb = tmp_path / "variant0.glb"
    match_photo.export_mesh(bpy.context, source, glb)
    bpy.data.objects.remove(source)
    (tmp_path / "variant0.pose.json").write_text('{"object_to_camera": [[1, 0], ')
    viewpoint = reconstruct.viewpoint_of(bpy.context, mug_scene)
    objects, report = reconstruct.import_variants(bpy.context, [glb], "mug", (1.0, 2.0, 3.0), viewpoint)
    (obj,) = objects
    assert obj.name in bpy.data.objects and tuple(obj.location) == pytest.approx((1.0, 2.0, 3.0))
    (error,) = report.errors
    assert "'mug' was not matched to the photo" in error and "variant0.pose.json is damaged" in error
    assert "stays at the 3D cursor" in error and "mug camera" not in bpy.data.objects

    (tmp_path / "variant0.pose.json").unlink()
    objects, report = reconstruct.import_variants(bpy.context, [glb], "mug", (1.0, 2.0, 3.0), viewpoint)
    assert not report.errors and report.notices == [
        f"No pose came back for {objects[0].name!r}: it stays at the 3D cursor"
    ]


def test_the_first_fit_of_a_photo_uses_its_exif_focal_length(clean_scene):
    """The add-on sends pixels without metadata, so it reads the 35 mm focal length itself, from the
    file or from the packed copy; a photo without one leaves the guess to the server."""
    import bpy

    placement_ops = _module(clean_scene, "operators.placement")
    data = Path(__file__).parents[1] / "data"
    photo = bpy.data.images.load(str(data / "focal_28mm.jpg"))
    on_disk = placement_ops.exif_intrinsics(photo)
    assert (on_disk.width, on_disk.height) == (16, 12) and on_disk.fx == pytest.approx(28 / 36 * 16)
    photo.pack()
    photo.filepath = str(data / "missing.jpg")  # only the packed bytes are left to read
    assert placement_ops.exif_intrinsics(photo) == on_disk
    assert placement_ops.exif_intrinsics(bpy.data.images.load(str(data / "no_focal.jpg"))) is None
    assert placement_ops.exif_intrinsics(bpy.data.images.new("painted", 8, 8)) is None

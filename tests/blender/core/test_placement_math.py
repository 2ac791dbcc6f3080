# SPDX-License-Identifier: GPL-3.0-or-later
"""The math of Match Photo without bpy: intrinsics <-> Blender camera settings round trips, poses to
world matrices, and scaling about the camera centre keeping the picture. (Blender's own projection
is checked against these formulas in tests/blender/operators/test_match_photo.py.)"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from amodal3r.api.camera import Intrinsics
from amodal3r_blender.core import placement

INTRINSICS = [
    Intrinsics(640, 480, 600.0, 600.0, 320.0, 240.0),  # landscape, centred
    Intrinsics(480, 640, 500.0, 500.0, 200.0, 350.0),  # portrait, shifted
    Intrinsics(800, 600, 700.0, 560.0, 410.0, 290.0),  # fx > fy: taller pixels
    Intrinsics(600, 800, 500.0, 650.0, 300.0, 380.0),  # fy > fx: wider pixels
]


def _close(a: Intrinsics, b: Intrinsics) -> None:
    assert np.allclose(list(a.to_dict().values()), list(b.to_dict().values()), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("intrinsics", INTRINSICS, ids=str)
def test_camera_settings_round_trip(intrinsics):
    settings = placement.camera_settings(intrinsics)
    assert settings.sensor_fit == "AUTO" and min(settings.pixel_aspect_x, settings.pixel_aspect_y) == 1.0
    assert (settings.resolution_x, settings.resolution_y) == (intrinsics.width, intrinsics.height)
    _close(placement.intrinsics_of(settings), intrinsics)


def test_a_35mm_equivalent_focal_length_is_the_lens():
    """36 mm across the longer side: the 50 mm-equivalent default of the server reads as a 50 mm lens."""
    for width, height in ((1200, 800), (800, 1200)):
        settings = placement.camera_settings(Intrinsics.from_focal_35mm(width, height, 50.0))
        assert settings.lens == pytest.approx(50.0) and settings.shift_x == settings.shift_y == 0


def test_shift_is_in_units_of_the_longer_side():
    settings = placement.camera_settings(Intrinsics(1000, 500, 800.0, 800.0, 400.0, 300.0))
    assert settings.shift_x == pytest.approx(0.1) and settings.shift_y == pytest.approx(0.05)


@pytest.mark.parametrize("fit", ["HORIZONTAL", "VERTICAL"])
def test_fixed_sensor_fits(fit):
    """A user's camera with a fixed fit: the lens spans that side, whichever is longer."""
    settings = placement.CameraSettings(400, 300, 1.0, 1.0, fit, 36.0, 24.0, 50.0, 0.0, 0.0)
    side = 400 if fit == "HORIZONTAL" else 300
    sensor = 36.0 if fit == "HORIZONTAL" else 24.0
    assert placement.intrinsics_of(settings).fx == pytest.approx(50.0 * side / sensor)
    with pytest.raises(ValueError, match="sensor fit"):
        placement.intrinsics_of(dataclasses.replace(settings, sensor_fit="DIAGONAL"))


def test_same_view_compares_the_displayed_shape():
    a = placement.camera_settings(Intrinsics(640, 480, 600.0, 600.0, 320.0, 240.0))
    assert placement.same_view(a, dataclasses.replace(a, resolution_x=1280, resolution_y=960))
    assert not placement.same_view(a, dataclasses.replace(a, resolution_y=640))


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    about_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    about_x = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return about_x @ about_y


def _pose(yaw=0.7, pitch=0.3, t=(0.1, -0.05, 3.0)) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = _rotation(yaw, pitch)
    pose[:3, 3] = t
    return pose


def _camera_world() -> np.ndarray:
    """A camera at (0, -5, 1) looking along +Y (Blender's front view), slightly turned."""
    world = np.eye(4)
    turn = math.radians(10)
    world[:3, :3] = np.array([[math.cos(turn), -math.sin(turn), 0], [math.sin(turn), math.cos(turn), 0], [0, 0, 1]])
    world[:3, :3] = world[:3, :3] @ np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]])  # rotate 90 deg about X
    world[:3, 3] = (0, -5, 1)
    return world


def test_placed_mesh_projects_like_the_pose_says():
    """A glTF point p seen in the photo at K (T p) is, after import and placement, at that pixel."""
    intrinsics = INTRINSICS[2]
    pose, camera = _pose(), _camera_world()
    glb_point = np.array([0.2, 0.4, -0.1])
    mesh_point = (placement.GLTF_TO_BLENDER @ [*glb_point, 1])[:3]  # what the importer stores
    world = placement.placed_matrix(camera, pose, placement.mesh_to_glb()) @ [*mesh_point, 1]
    expected = intrinsics.matrix @ (pose @ [*glb_point, 1])[:3]
    assert placement.project(intrinsics, camera, world[:3]) == pytest.approx(expected[:2] / expected[2])


def test_placement_is_a_rotation_and_keeps_the_exported_scale():
    scale = (2.0, 1.0, 0.5)
    world = placement.placed_matrix(_camera_world(), _pose(), placement.mesh_to_glb(scale))
    assert np.linalg.norm(world[:3, :3], axis=0) == pytest.approx(scale)
    assert np.linalg.det(world[:3, :3]) == pytest.approx(np.prod(scale))


def test_the_camera_scale_is_ignored():
    camera = _camera_world()
    scaled = camera @ np.diag([3.0, 3.0, 3.0, 1.0])
    glb = placement.mesh_to_glb()
    assert placement.placed_matrix(scaled, _pose(), glb) == pytest.approx(placement.placed_matrix(camera, _pose(), glb))


def test_size_factor_scales_about_the_camera_centre_and_keeps_the_picture():
    intrinsics, camera, pose, glb = INTRINSICS[0], _camera_world(), _pose(), placement.mesh_to_glb()
    corners = [(x, y, z) for x in (-0.5, 0.5) for y in (-0.3, 0.3) for z in (-0.2, 0.4)]
    for factor in (0.25, 4.0):
        before = placement.placed_matrix(camera, pose, glb)
        after = placement.placed_matrix(camera, pose, glb, factor)
        for corner in corners:
            near, far = before @ [*corner, 1], after @ [*corner, 1]
            assert placement.project(intrinsics, camera, far[:3]) == pytest.approx(
                placement.project(intrinsics, camera, near[:3])
            )
            assert far[:3] - camera[:3, 3] == pytest.approx(factor * (near[:3] - camera[:3, 3]))
        assert placement.longest_side(corners, glb, factor) == pytest.approx(factor * 1.0)


def test_a_new_camera_sees_the_object_where_it_stands():
    """camera_for inverts placed_matrix: the object keeps its matrix and the camera comes to it."""
    glb = placement.mesh_to_glb((1.5, 1.5, 1.5))
    standing = np.eye(4)
    standing[:3, :3] = np.diag([1.5, 1.5, 1.5])
    standing[:3, 3] = (1, 2, 3)
    camera = placement.camera_for(standing, _pose(), glb)
    assert np.linalg.norm(camera[:3, :3], axis=0) == pytest.approx(np.ones(3))
    assert placement.placed_matrix(camera, _pose(), glb) == pytest.approx(standing)


def test_as_matrix_takes_flat_or_nested_values():
    flat = list(range(16))
    assert placement.as_matrix(flat)[1, 0] == 4
    assert np.array_equal(placement.as_matrix(placement.as_matrix(flat).tolist()), placement.as_matrix(flat))

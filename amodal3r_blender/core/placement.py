# SPDX-License-Identifier: GPL-3.0-or-later
"""The math of "Match photo": photo intrinsics <-> Blender camera settings, and pose -> world matrix.

No bpy. Frames (every matrix 4x4, acting on column vectors):

- The photo's camera, OpenCV (``amodal3r.api.camera``): x right, y down, z forward; pixels from the
  image's top-left corner, pixel centres at +0.5.
- A Blender camera looks down its local -Z with +Y up: the OpenCV frame is ``diag(1, -1, -1)`` of it.
- glTF is +Y up; Blender is +Z up. The glTF importer of 4.2, 4.5 and 5.0 converts the mesh data
  itself ((x, y, z) -> (x, -z, y)) and leaves the object's matrix the identity; the exporter
  converts back (tests/blender/operators/test_match_photo.py checks both in each release).
- ``mesh_to_glb`` takes an object's mesh data to the coordinates of the GLB the pose was fitted
  to: the axis swap, and for a mesh exported by Match Photo its scale at that moment.

Blender's camera projection (``BKE_camera_params_compute_viewplane``): with ``ycor`` = pixel
aspect y / x and the fitted side ``side`` (in x pixels: the width for a horizontal fit, ``ycor``
times the height for a vertical one; AUTO fits the longer side), ``fx = lens * side / sensor``,
``fy = fx / ycor``, ``cx = width / 2 - shift_x * side``, ``cy = height / 2 + shift_y * side / ycor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from amodal3r.api.camera import Intrinsics

SENSOR_WIDTH_MM = 36.0  # Blender's default sensor: the focal length then reads as 35 mm-equivalent
SENSOR_FITS = ("AUTO", "HORIZONTAL", "VERTICAL")
GLTF_TO_BLENDER = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
OPENCV_TO_BLENDER_CAMERA = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass(frozen=True)
class CameraSettings:
    """What of a Blender camera and the scene's render settings decides what the camera sees."""

    resolution_x: int  # the rendered size in pixels (resolution times its percentage)
    resolution_y: int
    pixel_aspect_x: float
    pixel_aspect_y: float
    sensor_fit: str  # AUTO, HORIZONTAL or VERTICAL
    sensor_width: float
    sensor_height: float
    lens: float  # mm
    shift_x: float  # in units of the fitted side
    shift_y: float


def _fit(settings: CameraSettings) -> tuple[float, float]:
    """The fitted side in x pixels and the sensor size along it (Blender's rule, AUTO included)."""
    ycor = settings.pixel_aspect_y / settings.pixel_aspect_x
    fit = settings.sensor_fit
    if fit == "AUTO":
        wide = settings.pixel_aspect_x * settings.resolution_x >= settings.pixel_aspect_y * settings.resolution_y
        return (settings.resolution_x if wide else ycor * settings.resolution_y), settings.sensor_width
    if fit == "HORIZONTAL":
        return settings.resolution_x, settings.sensor_width
    return ycor * settings.resolution_y, settings.sensor_height


def intrinsics_of(settings: CameraSettings) -> Intrinsics:
    """What a perspective camera sees, as photo intrinsics (so the server fits in exactly that camera)."""
    if settings.sensor_fit not in SENSOR_FITS:
        raise ValueError(f"unknown sensor fit {settings.sensor_fit!r}")
    ycor = settings.pixel_aspect_y / settings.pixel_aspect_x
    side, sensor = _fit(settings)
    fx = settings.lens * side / sensor
    return Intrinsics(
        settings.resolution_x,
        settings.resolution_y,
        fx,
        fx / ycor,
        settings.resolution_x / 2 - settings.shift_x * side,
        settings.resolution_y / 2 + settings.shift_y * side / ycor,
    )


def camera_settings(intrinsics: Intrinsics) -> CameraSettings:
    """A Blender camera (AUTO fit, 36 mm sensor) and render size that see exactly as ``intrinsics``.

    Blender's pixel aspects are at least 1, so the smaller focal length's axis gets the larger one.
    """
    width, height = intrinsics.width, intrinsics.height
    ycor = intrinsics.fx / intrinsics.fy
    aspect_x, aspect_y = (1.0, ycor) if ycor >= 1 else (1 / ycor, 1.0)
    side = width if aspect_x * width >= aspect_y * height else ycor * height
    return CameraSettings(
        resolution_x=width,
        resolution_y=height,
        pixel_aspect_x=aspect_x,
        pixel_aspect_y=aspect_y,
        sensor_fit="AUTO",
        sensor_width=SENSOR_WIDTH_MM,
        sensor_height=SENSOR_WIDTH_MM * 2 / 3,  # unused by the AUTO fit; Blender's default 24 mm
        lens=intrinsics.fx * SENSOR_WIDTH_MM / side,
        shift_x=(width / 2 - intrinsics.cx) / side,
        shift_y=(intrinsics.cy - height / 2) * ycor / side,
    )


def same_view(a: CameraSettings, b: CameraSettings, tolerance: float = 1e-3) -> bool:
    """Whether two render shapes frame alike: the same displayed aspect (sizes may differ)."""
    shape_a = a.resolution_x * a.pixel_aspect_x / (a.resolution_y * a.pixel_aspect_y)
    shape_b = b.resolution_x * b.pixel_aspect_x / (b.resolution_y * b.pixel_aspect_y)
    return abs(shape_a / shape_b - 1) <= tolerance


def as_matrix(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """A 4x4 float64 matrix from 16 row-major values or any 4x4 nesting."""
    return np.asarray(values, dtype=np.float64).reshape(4, 4)


def rigid(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` without its scale (a camera's view ignores the camera object's scale)."""
    result = as_matrix(matrix).copy()
    result[:3, :3] /= np.linalg.norm(result[:3, :3], axis=0)
    return result


def mesh_to_glb(scale: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """From mesh data to the GLB's frame: the object's ``scale`` (applied on export), then the axis swap."""
    return np.linalg.inv(GLTF_TO_BLENDER) @ np.diag([*scale, 1.0])


def placed_matrix(
    camera_world: np.ndarray, object_to_camera: np.ndarray, glb_from_mesh: np.ndarray, size_factor: float = 1.0
) -> np.ndarray:
    """The object's world matrix that shows it as the pose says through the camera.

    ``size_factor`` scales the object about the camera's centre: every point slides along its own
    line of sight, so the picture stays the same while the object gets larger and farther.
    """
    scale = np.diag([size_factor, size_factor, size_factor, 1.0])
    return (
        rigid(camera_world) @ OPENCV_TO_BLENDER_CAMERA @ scale @ as_matrix(object_to_camera) @ as_matrix(glb_from_mesh)
    )


def camera_for(object_world: np.ndarray, object_to_camera: np.ndarray, glb_from_mesh: np.ndarray) -> np.ndarray:
    """A new camera's world matrix that sees the object, where it is now, as the pose says."""
    seen = OPENCV_TO_BLENDER_CAMERA @ as_matrix(object_to_camera) @ as_matrix(glb_from_mesh)
    return rigid(as_matrix(object_world) @ np.linalg.inv(seen))


def longest_side(bound_box: Sequence[Sequence[float]], glb_from_mesh: np.ndarray, size_factor: float) -> float:
    """The placed object's longest bounding-box side in scene units (its "Real size")."""
    corners = np.asarray(bound_box, dtype=np.float64)
    axis_scale = np.linalg.norm(as_matrix(glb_from_mesh)[:3, :3], axis=0)
    return float(size_factor * np.max(np.ptp(corners, axis=0) * axis_scale))


def project(intrinsics: Intrinsics, camera_world: np.ndarray, point: Sequence[float]) -> np.ndarray:
    """Where a world point appears in the photo, in pixels (OpenCV), seen by a Blender camera."""
    to_camera = np.linalg.inv(OPENCV_TO_BLENDER_CAMERA) @ np.linalg.inv(rigid(camera_world))
    x, y, z, _ = to_camera @ np.array([*point, 1.0])
    return np.array([intrinsics.fx * x / z + intrinsics.cx, intrinsics.fy * y / z + intrinsics.cy])

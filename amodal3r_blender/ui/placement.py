# SPDX-License-Identifier: GPL-3.0-or-later
"""``object.amodal3r_placement``: where Match Photo put an object, kept on the object itself.

It holds the fitted poses (index 0 the best, then the server's candidates), which one is shown,
the camera they are seen through, the mesh's frame when the pose was fitted and the size factor.
``place`` computes the object's world matrix from these alone (``core.placement``), so changing
the pose or the Real Size re-places the object in front of the camera (a manual move is then
replaced). Real Size reads the object's longest side and, when set, scales it about the camera's
centre: the object grows and recedes along the lines of sight, and the picture stays the same.
"""

from __future__ import annotations

import bpy
from bpy.props import CollectionProperty, FloatProperty, FloatVectorProperty, IntProperty, PointerProperty
from mathutils import Matrix

from ..core import placement as geometry

MIN_SIZE = 1e-6


class AMODAL3R_PG_pose(bpy.types.PropertyGroup):
    """One fitted pose: the GLB's frame to the photo's camera (OpenCV), and how well it fits."""

    matrix: FloatVectorProperty(size=16, name="Object to Camera")  # type: ignore[valid-type]  # row-major
    score: FloatProperty(name="Score", description="How well the silhouette fits the masks (1 at best)")  # type: ignore[valid-type]


def _is_camera(placement: AMODAL3R_PG_placement, obj: bpy.types.Object) -> bool:
    return obj.type == "CAMERA"


def _real_size(placement: AMODAL3R_PG_placement) -> float:
    obj = placement.id_data
    return geometry.longest_side(obj.bound_box, placement.mesh_to_glb, placement.size_factor)


def _set_real_size(placement: AMODAL3R_PG_placement, value: float) -> None:
    current = _real_size(placement)
    if current <= 0 or value <= 0:
        return  # a flat or empty mesh has no size to scale to
    placement.size_factor *= value / current
    place(placement.id_data)


class AMODAL3R_PG_placement(bpy.types.PropertyGroup):
    poses: CollectionProperty(type=AMODAL3R_PG_pose)  # type: ignore[valid-type]
    index: IntProperty(name="Pose", min=0, description="The pose shown (0: the best fit)")  # type: ignore[valid-type]
    camera: PointerProperty(  # type: ignore[valid-type]
        type=bpy.types.Object,
        name="Camera",
        poll=_is_camera,
        description="The camera the object was matched through",
    )
    mesh_to_glb: FloatVectorProperty(size=16, name="Mesh to GLB")  # type: ignore[valid-type]  # row-major
    size_factor: FloatProperty(name="Size Factor", default=1.0, min=MIN_SIZE)  # type: ignore[valid-type]
    real_size: FloatProperty(  # type: ignore[valid-type]
        name="Real Size",
        description="The object's longest side; changing it scales the object about the camera's "
        "centre, so it stays lined up with the photo",
        subtype="DISTANCE",
        unit="LENGTH",
        min=MIN_SIZE,
        get=_real_size,
        set=_set_real_size,
    )


def placement_of(obj: bpy.types.Object | None) -> AMODAL3R_PG_placement | None:
    """The object's placement, or None when Match Photo has not placed it."""
    placement = getattr(obj, "amodal3r_placement", None) if obj is not None else None
    return placement if placement is not None and len(placement.poses) > 0 else None


def pose_summary(obj: bpy.types.Object | None) -> str:
    """ "Pose 1 of 3, score 0.91" for the panel and reports, or "" without a placement."""
    placement = placement_of(obj)
    if placement is None:
        return ""
    shown = min(placement.index, len(placement.poses) - 1)
    return f"Pose {shown + 1} of {len(placement.poses)}, score {placement.poses[shown].score:.2f}"


def place(obj: bpy.types.Object) -> None:
    """Put the object where its shown pose says, in front of its camera (nothing without a camera)."""
    placement = obj.amodal3r_placement
    if placement.camera is None or not placement.poses:
        return
    pose = placement.poses[min(placement.index, len(placement.poses) - 1)]
    world = geometry.placed_matrix(
        placement.camera.matrix_world, pose.matrix, placement.mesh_to_glb, placement.size_factor
    )
    obj.matrix_world = Matrix(world.tolist())


classes = (AMODAL3R_PG_pose, AMODAL3R_PG_placement)
_register, _unregister = bpy.utils.register_classes_factory(classes)


def register() -> None:
    _register()
    bpy.types.Object.amodal3r_placement = PointerProperty(type=AMODAL3R_PG_placement)


def unregister() -> None:
    del bpy.types.Object.amodal3r_placement
    _unregister()

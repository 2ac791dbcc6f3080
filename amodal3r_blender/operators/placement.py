# SPDX-License-Identifier: GPL-3.0-or-later
"""Match Photo in the scene: put an object where its fitted pose says, and the camera to see it by.

A render of a scene camera is matched through that camera: the object goes in front of it, so
looking through it lines up with the render. A photo (an image or a file) gets a camera of its own,
"<name> camera", with the photo as its background and the pose's intrinsics as sensor, focal length
and shift; a new one is put where it sees the object, which stays where it is (at the 3D cursor,
upright, for an import); an existing one is kept and the object goes in front of it.

The scene's render settings are the user's: a Blender camera frames the photo only when the render
has the photo's aspect, but the add-on changes the resolution and pixel aspect only when the scene
had no active camera (the photo camera then becomes it); otherwise a notice says what to set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import bpy
import numpy as np
from bpy.props import IntProperty
from mathutils import Matrix

from amodal3r.api.camera import POSE_SUFFIX, Intrinsics, Pose
from amodal3r.api.errors import InputError

from ..core import exif
from ..core import placement as geometry
from ..ui.placement import place as place_object
from ..ui.placement import placement_of, pose_summary
from .images import UserError, image_size


@dataclass(frozen=True)
class Viewpoint:
    """What placed objects are seen through: the scene camera that rendered the source, or a photo."""

    camera: str = ""  # a camera source: that camera object's name
    photo: str = ""  # a photo source: the image's name
    camera_name: str = ""  # a photo source: the name of the camera made for it


@dataclass
class PlaceReport:
    """How placing went: notices (nothing to place by) and errors (a pose that could not be used)."""

    notices: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# --- cameras --------------------------------------------------------------------------------------


def render_size(render: bpy.types.RenderSettings) -> tuple[int, int]:
    """The size of a render in pixels: the resolution at its percentage."""
    return (
        render.resolution_x * render.resolution_percentage // 100,
        render.resolution_y * render.resolution_percentage // 100,
    )


def camera_settings_of(
    camera: bpy.types.Camera, render: bpy.types.RenderSettings, size: tuple[int, int] | None = None
) -> geometry.CameraSettings:
    """What ``camera`` sees with ``render``'s settings, or, given ``size``, at that size with square
    pixels (a photo's size: the render's pixel aspect belongs to the scene, not to the photo)."""
    width, height = size or render_size(render)
    aspect = (1.0, 1.0) if size else (render.pixel_aspect_x, render.pixel_aspect_y)
    return geometry.CameraSettings(
        width,
        height,
        *aspect,
        camera.sensor_fit,
        camera.sensor_width,
        camera.sensor_height,
        camera.lens,
        camera.shift_x,
        camera.shift_y,
    )


def scene_intrinsics(scene: bpy.types.Scene) -> Intrinsics:
    """What the scene's camera sees at the scene's render size, as photo intrinsics."""
    camera = scene.camera
    if camera is None or camera.type != "CAMERA":
        raise UserError("The scene has no active camera: add a camera or set one in the Scene properties")
    if camera.data.type != "PERSP":
        raise UserError(f"Camera {camera.name!r} is not a perspective camera: Match Photo needs one (Lens > Type)")
    try:
        return geometry.intrinsics_of(camera_settings_of(camera.data, scene.render))
    except InputError as error:
        raise UserError(f"Camera {camera.name!r} cannot be matched: {error}") from None


def set_camera_data(camera: bpy.types.Camera, settings: geometry.CameraSettings) -> None:
    camera.type = "PERSP"
    camera.lens_unit = "MILLIMETERS"
    camera.sensor_fit = settings.sensor_fit
    camera.sensor_width = settings.sensor_width
    camera.sensor_height = settings.sensor_height
    camera.lens = settings.lens
    camera.shift_x = settings.shift_x
    camera.shift_y = settings.shift_y


def set_render(render: bpy.types.RenderSettings, settings: geometry.CameraSettings) -> None:
    render.resolution_x = settings.resolution_x
    render.resolution_y = settings.resolution_y
    render.resolution_percentage = 100
    render.pixel_aspect_x = settings.pixel_aspect_x
    render.pixel_aspect_y = settings.pixel_aspect_y


def _show_photo(camera: bpy.types.Camera, photo: bpy.types.Image) -> None:
    """The photo as the camera's background (one entry, reused), filling the camera frame."""
    background = next((b for b in camera.background_images if b.image == photo), None)
    if background is None:
        background = camera.background_images.new()
        background.image = photo
    background.frame_method = "STRETCH"
    background.alpha = 1.0
    camera.show_background_images = True


def photo_intrinsics(context: bpy.types.Context, viewpoint: Viewpoint) -> Intrinsics | None:
    """The intrinsics of the photo's camera when an earlier placement made it (the user may have set
    its lens since): fits then stay in that camera. None without one."""
    camera = bpy.data.objects.get(viewpoint.camera_name)
    photo = bpy.data.images.get(viewpoint.photo)
    if camera is None or camera.type != "CAMERA" or camera.data.type != "PERSP" or photo is None:
        return None
    settings = camera_settings_of(camera.data, context.scene.render, image_size(photo))
    try:
        return geometry.intrinsics_of(settings)
    except InputError:  # a shift that moves the centre off the photo: let the server guess again
        return None


def exif_intrinsics(photo: bpy.types.Image) -> Intrinsics | None:
    """From the photo file's EXIF 35 mm focal length (packed, or read from disk), else None. The
    server never sees the EXIF: the add-on sends it the pixels Blender shows."""
    if photo.packed_file is not None:
        head = photo.packed_file.data[: exif.HEAD_BYTES]
    else:
        try:
            with open(bpy.path.abspath(photo.filepath), "rb") as file:
                head = file.read(exif.HEAD_BYTES)
        except OSError:  # generated, or its file is gone: nothing to read
            return None
    focal = exif.focal_35mm(head)
    if focal is None:
        return None
    width, height = image_size(photo)
    return Intrinsics.from_focal_35mm(width, height, focal)


def photo_camera(
    context: bpy.types.Context, viewpoint: Viewpoint, intrinsics: Intrinsics, sees: np.ndarray | None
) -> tuple[bpy.types.Object, list[str]]:
    """The photo's camera, made (at ``sees``, a world matrix) or reused, set up as the photo; and notices."""
    photo = bpy.data.images.get(viewpoint.photo)
    if photo is None:
        raise UserError(f"The photo {viewpoint.photo!r} is no longer in the file: choose the source again")
    scene = context.scene
    camera = bpy.data.objects.get(viewpoint.camera_name)
    if camera is None or camera.type != "CAMERA":
        camera = bpy.data.objects.new(viewpoint.camera_name, bpy.data.cameras.new(viewpoint.camera_name))
        (context.collection or scene.collection).objects.link(camera)
        if sees is not None:
            camera.matrix_world = Matrix(sees.tolist())
    settings = geometry.camera_settings(intrinsics)
    set_camera_data(camera.data, settings)
    _show_photo(camera.data, photo)
    if scene.camera is None:
        scene.camera = camera
        set_render(scene.render, settings)
        return camera, []
    if scene.camera == camera and geometry.same_view(settings, camera_settings_of(camera.data, scene.render)):
        return camera, []
    return camera, [
        f"Look through {camera.name!r} with a {intrinsics.width}x{intrinsics.height} render (Output > "
        "Resolution, or any size of that shape) to see the object lined up with the photo"
    ]


# --- poses ----------------------------------------------------------------------------------------


def read_pose(path: Path) -> Pose:
    """A ``pose.json``; a damaged one is a UserError that names it."""
    try:
        return Pose.from_json(path)
    except FileNotFoundError:
        raise UserError(f"The pose file {path} is missing") from None
    except InputError as error:
        raise UserError(f"The pose file {path.name} is damaged ({error})") from None


def _store(obj: bpy.types.Object, pose: Pose, camera: bpy.types.Object, glb_from_mesh) -> None:
    """Keep the poses (best first), the camera and the mesh's frame on the object."""
    placement = obj.amodal3r_placement
    placement.poses.clear()
    for matrix, score in ((pose.object_to_camera, pose.score), *pose.candidates):
        item = placement.poses.add()
        item.matrix = geometry.as_matrix(matrix).reshape(-1).tolist()
        item.score = score
    placement.index = 0
    placement.camera = camera
    placement.mesh_to_glb = geometry.as_matrix(glb_from_mesh).reshape(-1).tolist()
    placement.size_factor = 1.0


def apply_pose(
    context: bpy.types.Context, obj: bpy.types.Object, pose: Pose, viewpoint: Viewpoint, glb_from_mesh
) -> list[str]:
    """Place the object by the pose through the viewpoint's camera; returns notices for the person."""
    notices: list[str] = []
    if viewpoint.camera:
        camera = bpy.data.objects.get(viewpoint.camera)
        if camera is None or camera.type != "CAMERA":
            raise UserError(f"The camera {viewpoint.camera!r} is gone: the object stays where it is")
    else:
        context.view_layer.update()  # the object's matrix_world after its location was just set
        sees = geometry.camera_for(obj.matrix_world, pose.object_to_camera, glb_from_mesh)
        camera, notices = photo_camera(context, viewpoint, pose.camera, sees)
    _store(obj, pose, camera, glb_from_mesh)
    place_object(obj)
    return notices


def place_variants(
    context: bpy.types.Context, imported: list[tuple[bpy.types.Object, Path]], viewpoint: Viewpoint
) -> PlaceReport:
    """Each imported variant placed by the ``pose.json`` beside its GLB; a missing or damaged one
    leaves that object where the import put it."""
    report = PlaceReport()
    for obj, glb in imported:
        pose_path = glb.with_suffix(POSE_SUFFIX)
        if not pose_path.is_file():
            report.notices.append(f"No pose came back for {obj.name!r}: it stays at the 3D cursor")
            continue
        try:
            report.notices += apply_pose(context, obj, read_pose(pose_path), viewpoint, geometry.mesh_to_glb())
        except UserError as error:
            report.errors.append(f"{obj.name!r} was not matched to the photo: {error}. It stays at the 3D cursor")
    report.notices = list(dict.fromkeys(report.notices))
    return report


# --- operators ----------------------------------------------------------------------------------


class AMODAL3R_OT_cycle_pose(bpy.types.Operator):
    """Show the next (or previous) of the fitted poses of the active object"""

    bl_idname = "amodal3r.cycle_pose"
    bl_label = "Next Pose"
    bl_options: ClassVar[set[str]] = {"REGISTER", "UNDO"}

    step: IntProperty(name="Step", default=1, description="+1: next pose, -1: previous")  # type: ignore[valid-type]

    @classmethod
    def description(cls, context: bpy.types.Context, properties: bpy.types.OperatorProperties) -> str:
        return "Show the next fitted pose" if properties.step >= 0 else "Show the previous fitted pose"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        placement = placement_of(context.active_object)
        return placement is not None and len(placement.poses) > 1

    def execute(self, context: bpy.types.Context) -> set[str]:
        obj = context.active_object
        placement = obj.amodal3r_placement
        if placement.camera is None:
            self.report({"ERROR"}, f"The camera {obj.name!r} was matched through is gone: use Match Photo again")
            return {"CANCELLED"}
        placement.index = (placement.index + self.step) % len(placement.poses)
        place_object(obj)
        self.report({"INFO"}, pose_summary(obj))
        return {"FINISHED"}


classes = (AMODAL3R_OT_cycle_pose,)
register, unregister = bpy.utils.register_classes_factory(classes)

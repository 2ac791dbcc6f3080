# SPDX-License-Identifier: GPL-3.0-or-later
"""Match Photo for a mesh already in the scene: fit its pose to the source view's masks again.

The active mesh is exported as a GLB in its own frame (its scale kept, its place and turn left
out) into a temporary folder and sent with the main view's photo and masks to ``POST /v1/place``;
the answer places it as after a reconstruction (``placement.apply_pose``). Run it after editing
the masks, or on a mesh made elsewhere. Like Reconstruct, it waits in a worker thread, followed
by a timer in the UI; in background mode it runs to the end inside the operator.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import bpy
import numpy as np
from bpy.props import EnumProperty

from amodal3r.api.client import Client, ServerError, ServerUnavailable
from amodal3r.api.errors import InputError
from amodal3r.api.protocol import PlaceParams

from ..core import glb
from ..core import placement as geometry
from ..core.backend import Backend, BackendError, get_backend
from ..core.tasks import Task
from ..ui.preferences import backend_settings
from ..ui.properties import get_settings
from .images import UserError
from .placement import Viewpoint, apply_pose, pose_summary, read_pose
from .reconstruct import MODES, TICK_SECONDS, require_source, source_camera, viewpoint_of, write_view
from .scene_import import push_undo

PLACE_TIMEOUT = 900.0  # seconds: fitting runs thousands of silhouettes, minutes on a slow CPU


class PlaceError(RuntimeError):
    """The server gave no pose; the message says why."""


@dataclass
class PendingMatch:
    """The one Match Photo in flight, and what its answer is applied to."""

    task: Task[Path]  # its result: the pose.json written from the answer
    scene_name: str
    object_name: str
    viewpoint: Viewpoint
    glb_from_mesh: np.ndarray
    folder: Path  # temporary: the GLB, the view's PNGs, the answer


_pending: PendingMatch | None = None


def export_mesh(context: bpy.types.Context, obj: bpy.types.Object, path: Path) -> np.ndarray:
    """The object's surface (modifiers applied) as a GLB in its own frame, scaled as it is; returns
    its mesh-to-GLB matrix."""
    if obj.type != "MESH":
        raise UserError(f"{obj.name!r} is not a mesh: select the mesh to match to the photo")
    evaluated = obj.evaluated_get(context.evaluated_depsgraph_get())
    mesh = evaluated.to_mesh()
    try:
        mesh.calc_loop_triangles()
        points = np.empty(3 * len(mesh.vertices), dtype=np.float32)
        mesh.vertices.foreach_get("co", points)
        triangles = np.empty(3 * len(mesh.loop_triangles), dtype=np.int32)
        mesh.loop_triangles.foreach_get("vertices", triangles)
    finally:
        evaluated.to_mesh_clear()
    if len(triangles) == 0:
        raise UserError(f"{obj.name!r} has no faces: Match Photo fits a surface to the photo")
    glb_from_mesh = geometry.mesh_to_glb(tuple(obj.matrix_world.to_scale()))
    in_glb = points.reshape(-1, 3) @ glb_from_mesh[:3, :3].T  # a linear map: no translation to add
    path.write_bytes(glb.mesh_glb(in_glb, triangles.reshape(-1, 3)))
    return glb_from_mesh


def fit(backend: Backend, glb: Path, view: dict[str, str], params: PlaceParams, folder: Path) -> Path:
    """Ask the server for the pose (worker thread); the answer is written as ``pose.json``."""
    running = backend.client()
    client = Client(running.url, running.token, timeout=PLACE_TIMEOUT)
    try:
        answer = client.place(glb, view, params)
    except ServerError as error:
        raise PlaceError(f"The server could not match the photo: {error.detail}") from None
    except ServerUnavailable as error:
        raise PlaceError(f"The reconstruction server did not answer: {error}. Try again") from None
    path = folder / "pose.json"
    path.write_text(json.dumps(answer), encoding="utf-8")
    return path


def _finish(match: PendingMatch) -> tuple[str, str]:
    """Apply the answer on the main thread: ``(message, error)``, one of them empty."""
    task = match.task
    if task.error:
        return "", task.error
    scene = bpy.data.scenes.get(match.scene_name)
    obj = bpy.data.objects.get(match.object_name)
    if scene is None or obj is None:
        return "", f"{match.object_name!r} or its scene is gone: nothing was placed"
    window = next((w for w in bpy.context.window_manager.windows if w.scene == scene), None)
    try:
        with bpy.context.temp_override(**({"window": window} if window else {}), scene=scene):
            notices = apply_pose(bpy.context, obj, read_pose(task.result), match.viewpoint, match.glb_from_mesh)
    except UserError as error:
        return "", f"{obj.name!r} was not matched to the photo: {error}"
    push_undo("Match Photo")
    return "\n".join([f"Matched {obj.name!r}: {pose_summary(obj)}", *notices]), ""


def _show(scene: bpy.types.Scene | None, message: str, error: str) -> None:
    settings = getattr(scene, "amodal3r", None)
    if settings is not None:
        settings.message, settings.last_error = message.split("\n")[0], error
        settings.notices = "\n".join(message.split("\n")[1:])


def _end() -> PendingMatch | None:
    global _pending
    match, _pending = _pending, None
    if match is not None:
        shutil.rmtree(match.folder, ignore_errors=True)
    return match


def tick() -> float | None:
    """The timer: once the server answered, place the object (or show why not), then stop."""
    match = _pending
    if match is None:
        return None
    if not match.task.done:
        return TICK_SECONDS
    try:
        message, error = _finish(match)
    except Exception:  # noqa: BLE001 - a failing timer would leave Match Photo pending for good
        message, error = "", f"Match Photo failed unexpectedly:\n{traceback.format_exc(limit=4)}"
    _show(bpy.data.scenes.get(match.scene_name), message, error)
    _end()
    return None


class AMODAL3R_OT_match_photo(bpy.types.Operator):
    """Fit the active mesh to the source image's masks and place it in front of the photo's camera"""

    bl_idname = "amodal3r.match_photo"
    bl_label = "Match Photo"
    bl_options: ClassVar[set[str]] = {"REGISTER"}

    mode: EnumProperty(items=MODES, default="AUTO", options={"HIDDEN", "SKIP_SAVE"})  # type: ignore[valid-type]

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        obj = context.active_object
        return hasattr(context.scene, "amodal3r") and obj is not None and obj.type == "MESH" and _pending is None

    def execute(self, context: bpy.types.Context) -> set[str]:
        global _pending
        obj = context.active_object
        settings = get_settings(context)
        folder = Path(tempfile.mkdtemp(prefix="amodal3r-place-"))
        try:
            require_source(settings)
            view = write_view(settings.views[0], 0, folder)
            camera = source_camera(context, settings)
            viewpoint = viewpoint_of(context, settings)
            glb_from_mesh = export_mesh(context, obj, folder / "mesh.glb")
            backend = get_backend(backend_settings(context))
        except (UserError, InputError, BackendError) as error:
            shutil.rmtree(folder, ignore_errors=True)
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        params = PlaceParams(camera=camera.to_dict() if camera is not None else None)
        task = Task(
            "Match Photo",
            lambda task: fit(backend, folder / "mesh.glb", view, params, folder),
            expected=(PlaceError, BackendError),
        )
        _pending = PendingMatch(task, context.scene.name, obj.name, viewpoint, glb_from_mesh, folder)
        settings.last_error = ""
        if self.mode == "BLOCKING" or (self.mode == "AUTO" and bpy.app.background):
            task.run()
            message, error = _finish(_pending)
            _show(context.scene, message, error)
            _end()
            self.report({"ERROR"} if error else {"INFO"}, error or message)
            return {"CANCELLED"} if error else {"FINISHED"}
        task.start()
        settings.message = f"Matching {obj.name!r} to the photo"
        if not bpy.app.timers.is_registered(tick):
            bpy.app.timers.register(tick, first_interval=TICK_SECONDS)
        return {"FINISHED"}


classes = (AMODAL3R_OT_match_photo,)
_register, _unregister = bpy.utils.register_classes_factory(classes)


def register() -> None:
    _register()


def unregister() -> None:
    if bpy.app.timers.is_registered(tick):
        bpy.app.timers.unregister(tick)
    match = _end()
    if match is not None:
        match.task.cancel()
    _unregister()

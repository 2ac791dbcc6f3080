# SPDX-License-Identifier: GPL-3.0-or-later
"""Reconstruct and Cancel: send the views to the server, follow the job, import the result.

The photos and masks are written as PNGs into a fresh temporary folder (the user's files are
never touched) and ``jobs.start_job`` runs the job as a ``Task`` in a thread. In the UI a
``bpy.app.timers`` function, ``tick``, copies its progress into ``scene.amodal3r`` for the panel
and, once the job ends, imports every variant at the 3D cursor or records the error. In
background mode (``blender -b``, the bpy module) timers never fire, so the job runs to the end
inside the operator instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import bpy
from bpy.app.handlers import persistent
from bpy.props import EnumProperty

from amodal3r.api.camera import Intrinsics
from amodal3r.api.errors import InputError
from amodal3r.api.protocol import JobParams, JobStatus

from ..core import masks
from ..core.backend import LOCAL, Backend, BackendError, get_backend
from ..core.jobs import JobError, glb_paths, notices_of, run_blocking, start_job
from ..core.tasks import Task
from ..ui.preferences import backend_settings
from ..ui.properties import AMODAL3R_PG_settings, AMODAL3R_PG_view, get_settings
from .images import UserError, encode_source, image_size, read_layer, view_image
from .placement import PlaceReport, Viewpoint, exif_intrinsics, photo_intrinsics, place_variants, scene_intrinsics
from .scene_import import ResultImportError, import_result, push_undo

TICK_SECONDS = 0.25
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".exr", ".tif", ".tiff", ".webp", ".bmp", ".tga", ".hdr")
STAGE_TEXT = {
    "queued": "Waiting for the server",
    "loading": "Loading the model",
    "encoding": "Reading the image",
    "structure": "Sampling the shape",
    "slat": "Sampling the details",
    "decoding": "Building the mesh",
    "exporting": "Baking the texture",
    "placing": "Matching the photo",
}
MODES = [
    ("AUTO", "Auto", "In the background when Blender has a user interface, else wait for the result"),
    ("TIMER", "Timer", "Start the job and follow it with a timer (call tick() where timers do not run)"),
    ("BLOCKING", "Blocking", "Wait for the result inside the operator"),
]


@dataclass(frozen=True)
class JobRequest:
    """What Reconstruct sends, and what it needs to import the answer."""

    backend: Backend
    views: list[dict[str, str]]
    params: JobParams
    name: str  # of the imported objects
    folder: Path  # temporary: the uploaded PNGs and the downloaded results
    viewpoint: Viewpoint | None  # with Match Photo: what the results are placed in front of


@dataclass
class ActiveJob:
    """The one reconstruction in flight, and where its result goes."""

    task: Task[list[Path]]  # its result: the downloaded files
    request: JobRequest
    scene_name: str
    location: tuple[float, float, float]


_job: ActiveJob | None = None


def active_job() -> ActiveJob | None:
    return _job


# --- inputs -------------------------------------------------------------------------------------


def object_name(image: bpy.types.Image) -> str:
    """The image's name without a file extension, e.g. "mug.jpg" -> "mug"."""
    stem, extension = os.path.splitext(image.name)
    return stem if extension.lower() in IMAGE_EXTENSIONS and stem else image.name


def view_files(view: AMODAL3R_PG_view, number: int) -> list[tuple[str, bytes]]:
    """One view's PNG files as (kind, bytes), after checking its masks."""
    try:
        image = view_image(view)
    except UserError:
        if number == 1:
            raise
        raise UserError(f"View {number} has no image: choose one in the Views panel or remove the view") from None
    if view.target_mask is None:
        raise UserError(f"{image.name!r} has no target mask: click Create Masks and paint the visible part white")
    width, height = image_size(image)
    target = read_layer(view.target_mask)
    occluder = read_layer(view.occluder_mask) if view.occluder_mask is not None else None
    masks.validate_view(target, occluder, width, height, repr(image.name))
    files = [("image", encode_source(image)), ("target_mask", masks.encode_layer(target))]
    if occluder is not None:
        files.append(("occluder_mask", masks.encode_layer(occluder)))
    return files


def require_source(settings: AMODAL3R_PG_settings) -> None:
    if not settings.views or settings.views[0].image is None:
        raise UserError(
            "No source image: choose one in the Source panel (or right-click an image in the "
            "Image Editor > Reconstruct occluded object)"
        )


def write_views(settings: AMODAL3R_PG_settings, folder: Path) -> list[dict[str, str]]:
    """The views as PNG files in ``folder``, in the ``[{kind: path}]`` form the client uploads."""
    require_source(settings)
    return [write_view(view, index, folder) for index, view in enumerate(settings.views)]


def write_view(view: AMODAL3R_PG_view, index: int, folder: Path) -> dict[str, str]:
    """One view's checked PNG files in ``folder``, as ``{kind: path}``."""
    paths = {}
    for kind, data in view_files(view, index + 1):
        path = folder / f"view{index}_{kind}.png"
        path.write_bytes(data)
        paths[kind] = str(path)
    return paths


def _chosen(settings: AMODAL3R_PG_settings, name: str) -> int | float | None:
    """A setting's value when its ``use_`` switch is on, else None: the pipeline's own value."""
    return getattr(settings, name) if getattr(settings, f"use_{name}") else None


def viewpoint_of(context: bpy.types.Context, settings: AMODAL3R_PG_settings) -> Viewpoint:
    """What Match Photo places results in front of: the rendering camera, else the photo."""
    if settings.source_kind == "CAMERA":
        return Viewpoint(camera=context.scene.camera.name)
    photo = settings.views[0].image
    return Viewpoint(photo=photo.name, camera_name=f"{object_name(photo)} camera")


def source_camera(context: bpy.types.Context, settings: AMODAL3R_PG_settings) -> Intrinsics | None:
    """A camera render's intrinsics (the server then fits in exactly that camera), else those of the
    photo's camera from an earlier placement, else the photo's EXIF focal length, else None (the
    server's 50 mm equivalent)."""
    if settings.source_kind != "CAMERA":
        return photo_intrinsics(context, viewpoint_of(context, settings)) or exif_intrinsics(settings.views[0].image)
    intrinsics = scene_intrinsics(context.scene)
    rendered = image_size(settings.views[0].image)
    if (intrinsics.width, intrinsics.height) != rendered:
        raise UserError(
            f"The source render is {rendered[0]}x{rendered[1]} but {context.scene.camera.name!r} now "
            f"renders at {intrinsics.width}x{intrinsics.height}: click Render Camera again"
        )
    return intrinsics


def job_params(settings: AMODAL3R_PG_settings, name: str, camera: Intrinsics | None = None) -> JobParams:
    """The server's settings; a value whose switch is off is left to the pipeline."""
    params = JobParams(
        seed=settings.seed,
        variants=settings.variants,
        multiview=settings.multiview_mode,
        structure_steps=_chosen(settings, "structure_steps"),
        structure_cfg=_chosen(settings, "structure_guidance"),
        slat_steps=_chosen(settings, "slat_steps"),
        slat_cfg=_chosen(settings, "slat_guidance"),
        texture_size=int(settings.texture_size),
        faces=_chosen(settings, "faces"),
        gaussians=settings.gaussians,
        preview=False,
        name=name[:200],
        place=settings.match_photo,
        camera=camera.to_dict() if camera is not None else None,
    )
    try:
        return params.validate()
    except InputError as error:
        raise UserError(f"Check the Settings panel: {error}") from None


# --- progress and results -----------------------------------------------------------------------


def progress_text(status: JobStatus | None) -> str:
    if status is None:
        return "Starting the reconstruction server"
    text = STAGE_TEXT.get(status.stage, status.stage.capitalize() or "Working")
    if status.total:
        text += f" {status.step}/{status.total}"
    if status.eta is not None and status.eta >= 1:
        text += f", about {status.eta:.0f} s left"
    return text


def show_progress(settings: AMODAL3R_PG_settings, status: JobStatus | None) -> None:
    settings.progress = min(max(status.progress, 0.0), 1.0) if status is not None else 0.0
    settings.stage = status.stage if status is not None else ""
    settings.step = status.step if status is not None else 0
    settings.total = status.total if status is not None else 0
    settings.message = progress_text(status)


def redraw_panels() -> None:
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            if area.type in {"VIEW_3D", "IMAGE_EDITOR"}:
                area.tag_redraw()


def server_stopped(backend: Backend) -> bool:
    return backend.settings.mode == LOCAL and not backend.alive()


def import_variants(
    context: bpy.types.Context,
    glb_paths: list[Path],
    name: str,
    location: tuple[float, float, float],
    viewpoint: Viewpoint | None = None,
) -> tuple[list[bpy.types.Object], PlaceReport]:
    """Each variant as its own object at ``location`` (with several, they are numbered), then, with
    a viewpoint, placed by its pose."""
    paths = sorted(glb_paths, key=lambda path: path.name)
    if not paths:
        raise ResultImportError("The server finished without a mesh: run the reconstruction again")
    names = [name] if len(paths) == 1 else [f"{name} {index + 1}" for index in range(len(paths))]
    objects = [
        import_result(context, path, object_name, location) for path, object_name in zip(paths, names, strict=True)
    ]
    if viewpoint is None:
        return objects, PlaceReport()
    return objects, place_variants(context, list(zip(objects, paths, strict=True)), viewpoint)


def show_result(
    settings: AMODAL3R_PG_settings, objects: list[bpy.types.Object], report: PlaceReport, status: JobStatus | None
) -> None:
    """The panel's account of an import: what came in, the server's and placing's notices, placing's errors."""
    settings.progress = 1.0
    settings.message = f"Imported {', '.join(obj.name for obj in objects)}"
    settings.notices = "\n".join([*notices_of(status), *report.notices])
    settings.last_error = "\n".join(report.errors)


def _window_for(scene: bpy.types.Scene) -> bpy.types.Window | None:
    windows = list(bpy.context.window_manager.windows)
    return next((w for w in windows if w.scene == scene), windows[0] if windows else None)


def _import_in_scene(scene: bpy.types.Scene, job: ActiveJob) -> tuple[list[bpy.types.Object], PlaceReport]:
    """Import with a context of a window showing the job's scene (a timer has no window of its own)."""
    window = _window_for(scene)
    paths = glb_paths(job.task.result or [])
    if window is None:
        return import_variants(bpy.context, paths, job.request.name, job.location, job.request.viewpoint)
    with bpy.context.temp_override(window=window, scene=scene):
        return import_variants(bpy.context, paths, job.request.name, job.location, job.request.viewpoint)


def _report_later(message: str) -> None:
    """An error from a timer: the panel shows it; a popup and the console tell at once."""
    print(f"amodal3r: {message}")
    if bpy.app.background:
        return

    def draw(menu: bpy.types.Menu, context: bpy.types.Context) -> None:
        for line in message.splitlines()[:12]:
            menu.layout.label(text=line)

    bpy.context.window_manager.popup_menu(draw, title="Reconstruct occluded object", icon="ERROR")


def _fail(settings: AMODAL3R_PG_settings, message: str, backend: Backend) -> None:
    settings.running = False
    settings.last_error = message
    settings.server_dead = server_stopped(backend)
    settings.message = "The server stopped" if settings.server_dead else "Failed"


def _finish(job: ActiveJob, scene: bpy.types.Scene) -> None:
    """Record how the job ended and import its results."""
    settings = scene.amodal3r
    task = job.task
    settings.running = False
    if task.cancelled:
        settings.message = "Cancelled"
    elif task.error:
        _fail(settings, task.error, job.request.backend)
        _report_later(task.error)
    else:
        try:
            objects, report = _import_in_scene(scene, job)
        except ResultImportError as error:
            _fail(settings, str(error), job.request.backend)
            _report_later(str(error))
        else:
            show_result(settings, objects, report, task.latest)
            push_undo("Reconstruct occluded object")
            if report.errors:
                _report_later(settings.last_error)


def _end_job() -> ActiveJob | None:
    global _job
    job, _job = _job, None
    if job is not None:
        shutil.rmtree(job.request.folder, ignore_errors=True)
    return job


def tick() -> float | None:
    """The timer: mirror the job's progress into the scene; on its end import or report, then stop.

    Returns the seconds until the next call, or None when there is nothing more to follow.
    """
    job = _job
    if job is None:
        return None
    scene = bpy.data.scenes.get(job.scene_name)
    if scene is None or not hasattr(scene, "amodal3r"):  # the scene was deleted: nowhere to put a result
        job.task.cancel()
        _end_job()
        return None
    try:
        if not job.task.done:
            show_progress(scene.amodal3r, job.task.latest)
            return TICK_SECONDS
        _finish(job, scene)
    except Exception:  # noqa: BLE001 - a failing timer would leave the panel stuck on "running"
        scene.amodal3r.running = False
        scene.amodal3r.last_error = f"Reconstruct failed unexpectedly:\n{traceback.format_exc(limit=4)}"
    finally:
        redraw_panels()
    _end_job()
    return None


# --- operators ----------------------------------------------------------------------------------


class AMODAL3R_OT_reconstruct(bpy.types.Operator):
    """Reconstruct the hidden object from the source image and its masks, and import it at the 3D cursor"""

    bl_idname = "amodal3r.reconstruct"
    bl_label = "Reconstruct"
    bl_options: ClassVar[set[str]] = {"REGISTER"}

    mode: EnumProperty(items=MODES, default="AUTO", options={"HIDDEN", "SKIP_SAVE"})  # type: ignore[valid-type]

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return hasattr(context.scene, "amodal3r") and _job is None

    def execute(self, context: bpy.types.Context) -> set[str]:
        settings = get_settings(context)
        folder = Path(tempfile.mkdtemp(prefix="amodal3r-job-"))
        try:
            views = write_views(settings, folder)
            name = object_name(settings.views[0].image)
            camera = source_camera(context, settings) if settings.match_photo else None
            viewpoint = viewpoint_of(context, settings) if settings.match_photo else None
            params = job_params(settings, name, camera)
            backend = get_backend(backend_settings(context))
        except (UserError, InputError, BackendError) as error:
            shutil.rmtree(folder, ignore_errors=True)
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        settings.last_error = settings.notices = ""
        settings.server_dead = False
        request = JobRequest(backend, views, params, name, folder, viewpoint)
        if self.mode == "BLOCKING" or (self.mode == "AUTO" and bpy.app.background):
            return self._run_blocking(context, request)
        self._start(context, request)
        return {"FINISHED"}

    def _start(self, context: bpy.types.Context, request: JobRequest) -> None:
        global _job
        settings = get_settings(context)
        settings.running = True
        show_progress(settings, None)
        task = start_job(request.backend, request.views, request.params, request.folder / "results")
        location = tuple(context.scene.cursor.location)
        _job = ActiveJob(task, request, context.scene.name, location)
        if not bpy.app.timers.is_registered(tick):
            bpy.app.timers.register(tick, first_interval=TICK_SECONDS)
        self.report({"INFO"}, "Reconstruction started: the Amodal3R panel shows its progress")

    def _run_blocking(self, context: bpy.types.Context, request: JobRequest) -> set[str]:
        settings = get_settings(context)
        seen: list[JobStatus] = []

        def progress(status: JobStatus) -> None:
            if not seen or status.stage != seen[-1].stage:
                print(f"amodal3r: {progress_text(status)}", flush=True)
            seen[:] = [status]

        try:
            paths = run_blocking(request.backend, request.views, request.params, request.folder / "results", progress)
            location = tuple(context.scene.cursor.location)
            objects, report = import_variants(context, glb_paths(paths), request.name, location, request.viewpoint)
        except (JobError, BackendError, ResultImportError) as error:
            _fail(settings, str(error), request.backend)
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        finally:
            shutil.rmtree(request.folder, ignore_errors=True)
        show_result(settings, objects, report, seen[-1] if seen else None)
        self.report({"WARNING"} if report.errors else {"INFO"}, "\n".join([settings.message, *report.errors]))
        for notice in settings.notices.splitlines():
            print(f"amodal3r: {notice}", flush=True)
        return {"FINISHED"}


class AMODAL3R_OT_cancel(bpy.types.Operator):
    """Stop the running reconstruction (nothing is imported)"""

    bl_idname = "amodal3r.cancel"
    bl_label = "Cancel"
    bl_options: ClassVar[set[str]] = {"REGISTER"}

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return _job is not None and not _job.task.done

    def execute(self, context: bpy.types.Context) -> set[str]:
        _job.task.cancel()  # type: ignore[union-attr]
        get_settings(context).message = "Cancelling"
        return {"FINISHED"}


@persistent
def _forget_stale_jobs(_file: str) -> None:
    """A newly loaded file gets no result of a job started in another one, and no stale "running"."""
    job = _end_job()
    if job is not None:
        job.task.cancel()
    for scene in bpy.data.scenes:
        settings = getattr(scene, "amodal3r", None)
        if settings is not None and settings.running:
            settings.running = False
            settings.message = ""


classes = (AMODAL3R_OT_reconstruct, AMODAL3R_OT_cancel)
_register, _unregister = bpy.utils.register_classes_factory(classes)


def register() -> None:
    _register()
    bpy.app.handlers.load_post.append(_forget_stale_jobs)


def unregister() -> None:
    if _forget_stale_jobs in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_forget_stale_jobs)
    if bpy.app.timers.is_registered(tick):
        bpy.app.timers.unregister(tick)
    job = _end_job()
    if job is not None:
        job.task.cancel()
    _unregister()

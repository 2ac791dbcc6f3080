# SPDX-License-Identifier: GPL-3.0-or-later
"""Operators that manage the server: Set up backend, Download models, Restart/Stop server.

Long work runs as a ``Task`` in a worker thread; the preferences draw its progress and log, and a
timer redraws them. In background mode (``blender -b``, the bpy module) timers never fire, so the
task runs inline and prints its log instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import bpy

from amodal3r.api.client import Client, ServerError, ServerUnavailable
from amodal3r.api.protocol import SAM_KINDS

from ..core.backend import BackendError, BackendSettings, get_backend, stop_backend
from ..core.backend_setup import SetupError, run_setup
from ..core.server_package import server_install_source
from ..core.tasks import Task
from ..ui import preferences

SETUP_COMMANDS = 6  # the venv plus plan_install's five commands: progress is commands started / this
DOWNLOAD_POLL_SECONDS = 1.0
ONLINE_HINT = "allow Online Access in Preferences > System, then try again"
Work = Callable[[Task[str]], str]  # a backend task's work: its result is the line shown when it ends


def backend_task(title: str, work: Work) -> Task[str]:
    """A task whose expected failures say what to do; in background mode it prints its log."""
    return Task(title, work, expected=(SetupError, BackendError), echo=bpy.app.background)


def _redraw_preferences() -> None:
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            if area.type == "PREFERENCES":
                area.tag_redraw()


def _follow() -> float | None:
    """Timer: redraw the preferences (which show the task) until the task ends."""
    task = preferences.current_task
    _redraw_preferences()
    if task is None:
        return None
    if task.done and task.error:
        print(f"amodal3r: {task.title}: {task.error}")
    return None if task.done else 0.3


def _start(operator: bpy.types.Operator, task: Task[str]) -> set[str]:
    """Run the task inline in background mode (reporting the result), else in a thread a timer follows."""
    preferences.current_task = task
    if bpy.app.background:
        task.run()
        if task.error:
            operator.report({"ERROR"}, task.error)
            return {"CANCELLED"}
        operator.report({"INFO"}, task.result)
        return {"FINISHED"}
    task.start()
    if not bpy.app.timers.is_registered(_follow):
        bpy.app.timers.register(_follow, first_interval=0.2)
    operator.report({"INFO"}, f"{task.title} started: the add-on preferences show its progress")
    return {"FINISHED"}


def _busy(operator: bpy.types.Operator) -> bool:
    task = preferences.current_task
    if task is not None and not task.done:
        operator.report({"WARNING"}, f"{task.title} is still running: wait for it or cancel it")
        return True
    return False


def _setup_work(venv_dir: Path, package: Path) -> Work:
    def work(task: Task[str]) -> str:
        def log(line: str) -> None:
            if line.startswith("$ "):
                task.progress = min(1.0, task.progress + 1.0 / SETUP_COMMANDS)
            task.log(line)

        python = run_setup(venv_dir, package, log, lambda: task.cancel_requested)
        return f"Backend ready: {python}"

    return work


class AMODAL3R_OT_setup_backend(bpy.types.Operator):
    """Install PyTorch and the reconstruction server into a Python environment of this extension"""

    bl_idname = "amodal3r.setup_backend"
    bl_label = "Set up Backend"

    def execute(self, context: bpy.types.Context) -> set[str]:
        if not bpy.app.online_access:
            self.report({"ERROR"}, f"Set up backend downloads PyTorch (several GB): {ONLINE_HINT}")
            return {"CANCELLED"}
        if _busy(self):
            return {"CANCELLED"}
        package = server_install_source()
        if package is None:
            self.report({"ERROR"}, "The extension has no server package (wheels/): reinstall the extension")
            return {"CANCELLED"}
        prefs = preferences.get_preferences(context)
        if prefs.server_python:
            self.report({"WARNING"}, "Server Python is set, so the new environment is not used until you clear it")
        stop_backend()  # the running server uses the environment about to change
        venv_dir = preferences.default_venv_dir()
        return _start(self, backend_task("Set up backend", _setup_work(venv_dir, package)))


def wanted_components(sam_kind: str) -> list[str]:
    """The pipeline, its image encoder and the one SAM the panel uses: not every SAM (4 GB together)."""
    return ["amodal3r", "dinov2", f"sam_{sam_kind}"]


def _components_missing(client: Client, wanted: list[str]) -> list[str]:
    components = client.models()["components"]
    return [c["name"] for c in components if c["name"] in wanted and not c.get("present")]


def _download_text(status: dict) -> str:
    progress = status.get("progress") or {}
    what = progress.get("file") or progress.get("component") or ""
    if progress.get("bytes_total"):
        return f"Downloading {what} {progress['bytes_done'] / 2**20:.0f} / {progress['bytes_total'] / 2**20:.0f} MB"
    return f"Downloading {what}".rstrip()


def _download_work(settings: BackendSettings, wanted: list[str]) -> Work:
    def work(task: Task[str]) -> str:
        task.log("starting the server to download through it")
        client = get_backend(settings).client(require_model=False)
        try:
            return _download(client, task, settings.model_dir, wanted)
        except (ServerError, ServerUnavailable) as error:
            raise BackendError(f"The model download stopped: {error}. Try Download models again") from None

    return work


def _download(client: Client, task: Task[str], model_dir: str, wanted: list[str]) -> str:
    missing = _components_missing(client, wanted)
    if not missing:
        return "All models are present"
    task.log(f"downloading {', '.join(missing)}")
    status = client.download_models(missing)
    while status.get("state") == "running" and not task.cancel_requested:
        time.sleep(DOWNLOAD_POLL_SECONDS)
        status = client.download_status()
        progress = status.get("progress") or {}
        if progress.get("bytes_total"):
            task.progress = progress.get("bytes_done", 0) / progress["bytes_total"]
        task.status = _download_text(status)
    if task.cancel_requested:
        return "Stopped following the download; the server finishes it in the background"
    if status.get("state") != "done":
        raise BackendError(
            f"The model download failed: {status.get('error') or status}. "
            "Check the internet connection and disk space, then try again"
        )
    return f"Models downloaded into {client.models().get('model_dir', model_dir)}"


class AMODAL3R_OT_download_models(bpy.types.Operator):
    """Download the Amodal3R pipeline, DINOv2 and the panel's segmentation model through the server"""

    bl_idname = "amodal3r.download_models"
    bl_label = "Download Models"

    def execute(self, context: bpy.types.Context) -> set[str]:
        if not bpy.app.online_access:
            self.report({"ERROR"}, f"Downloading models needs the internet: {ONLINE_HINT}")
            return {"CANCELLED"}
        if _busy(self):
            return {"CANCELLED"}
        try:
            settings = preferences.real_models_settings(context)
        except BackendError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        scene_settings = getattr(context.scene, "amodal3r", None)
        wanted = wanted_components(scene_settings.sam_model if scene_settings is not None else SAM_KINDS[0])
        return _start(self, backend_task("Download models", _download_work(settings, wanted)))


class AMODAL3R_OT_restart_server(bpy.types.Operator):
    """Stop the reconstruction server and start it again with the current preferences"""

    bl_idname = "amodal3r.restart_server"
    bl_label = "Restart Server"

    def execute(self, context: bpy.types.Context) -> set[str]:
        if _busy(self):
            return {"CANCELLED"}
        backend = get_backend(preferences.backend_settings(context))

        def work(task: Task[str]) -> str:
            backend.stop()
            task.log("starting the server")
            backend.client().health()
            return backend.status_text().splitlines()[0]

        return _start(self, backend_task("Restart server", work))


class AMODAL3R_OT_stop_server(bpy.types.Operator):
    """Stop the local reconstruction server (it starts again with the next job)"""

    bl_idname = "amodal3r.stop_server"
    bl_label = "Stop Server"

    def execute(self, context: bpy.types.Context) -> set[str]:
        stop_backend()
        self.report({"INFO"}, "Reconstruction server stopped")
        return {"FINISHED"}


class AMODAL3R_OT_cancel_task(bpy.types.Operator):
    """Stop Set up backend, or stop following a model download"""

    bl_idname = "amodal3r.cancel_task"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        task = preferences.current_task
        return task is not None and not task.done

    def execute(self, context: bpy.types.Context) -> set[str]:
        preferences.current_task.cancel()  # type: ignore[union-attr]
        return {"FINISHED"}


classes = (
    AMODAL3R_OT_setup_backend,
    AMODAL3R_OT_download_models,
    AMODAL3R_OT_restart_server,
    AMODAL3R_OT_stop_server,
    AMODAL3R_OT_cancel_task,
)
_register, _unregister = bpy.utils.register_classes_factory(classes)


def register() -> None:
    _register()


def unregister() -> None:
    if preferences.current_task is not None:
        preferences.current_task.cancel()
    if bpy.app.timers.is_registered(_follow):
        bpy.app.timers.unregister(_follow)
    stop_backend()
    _unregister()

# SPDX-License-Identifier: GPL-3.0-or-later
"""Add-on preferences: which server to use (local or remote), its Python, models and device.

Empty paths mean the defaults inside the extension's user folder, where Set up backend and
Download models put things. The environment variables ``amodal3r.api.environment`` names
(``AMODAL3R_SERVER_PYTHON``, ``AMODAL3R_MODEL``) override the server Python and the model folder
(tests, render farms, pipelines).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import bpy
from bpy.props import EnumProperty, StringProperty

from amodal3r.api.environment import MODEL, SERVER_PYTHON

from ..core.backend import LOCAL, REMOTE, BackendError, BackendSettings, current_backend, holds_random_weights
from ..core.backend_setup import venv_python
from ..core.tasks import Task

ADDON = __package__.rpartition(".")[0]  # the add-on's package: Blender keys its preferences and user folders by it
LOG_LINES_SHOWN = 8

# The backend task (Set up backend, Download models, Restart server) running or last run, started
# by operators.backend, drawn here with its log. Plain Python, so a task cut short by quitting
# Blender is not saved as still running.
current_task: Task[str] | None = None


def user_dir(name: str, package: str = ADDON, create: bool = False) -> Path:
    """A folder of this extension's user data (kept across extension updates)."""
    return Path(bpy.utils.extension_path_user(package, path=name, create=create))


def default_venv_dir(package: str = ADDON) -> Path:
    return user_dir("backend", package)


def default_python(package: str = ADDON) -> str:
    return str(venv_python(default_venv_dir(package)))


def default_model_dir(package: str = ADDON) -> str:
    return str(user_dir("models", package))


def _path(text: str) -> str:
    return os.path.expanduser(bpy.path.abspath(text)) if text.strip() else ""


class AMODAL3R_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON

    backend_mode: EnumProperty(  # type: ignore[valid-type]
        name="Server",
        items=[
            ("LOCAL", "Local", "Run the reconstruction server on this computer"),
            ("REMOTE", "Remote", "Use a reconstruction server running elsewhere"),
        ],
        default="LOCAL",
    )
    server_python: StringProperty(  # type: ignore[valid-type]
        name="Server Python",
        subtype="FILE_PATH",
        description="Python with PyTorch and the amodal3r package. Empty: the one Set up backend installs",
    )
    model_dir: StringProperty(  # type: ignore[valid-type]
        name="Model Folder",
        subtype="DIR_PATH",
        description="Folder with pipeline.json and the checkpoints. Empty: where Download models saves them",
    )
    device: EnumProperty(  # type: ignore[valid-type]
        name="Device",
        items=[
            ("AUTO", "Auto", "The best device available: CUDA, then MPS, then CPU"),
            ("CPU", "CPU", "The processor (slow, always works)"),
            ("CUDA", "CUDA", "An NVIDIA GPU"),
            ("MPS", "MPS", "Apple silicon GPU"),
        ],
        default="AUTO",
    )
    remote_url: StringProperty(  # type: ignore[valid-type]
        name="URL",
        description="Address of the server, e.g. http://192.168.1.20:8765",
    )
    remote_token: StringProperty(  # type: ignore[valid-type]
        name="Token",
        subtype="PASSWORD",
        description="The server's token (its AMODAL3R_TOKEN)",
    )

    def draw(self, context: bpy.types.Context) -> None:
        draw_preferences(self, self.layout)


def draw_preferences(prefs: AMODAL3R_AddonPreferences, layout: bpy.types.UILayout) -> None:
    """The preferences panel (a function, so tests can draw into a recording layout)."""
    layout.row().prop(prefs, "backend_mode", expand=True)
    if prefs.backend_mode == "LOCAL":
        _draw_local(prefs, layout)
    else:
        col = layout.column()
        col.prop(prefs, "remote_url")
        col.prop(prefs, "remote_token")
    row = layout.row()
    row.operator("amodal3r.restart_server", icon="FILE_REFRESH")
    row.operator("amodal3r.stop_server", icon="CANCEL")
    backend = current_backend()
    if backend is not None:
        layout.label(text=backend.status_text().splitlines()[0])
    _draw_task(layout)


def _draw_local(prefs: AMODAL3R_AddonPreferences, layout: bpy.types.UILayout) -> None:
    col = layout.column()
    col.prop(prefs, "server_python")
    if not prefs.server_python:
        col.label(text=f"Using {default_python()}", icon="INFO")
    col.prop(prefs, "model_dir")
    if not prefs.model_dir:
        col.label(text=f"Using {default_model_dir()}", icon="INFO")
    col.prop(prefs, "device")
    row = layout.row()
    row.enabled = current_task is None or current_task.done
    row.operator("amodal3r.setup_backend", icon="CONSOLE")
    row.operator("amodal3r.download_models", icon="IMPORT")
    if not bpy.app.online_access:
        layout.label(text="Set up and downloads need Online Access (Preferences > System)", icon="ERROR")


def _draw_task(layout: bpy.types.UILayout) -> None:
    task = current_task
    if task is not None and not task.done:
        row = layout.row()
        row.progress(factor=task.progress, text=task.status[:120] or task.title)
        row.operator("amodal3r.cancel_task", text="", icon="X")
    elif task is not None:
        outcome = task.error or task.result or ""
        layout.label(text=f"{task.title}: {outcome}"[:200], icon="ERROR" if task.error else "CHECKMARK")
    if task is not None and task.lines:
        box = layout.box().column(align=True)
        for line in list(task.lines)[-LOG_LINES_SHOWN:]:
            box.label(text=line[:200])


def get_preferences(context: bpy.types.Context | None = None) -> AMODAL3R_AddonPreferences:
    """This add-on's preferences (the add-on must be enabled)."""
    return (context or bpy.context).preferences.addons[ADDON].preferences


def backend_settings(context: bpy.types.Context | None = None) -> BackendSettings:
    """The server to use, from the preferences and the environment overrides."""
    prefs = get_preferences(context)
    return BackendSettings(
        mode=LOCAL if prefs.backend_mode == "LOCAL" else REMOTE,
        python=os.environ.get(SERVER_PYTHON) or _path(prefs.server_python) or default_python(),
        model_dir=os.environ.get(MODEL) or _path(prefs.model_dir) or default_model_dir(),
        data_dir=str(user_dir("server-data", create=True)),
        url=prefs.remote_url.strip(),
        token=prefs.remote_token.strip(),
        device=prefs.device.lower(),
        online_access=bpy.app.online_access,
    )


def real_models_settings(context: bpy.types.Context | None = None) -> BackendSettings:
    """The server Download models goes through. A model folder of tiny random weights is left alone:
    the real models go into the default folder, which the preferences then use (Model Folder cleared)."""
    settings = backend_settings(context)
    if settings.mode != LOCAL or not holds_random_weights(settings.model_dir):
        return settings
    if os.environ.get(MODEL):
        raise BackendError(
            f"{MODEL} points at {settings.model_dir}, a folder of tiny random weights: unset it (or point it "
            "at the real models) and restart Blender, then Download models"
        )
    default = default_model_dir()
    if Path(default).resolve() == Path(settings.model_dir).resolve():
        raise BackendError(f"{default} holds tiny random weights: delete that folder, then Download models")
    get_preferences(context).model_dir = ""
    return replace(settings, model_dir=default)


register, unregister = bpy.utils.register_classes_factory((AMODAL3R_AddonPreferences,))

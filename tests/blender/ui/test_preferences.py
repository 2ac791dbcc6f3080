# SPDX-License-Identifier: GPL-3.0-or-later
"""The add-on preferences in the bpy module: which server Python and model folder they choose
(defaults in the extension's user folder, environment overrides), and what they draw."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import MagicMock

import bpy
import pytest
from addon_helpers import module

from amodal3r.api.environment import MODEL, SERVER_PYTHON

EXTENSION_ID, REPO_MODULE = "amodal3r", "user_default"


def test_backend_settings_defaults_and_overrides(addon, blender_user_dir, monkeypatch):
    preferences = module(addon, "ui.preferences")
    monkeypatch.delenv(SERVER_PYTHON, raising=False)
    monkeypatch.delenv(MODEL, raising=False)
    settings = preferences.backend_settings(bpy.context)
    user = blender_user_dir / "extensions" / ".user" / REPO_MODULE / EXTENSION_ID
    assert settings.mode == "local" and settings.device == "auto"
    assert Path(settings.python).is_relative_to(user / "backend")
    assert Path(settings.model_dir) == user / "models"
    assert Path(settings.data_dir) == user / "server-data" and Path(settings.data_dir).is_dir()
    monkeypatch.setenv(SERVER_PYTHON, "/opt/py/bin/python")
    monkeypatch.setenv(MODEL, "/opt/models")
    settings = preferences.backend_settings(bpy.context)
    assert (settings.python, settings.model_dir) == ("/opt/py/bin/python", "/opt/models")


def _drawn(layout: MagicMock) -> str:
    return "\n".join(str(c) for c in layout.mock_calls)


def test_preferences_draw(addon):
    preferences = module(addon, "ui.preferences")
    prefs = preferences.get_preferences(bpy.context)
    layout = MagicMock()
    preferences.draw_preferences(prefs, layout)
    drawn = _drawn(layout)
    for idname in ("setup_backend", "download_models", "restart_server", "stop_server"):
        assert f"'amodal3r.{idname}'" in drawn
    assert "'server_python'" in drawn and "'model_dir'" in drawn and "'remote_url'" not in drawn
    prefs.backend_mode = "REMOTE"
    try:
        layout = MagicMock()
        preferences.draw_preferences(prefs, layout)
        assert "'remote_url'" in _drawn(layout) and "'setup_backend'" not in _drawn(layout)
    finally:
        prefs.backend_mode = "LOCAL"


def test_real_models_never_go_into_a_folder_of_random_weights(addon, tiny_model_dir, monkeypatch, tmp_path):
    """Tiny random weights count as present, so Download models would keep them: the real models go
    into the default folder instead, which the preferences then use."""
    preferences = module(addon, "ui.preferences")
    errors = module(addon, "core.backend")
    prefs = preferences.get_preferences(bpy.context)
    monkeypatch.delenv(MODEL, raising=False)
    real = tmp_path / "real"
    real.mkdir()
    (real / "pipeline.json").write_text('{"name": "Amodal3RImageTo3DPipeline", "args": {"models": {}}}')
    try:
        prefs.model_dir = str(real)
        assert preferences.real_models_settings(bpy.context).model_dir == str(real) and prefs.model_dir == str(real)
        prefs.model_dir = str(tiny_model_dir)
        settings = preferences.real_models_settings(bpy.context)
        assert settings.model_dir == preferences.default_model_dir() and prefs.model_dir == ""
        monkeypatch.setattr(preferences, "default_model_dir", lambda package=None: str(tiny_model_dir))
        with pytest.raises(errors.BackendError, match="holds tiny random weights: delete that folder"):
            preferences.real_models_settings(bpy.context)
        monkeypatch.setenv(MODEL, str(tiny_model_dir))
        with pytest.raises(errors.BackendError, match=f"{MODEL} points at .*: unset it"):
            preferences.real_models_settings(bpy.context)
    finally:
        prefs.model_dir = ""

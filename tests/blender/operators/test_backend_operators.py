# SPDX-License-Identifier: GPL-3.0-or-later
"""The server operators in the bpy module: Set up backend and Download models need Online Access,
Restart and Stop server, and the model download as a backend task (against a stand-in and against
the real server with a loopback Hub)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import bpy
import pytest
from addon_helpers import module

from amodal3r.api.environment import MODEL, SERVER_PYTHON


@pytest.mark.parametrize("operator", ["setup_backend", "download_models"])
def test_downloads_need_online_access(addon, operator):
    assert not bpy.app.online_access  # the module starts offline, like a fresh Blender
    with pytest.raises(RuntimeError, match=r"Online Access in Preferences > System"):
        getattr(bpy.ops.amodal3r, operator)()


def test_restart_and_stop_server(addon, server_env):
    backend = module(addon, "core.backend")
    assert bpy.ops.amodal3r.restart_server() == {"FINISHED"}
    running = backend.current_backend()
    assert running is not None and running.alive()
    assert bpy.ops.amodal3r.stop_server() == {"FINISHED"}
    assert backend.current_backend() is None and not running.alive()


def test_restart_without_models_says_what_to_do(addon, monkeypatch, server_python, tmp_path):
    monkeypatch.setenv(SERVER_PYTHON, server_python)
    monkeypatch.setenv(MODEL, str(tmp_path / "no-models"))
    with pytest.raises(RuntimeError, match="Download models or set the model folder"):
        bpy.ops.amodal3r.restart_server()


class FakeModelServer:
    """The model routes of a server whose download takes two polls."""

    def __init__(self):
        self.requested: list[str] = []
        self.polls = [
            {
                "state": "running",
                "progress": {"file": "ss_flow.safetensors", "bytes_done": 2 * 2**20, "bytes_total": 4 * 2**20},
            },
            {"state": "done", "progress": None},
        ]

    def models(self):
        return {
            "model_dir": "/models",
            "components": [
                {"name": "amodal3r", "present": False},
                {"name": "dinov2", "present": True},
                {"name": "sam_vit_h", "present": False},
                {"name": "sam_vit_b", "present": True},
            ],
        }

    def download_models(self, components):
        self.requested = components
        return {"state": "running"}

    def download_status(self):
        return self.polls.pop(0)


def test_download_follows_the_server(addon, monkeypatch):
    ops_backend = module(addon, "operators.backend")
    monkeypatch.setattr(ops_backend, "DOWNLOAD_POLL_SECONDS", 0.0)
    server = FakeModelServer()
    wanted = ops_backend.wanted_components("vit_b")
    task = ops_backend.backend_task(
        "Download models", lambda task: ops_backend._download(server, task, "/models", wanted)
    ).run()
    assert task.result == "Models downloaded into /models", task.error
    assert server.requested == ["amodal3r"]
    assert task.progress == 0.5


def test_download_through_a_real_server(addon, server_env, monkeypatch, tiny_model_dir, tmp_path):
    """The add-on's download against the real server and a loopback stand-in for the Hub: only the
    missing components the panel needs are asked for, and the real progress replies are understood."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    from loopback_files import serve_files

    ops_backend = module(addon, "operators.backend")
    backend_module = module(addon, "core.backend")
    preferences = module(addon, "ui.preferences")
    model = tmp_path / "model"
    (model / "sam").mkdir(parents=True)
    for name in ("image_encoder.json", "dinov2_vitl14_reg4_pretrain.safetensors"):
        shutil.copy(tiny_model_dir / name, model / name)
    (model / "sam" / "sam_vit_b_01ec64.pth").write_bytes(b"already here")
    monkeypatch.setenv(MODEL, str(model))
    monkeypatch.setattr(ops_backend, "DOWNLOAD_POLL_SECONDS", 0.02)
    with serve_files() as hub:
        for file in tiny_model_dir.rglob("*"):
            if file.is_file():
                hub.files[f"/Sm0kyWu/Amodal3R/resolve/main/{file.relative_to(tiny_model_dir)}"] = file.read_bytes()
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        settings = dataclasses.replace(preferences.backend_settings(bpy.context), data_dir=str(tmp_path / "data"))
        backend = backend_module.Backend(settings)
        try:
            client = backend.client(require_model=False)
            wanted = ops_backend.wanted_components("vit_b")
            task = ops_backend.backend_task(
                "Download models", lambda task: ops_backend._download(client, task, str(model), wanted)
            ).run()
            assert task.result == f"Models downloaded into {model}", task.error
            present = {c["name"] for c in client.models()["components"] if c["present"]}
            assert {"amodal3r", "dinov2", "sam_vit_b"} <= present and "sam_vit_h" not in present
            assert any(path.startswith("/Sm0kyWu/Amodal3R/") for path, _ in hub.requests)
            assert not any("sam" in path or "dinov2" in path for path, _ in hub.requests)
        finally:
            backend.stop()

# SPDX-License-Identifier: GPL-3.0-or-later
"""The built extension: zip contents, Blender's validation, install / enable / disable / uninstall."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from unittest.mock import MagicMock

import bpy
import pytest

REPO = Path(__file__).resolve().parents[2]
EXTENSION_ID, REPO_MODULE = "amodal3r", "user_default"
SERVER_VERSION = re.search(r'__version__ = "([^"]+)"', (REPO / "server/amodal3r/__init__.py").read_text()).group(1)
WHEEL = f"wheels/amodal3r-{SERVER_VERSION}-py3-none-any.whl"
BLENDER_EXT = Path(bpy.utils.system_resource("SCRIPTS")) / "addons_core/bl_pkg/cli/blender_ext.py"
OUR_OPERATORS = {"setup_backend", "download_models", "restart_server", "stop_server", "cancel_task"}
RNA_TYPES = ("Scene", "Object", "WindowManager", "Image", "Mesh", "Material", "Collection", "SpaceImageEditor")


def _wheel_bytes(zip_path: Path) -> bytes:
    with zipfile.ZipFile(zip_path) as archive:
        return archive.read(WHEEL)


def test_zip_holds_the_addon_manifest_and_wheel(extension_zip):
    names = set(zipfile.ZipFile(extension_zip).namelist())
    addon_files = {p.name for p in (REPO / "amodal3r_blender").glob("*.py")}
    assert {"blender_manifest.toml", WHEEL} <= names
    assert addon_files <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or n.startswith(("tests/", "."))]
    assert extension_zip.name == f"{EXTENSION_ID}-{SERVER_VERSION}.zip"


def test_blender_validates_the_zip(extension_zip):
    result = subprocess.run([sys.executable, str(BLENDER_EXT), "validate", str(extension_zip)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_manifest_matches_the_server_package():
    manifest = tomllib.loads((REPO / "blender_manifest.toml").read_text())
    assert manifest["version"] == SERVER_VERSION
    assert manifest["wheels"] == [f"./{WHEEL}"]
    assert manifest["tagline"][-1] not in ".!?,;:"
    assert all(len(reason) <= 64 and reason[-1].isalnum() for reason in manifest["permissions"].values())


def test_wheel_record_and_metadata(extension_zip):
    wheel = zipfile.ZipFile(io.BytesIO(_wheel_bytes(extension_zip)))
    dist_info = f"amodal3r-{SERVER_VERSION}.dist-info"
    rows = list(csv.reader(io.StringIO(wheel.read(f"{dist_info}/RECORD").decode())))
    assert {row[0] for row in rows} == set(wheel.namelist())
    for name, digest, size in rows:
        if name.endswith("RECORD"):
            continue
        data = wheel.read(name)
        assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert int(size) == len(data)
    metadata = wheel.read(f"{dist_info}/METADATA").decode()
    assert f"Version: {SERVER_VERSION}" in metadata and "Requires-Dist: torch" in metadata
    assert "Root-Is-Purelib: true" in wheel.read(f"{dist_info}/WHEEL").decode()
    assert {"amodal3r/client.py", "amodal3r/protocol.py", "amodal3r/server.py"} <= set(wheel.namelist())


def test_wheel_installs_with_pip(extension_zip, tmp_path):
    wheel = tmp_path / Path(WHEEL).name
    wheel.write_bytes(_wheel_bytes(extension_zip))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    probe = "import amodal3r.api.client, amodal3r.api.protocol; print(amodal3r.api.client.__file__)"
    found = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(target)},
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(found).is_relative_to(target)


def test_build_is_reproducible(extension_zip, tmp_path):
    script = REPO / "scripts" / "build_extension.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    assert _wheel_bytes(tmp_path / extension_zip.name) == _wheel_bytes(extension_zip)


def test_build_without_bpy_says_what_to_do(tmp_path):
    script = REPO / "scripts" / "build_extension.py"
    result = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--bpy-python",
                             str(tmp_path / "python")], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "no bpy package" in result.stderr and "--bpy-python" in result.stderr


# The whole life of the extension in a fresh Blender: its output must hold no error.
LIFECYCLE = r"""
import json, sys
from pathlib import Path
import bpy

zip_path, module, repo_module, pkg_id, rna_types = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
props = lambda: {t: set(getattr(bpy.types, t).bl_rna.properties.keys()) for t in rna_types}
ops = lambda: set(dir(bpy.ops.amodal3r))
before_props, before_ops = props(), ops()
bpy.ops.extensions.package_install_files(filepath=zip_path, repo=repo_module, enable_on_install=True)
enabled = module in bpy.context.preferences.addons
addon = sys.modules[module]
classes = [c for name in addon.MODULES for c in vars(sys.modules[f"{module}.{name}"]).values()
           if isinstance(c, type) and issubclass(c, bpy.types.bpy_struct) and c.__module__.startswith(module)]
import amodal3r.api.client
report = {
    "enabled": enabled,
    "ops": sorted(ops() - before_ops),
    "ops_callable": sorted(n for n in ops() - before_ops if getattr(bpy.ops.amodal3r, n).get_rna_type()),
    "props_added": {t: sorted(v - before_props[t]) for t, v in props().items()},
    "unregistered_classes": [c.__name__ for c in classes if not c.is_registered],
    "class_count": len(classes),
    "client_from": amodal3r.api.client.__file__,
    "bundled_wheel": str(sys.modules[f"{module}.server_package"].server_wheel()),
}
bpy.ops.preferences.addon_disable(module=module)
report["ops_left"] = sorted(ops() - before_ops)
report["props_left"] = {t: sorted(v - before_props[t]) for t, v in props().items()}
report["still_registered"] = [c.__name__ for c in classes if c.is_registered]
repo = next(r for r in bpy.context.preferences.extensions.repos if r.module == repo_module)
bpy.ops.extensions.package_uninstall(repo_directory=repo.directory, pkg_id=pkg_id)
report["package_left"] = (Path(repo.directory) / pkg_id).exists()
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def lifecycle(extension_zip, tmp_path_factory) -> tuple[dict, str]:
    work = tmp_path_factory.mktemp("lifecycle")
    module = f"bl_ext.{REPO_MODULE}.{EXTENSION_ID}"
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(work / "user")}
    result = subprocess.run([sys.executable, "-c", LIFECYCLE, str(extension_zip), module, REPO_MODULE, EXTENSION_ID,
                             *RNA_TYPES], capture_output=True, text=True, cwd=work, env=env, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    report = json.loads(next(line for line in output.splitlines() if line.startswith("REPORT "))[7:])
    return report, output.replace(next(line for line in output.splitlines() if line.startswith("REPORT ")), "")


def test_enable_registers_everything(lifecycle):
    report, _ = lifecycle
    assert report["enabled"]
    assert set(report["ops"]) >= OUR_OPERATORS
    assert report["ops_callable"] == report["ops"]
    assert report["class_count"] >= len(OUR_OPERATORS) + 1 and report["unregistered_classes"] == []


def test_installed_addon_uses_the_bundled_wheel(lifecycle):
    report, _ = lifecycle
    assert "/extensions/.local/" in report["client_from"].replace(os.sep, "/")
    assert report["bundled_wheel"].endswith(Path(WHEEL).name)


def test_disable_and_uninstall_leave_nothing(lifecycle):
    report, output = lifecycle
    assert report["ops_left"] == [] and report["still_registered"] == []
    assert all(not left for left in report["props_left"].values()), report["props_left"]
    assert not report["package_left"]
    noise = [line for line in output.splitlines() if re.search(r"error|exception|traceback|warning", line, re.IGNORECASE)]
    assert noise == [], output


# --- in this process: the add-on from the session fixture ---------------------------------------


def _addon_module(addon: str, name: str):
    return sys.modules[f"{addon}.{name}"]


def test_backend_settings_defaults_and_overrides(addon, blender_user_dir, monkeypatch):
    preferences = _addon_module(addon, "preferences")
    monkeypatch.delenv("AMODAL3R_SERVER_PYTHON", raising=False)
    monkeypatch.delenv("AMODAL3R_MODEL", raising=False)
    settings = preferences.backend_settings(bpy.context)
    user = blender_user_dir / "extensions" / ".user" / REPO_MODULE / EXTENSION_ID
    assert settings.mode == "local" and settings.device == "auto"
    assert Path(settings.python).is_relative_to(user / "backend")
    assert Path(settings.model_dir) == user / "models"
    assert Path(settings.data_dir) == user / "server-data" and Path(settings.data_dir).is_dir()
    monkeypatch.setenv("AMODAL3R_SERVER_PYTHON", "/opt/py/bin/python")
    monkeypatch.setenv("AMODAL3R_MODEL", "/opt/models")
    settings = preferences.backend_settings(bpy.context)
    assert (settings.python, settings.model_dir) == ("/opt/py/bin/python", "/opt/models")


def _drawn(layout: MagicMock) -> str:
    return "\n".join(str(c) for c in layout.mock_calls)


def test_preferences_draw(addon):
    preferences = _addon_module(addon, "preferences")
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


@pytest.mark.parametrize("operator", ["setup_backend", "download_models"])
def test_downloads_need_online_access(addon, operator):
    assert not bpy.app.online_access  # the module starts offline, like a fresh Blender
    with pytest.raises(RuntimeError, match=r"Online Access in Preferences > System"):
        getattr(bpy.ops.amodal3r, operator)()


def test_restart_and_stop_server(addon, server_env):
    backend = _addon_module(addon, "backend")
    assert bpy.ops.amodal3r.restart_server() == {"FINISHED"}
    running = backend.current_backend()
    assert running is not None and running.alive()
    assert bpy.ops.amodal3r.stop_server() == {"FINISHED"}
    assert backend.current_backend() is None and not running.alive()


def test_restart_without_models_says_what_to_do(addon, monkeypatch, server_python, tmp_path):
    monkeypatch.setenv("AMODAL3R_SERVER_PYTHON", server_python)
    monkeypatch.setenv("AMODAL3R_MODEL", str(tmp_path / "no-models"))
    with pytest.raises(RuntimeError, match="Download models or set the model folder"):
        bpy.ops.amodal3r.restart_server()


class FakeModelServer:
    """The model routes of a server whose download takes two polls."""

    def __init__(self):
        self.requested: list[str] = []
        self.polls = [{"state": "running", "progress": {"file": "ss_flow.safetensors", "bytes_done": 2 * 2**20,
                                                        "bytes_total": 4 * 2**20}},
                      {"state": "done", "progress": None}]

    def models(self):
        return {"model_dir": "/models", "components": [
            {"name": "amodal3r", "present": False}, {"name": "dinov2", "present": True},
            {"name": "sam_vit_h", "present": False}, {"name": "sam_vit_b", "present": True}]}

    def download_models(self, components):
        self.requested = components
        return {"state": "running"}

    def download_status(self):
        return self.polls.pop(0)


def test_download_follows_the_server(addon, monkeypatch):
    ops_backend = _addon_module(addon, "ops_backend")
    monkeypatch.setattr(ops_backend, "DOWNLOAD_POLL_SECONDS", 0.0)
    task = ops_backend._Task("Download models", echo=False)
    server = FakeModelServer()
    wanted = ops_backend.wanted_components("vit_b")
    assert ops_backend._download(server, task, "/models", wanted) == "Models downloaded into /models"
    assert server.requested == ["amodal3r"]
    assert task.progress == 0.5


def test_download_through_a_real_server(addon, server_env, monkeypatch, tiny_model_dir, tmp_path):
    """The add-on's download against the real server and a loopback stand-in for the Hub: only the
    missing components the panel needs are asked for, and the real progress replies are understood."""
    import dataclasses
    import shutil

    monkeypatch.syspath_prepend(str(REPO / "tests"))
    from loopback_files import serve_files

    ops_backend = _addon_module(addon, "ops_backend")
    backend_module = _addon_module(addon, "backend")
    preferences = _addon_module(addon, "preferences")
    model = tmp_path / "model"
    (model / "sam").mkdir(parents=True)
    for name in ("image_encoder.json", "dinov2_vitl14_reg4_pretrain.safetensors"):
        shutil.copy(tiny_model_dir / name, model / name)
    (model / "sam" / "sam_vit_b_01ec64.pth").write_bytes(b"already here")
    monkeypatch.setenv("AMODAL3R_MODEL", str(model))
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
            task = ops_backend._Task("Download models", echo=False)
            wanted = ops_backend.wanted_components("vit_b")
            assert ops_backend._download(client, task, str(model), wanted) == f"Models downloaded into {model}"
            present = {c["name"] for c in client.models()["components"] if c["present"]}
            assert {"amodal3r", "dinov2", "sam_vit_b"} <= present and "sam_vit_h" not in present
            assert any(path.startswith("/Sm0kyWu/Amodal3R/") for path, _ in hub.requests)
            assert not any("sam" in path or "dinov2" in path for path, _ in hub.requests)
        finally:
            backend.stop()

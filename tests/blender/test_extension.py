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
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import bpy
import pytest

REPO = Path(__file__).resolve().parents[2]
ADDON = REPO / "amodal3r_blender"
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
    addon_files = {p.relative_to(ADDON).as_posix() for p in ADDON.rglob("*.py")}
    assert {"blender_manifest.toml", WHEEL} <= names
    assert addon_files <= names and {"core/tasks.py", "operators/reconstruct.py", "ui/panels.py"} <= addon_files
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or n.startswith(("tests/", "."))]
    assert extension_zip.name == f"{EXTENSION_ID}-{SERVER_VERSION}.zip"


def test_blender_validates_the_zip(extension_zip):
    result = subprocess.run(
        [sys.executable, str(BLENDER_EXT), "validate", str(extension_zip)], capture_output=True, text=True, check=False
    )
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
    assert {"amodal3r/api/client.py", "amodal3r/api/protocol.py", "amodal3r/service/app.py"} <= set(wheel.namelist())


def test_wheel_installs_with_pip(extension_zip, tmp_path):
    wheel = tmp_path / Path(WHEEL).name
    wheel.write_bytes(_wheel_bytes(extension_zip))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = "import amodal3r.api.client, amodal3r.api.protocol; print(amodal3r.api.client.__file__)"
    found = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PYTHONPATH": str(target)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(found).is_relative_to(target)


def test_build_is_reproducible(extension_zip, tmp_path):
    # Two builds of the same sources (the session's zip is minutes old: the server may have changed since),
    # more than a zip timestamp's two seconds apart, so a clock leaking into the wheel would show.
    script = REPO / "scripts" / "build_extension.py"
    for out in ("first", "second"):
        subprocess.run([sys.executable, str(script), "--out", str(tmp_path / out)], check=True, capture_output=True)
        time.sleep(2.1 if out == "first" else 0)
    first, second = (_wheel_bytes(tmp_path / out / extension_zip.name) for out in ("first", "second"))
    assert first == second


def test_build_without_bpy_says_what_to_do(tmp_path):
    script = REPO / "scripts" / "build_extension.py"
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path), "--bpy-python", str(tmp_path / "python")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "no bpy package" in result.stderr and "--bpy-python" in result.stderr


def test_build_refuses_a_folder_that_is_not_a_package(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import build_extension

    stage = tmp_path / "stage"
    shutil.copytree(ADDON, stage, ignore=build_extension.SKIP)
    build_extension.check_packages(stage)
    (stage / "ui" / "__init__.py").unlink()
    with pytest.raises(build_extension.BuildError, match="without __init__.py: ui"):
        build_extension.check_packages(stage)


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
    "bundled_wheel": str(sys.modules[f"{module}.core.server_package"].server_wheel()),
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


def run_lifecycle(python: str, zip_path: Path, work: Path) -> tuple[dict, str]:
    """LIFECYCLE in a fresh Blender of that Python, with its own user folder: (report, other output)."""
    module = f"bl_ext.{REPO_MODULE}.{EXTENSION_ID}"
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(work / "user")}
    result = subprocess.run(
        [python, "-c", LIFECYCLE, str(zip_path), module, REPO_MODULE, EXTENSION_ID, *RNA_TYPES],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    line = next(line for line in output.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT ") :]), output.replace(line, "")


def _noise(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.search(r"error|exception|traceback|warning", line, re.I)]


@pytest.fixture(scope="module")
def lifecycle(extension_zip, tmp_path_factory) -> tuple[dict, str]:
    return run_lifecycle(sys.executable, extension_zip, tmp_path_factory.mktemp("lifecycle"))


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
    assert _noise(output) == [], output


# --- the other Blender releases -------------------------------------------------------------------
# Each release's suite builds its zip with its own bpy (``extension_zip``) and validates it with its
# own blender_ext.py (above); here that zip goes through the whole life in the other releases'
# Blender. Over scripts/test's three suites every (built with, installed in) pair runs once.


def releases_under_test() -> list[str]:
    """The Blender releases scripts/versions.sh tests ("4.2", "4.5", "5.0"), BLENDER_VERSIONS first."""
    default = re.search(r'BLENDER_VERSIONS:-"([^"]+)"', (REPO / "scripts/versions.sh").read_text()).group(1)
    return [".".join(version.split(".")[:2]) for version in os.environ.get("BLENDER_VERSIONS", default).split()]


def release_python(release: str) -> Path:
    """The Python of scripts/bootstrap's environment for that release; missing is a failure."""
    python = REPO / f".venv-blender-{release}" / "bin" / "python"
    assert python.is_file(), f"no {python}: run scripts/bootstrap (it makes one environment per Blender release)"
    return python


RUNNING = f"{bpy.app.version[0]}.{bpy.app.version[1]}"
OTHERS = [release for release in releases_under_test() if release != RUNNING]


def test_this_release_is_one_of_the_tested():
    assert RUNNING in releases_under_test() and len(OTHERS) == len(releases_under_test()) - 1


@pytest.mark.parametrize("release", releases_under_test())
def test_build_finds_each_releases_tools(release, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import build_extension

    tools = build_extension.find_tools(release_python(release))
    assert tools.python == release_python(release)
    assert tools.cli.is_file() and tools.tags.is_file()
    assert tools.cli.parents[4].name == release  # bpy/<X.Y>/scripts/addons_core/bl_pkg/cli/blender_ext.py


@pytest.mark.parametrize("release", OTHERS)
def test_zip_lives_in_the_other_releases(release, extension_zip, tmp_path):
    report, output = run_lifecycle(str(release_python(release)), extension_zip, tmp_path)
    assert report["enabled"] and set(report["ops"]) >= OUR_OPERATORS and report["unregistered_classes"] == []
    assert report["bundled_wheel"].endswith(Path(WHEEL).name)
    assert report["ops_left"] == [] and report["still_registered"] == [] and not report["package_left"]
    assert all(not left for left in report["props_left"].values()), report["props_left"]
    assert _noise(output) == [], output

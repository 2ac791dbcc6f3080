# SPDX-License-Identifier: GPL-3.0-or-later
"""Fixtures of the Blender tests, which run in the bpy venv, apart from the torch suite:

    .venv-blender-5.0/bin/python -m pytest -q --confcutdir=tests/blender tests/blender

The folders follow the add-on's layers: ``core/`` (no bpy needed), ``operators/`` and ``ui/``;
the extension and batch.py are tested here. Blender keeps one session per process, so the add-on
is built, installed from its zip and enabled once (``addon``). ``BLENDER_USER_RESOURCES`` points
at a temporary folder before anything imports bpy, so the tests never touch the user's Blender
configuration.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "mug_behind_box"
EXTENSION_ID = "amodal3r"
REPO_MODULE = "user_default"
DEFAULT_SERVER_PYTHON = REPO / ".venv" / "bin" / "python"

# Before any test module imports bpy: Blender reads this once, when it starts.
USER_DIR = Path(tempfile.mkdtemp(prefix="amodal3r-blender-user-"))
os.environ["BLENDER_USER_RESOURCES"] = str(USER_DIR)
for folder in (REPO, Path(__file__).resolve().parent):  # `import amodal3r_blender`, `import addon_helpers`
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from addon_helpers import H, W, paint, photo, pixels  # noqa: E402

import amodal3r_blender.core  # noqa: E402, F401 - after the path: it makes `import amodal3r.api` work, as in the add-on
from amodal3r.api.environment import MODEL, SERVER_PYTHON  # noqa: E402


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(USER_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def blender_user_dir() -> Path:
    """Blender's user folder for this test session (config, extensions, their user data)."""
    return USER_DIR


@pytest.fixture(scope="session")
def extension_zip(tmp_path_factory) -> Path:
    """The extension built by scripts/build_extension.py, as users get it."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_extension.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    zip_path = Path(result.stdout.strip().splitlines()[-1])
    assert zip_path.is_file()
    return zip_path


@pytest.fixture(scope="session")
def addon(blender_user_dir, extension_zip) -> str:
    """The extension installed from its zip and enabled; the add-on's module name."""
    import bpy

    module = f"bl_ext.{REPO_MODULE}.{EXTENSION_ID}"
    result = bpy.ops.extensions.package_install_files(
        filepath=str(extension_zip), repo=REPO_MODULE, enable_on_install=True
    )
    assert result == {"FINISHED"}
    assert module in bpy.context.preferences.addons
    yield module
    if module in bpy.context.preferences.addons:
        bpy.ops.preferences.addon_disable(module=module)  # stops any server the tests left running


@pytest.fixture
def clean_scene(addon) -> str:
    """Factory settings (an empty scene) with the add-on enabled again; the add-on's module name."""
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)  # this disables extensions enabled at runtime
    bpy.ops.preferences.addon_enable(module=addon)
    return addon


@pytest.fixture(scope="session")
def server_python() -> str:
    """A Python with the amodal3r server and torch: AMODAL3R_SERVER_PYTHON, else the repo's .venv."""
    chosen = Path(os.environ.get(SERVER_PYTHON) or DEFAULT_SERVER_PYTHON)
    assert chosen.is_file(), (
        f"no server Python at {chosen}: run scripts/bootstrap (it makes .venv) or set AMODAL3R_SERVER_PYTHON"
    )
    return str(chosen)


@pytest.fixture(scope="session")
def tiny_model_dir(server_python, tmp_path_factory) -> Path:
    """A model folder of tiny random weights (a few seconds to write)."""
    out = tmp_path_factory.mktemp("tiny-model")
    result = subprocess.run(
        [server_python, "-m", "amodal3r.cli", "tiny-weights", str(out)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture
def server_env(monkeypatch, server_python, tiny_model_dir) -> None:
    """The add-on's server settings pointed at the test server Python and the tiny weights."""
    monkeypatch.setenv(SERVER_PYTHON, server_python)
    monkeypatch.setenv(MODEL, str(tiny_model_dir))


@pytest.fixture(scope="session")
def example_dir() -> Path:
    """The shipped example: image.png, target_mask.png, occluder_mask.png, mask.png."""
    return EXAMPLE


@pytest.fixture
def settings(clean_scene):
    """The empty scene's ``scene.amodal3r``."""
    import bpy

    return bpy.context.scene.amodal3r


@pytest.fixture
def with_masks(settings):
    """A source photo with both mask images, the target painted in."""
    import bpy

    source = photo()
    settings.source_image = source
    assert bpy.ops.amodal3r.create_masks() == {"FINISHED"}
    view = settings.views[0]
    target = np.zeros((H, W), bool)
    target[1:4, 4:7] = True
    paint(view.target_mask, target)
    return SimpleNamespace(photo=source, view=view, target=target, before=pixels(source))


@pytest.fixture
def mug_scene(clean_scene, example_dir):
    """The example photo as the source ("mug.png"), its masks painted into the mask images, fast
    settings, the 3D cursor at (1, 2, 3); the scene's ``amodal3r`` settings."""
    import bpy

    from amodal3r_blender.core import masks, png

    photo = bpy.data.images.load(str(example_dir / "image.png"))
    photo.name = "mug.png"
    settings = bpy.context.scene.amodal3r
    settings.source_image = photo
    assert bpy.ops.amodal3r.create_masks() == {"FINISHED"}
    view = settings.views[0]
    for image, name in ((view.target_mask, "target_mask.png"), (view.occluder_mask, "occluder_mask.png")):
        layer = masks.flip_rows(png.decode_png((example_dir / name).read_bytes())[:, :, 0] > 127)
        image.pixels.foreach_set(masks.pixels_from_layer(layer))
    settings.structure_steps = settings.slat_steps = 2
    settings.texture_size = "256"
    settings.faces = 5000
    bpy.context.scene.cursor.location = (1.0, 2.0, 3.0)
    return settings

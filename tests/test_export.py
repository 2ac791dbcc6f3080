"""Textured GLB export: cleanup, decimation, unwrap, baking, a valid file or none at all."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from conftest import REPO_ROOT

from amodal3r.export import export_glb
from amodal3r.representations.mesh import Mesh

VALIDATOR = REPO_ROOT / "tests" / "gltf"


def gltf_issues(path: Path) -> dict:
    """The Khronos validator's summary (npm package gltf-validator, installed by scripts/bootstrap)."""
    if shutil.which("node") is None or not (VALIDATOR / "node_modules" / "gltf-validator").is_dir():
        pytest.fail(f"the glTF validator is not installed: run `npm ci --prefix {VALIDATOR}`")
    out = subprocess.run(["node", str(VALIDATOR / "validate.cjs"), str(path)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def smooth_colours(vertices: np.ndarray) -> np.ndarray:
    """Colour varying slowly over the surface, so a texel near a vertex must show its colour."""
    rgb = np.stack([vertices[:, 0], vertices[:, 1], vertices[:, 2]], axis=1) + 0.5
    return np.concatenate([rgb, np.zeros_like(rgb)], axis=1).astype(np.float32)


def sphere_with_fragment(subdivisions: int = 4) -> Mesh:
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.4)
    fragment = trimesh.creation.icosphere(subdivisions=0, radius=0.01)
    fragment.apply_translation([0.45, 0.45, 0.45])
    both = trimesh.util.concatenate([sphere, fragment])
    vertices = np.asarray(both.vertices, dtype=np.float32)
    return Mesh(torch.from_numpy(vertices), torch.from_numpy(np.asarray(both.faces)),
                torch.from_numpy(smooth_colours(vertices)))


def load_glb(path: Path) -> trimesh.Trimesh:
    scene = trimesh.load(path, force="scene")
    assert len(scene.geometry) == 1
    return next(iter(scene.geometry.values()))


def test_textured_glb_round_trip(tmp_path: Path) -> None:
    mesh = sphere_with_fragment()
    report = export_glb(mesh, tmp_path / "a.glb", texture_size=256)
    assert report.faces_in == 5140 and report.faces_out == 5120  # the 20-face fragment is gone
    glb = load_glb(tmp_path / "a.glb")
    texture = np.asarray(glb.visual.material.baseColorTexture.convert("RGB"), dtype=np.float32) / 255
    assert texture.shape == (256, 256, 3)
    uv = np.asarray(glb.visual.uv)
    assert uv.min() >= 0 and uv.max() <= 1
    # Y-up: the decoder's z becomes glTF's y.
    source = (np.asarray(glb.vertices) @ np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]])).astype(np.float32)
    expected = source + 0.5
    texel = texture[np.clip(((1 - uv[:, 1]) * 256).astype(int), 0, 255), np.clip((uv[:, 0] * 256).astype(int), 0, 255)]
    assert np.abs(texel - expected).mean() < 0.02
    assert np.percentile(np.abs(texel - expected), 99) < 0.08
    issues = gltf_issues(tmp_path / "a.glb")
    assert issues["numErrors"] == 0, issues["messages"]


def test_decimation_before_unwrap(tmp_path: Path) -> None:
    report = export_glb(sphere_with_fragment(subdivisions=5), tmp_path / "d.glb", texture_size=128, target_faces=4000)
    assert 3800 <= report.faces_out <= 4200 and "decimate" in report.seconds
    assert gltf_issues(tmp_path / "d.glb")["numErrors"] == 0


def test_failure_leaves_nothing(tmp_path: Path) -> None:
    empty = Mesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 6))
    with pytest.raises(ValueError, match="cannot export an empty mesh"):
        export_glb(empty, tmp_path / "x.glb")
    assert list(tmp_path.iterdir()) == []


def test_preview_draws_the_nearest_surface(tmp_path: Path) -> None:
    from PIL import Image

    from amodal3r.export import preview_png

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    box = trimesh.creation.box(extents=[0.3, 0.3, 0.3])
    box.apply_translation([0.1, -0.3, 0.0])  # in front of the sphere for a viewer at -Y
    both = trimesh.util.concatenate([sphere, box])
    colours = np.zeros((len(both.vertices), 6), np.float32)
    colours[:len(sphere.vertices), 0] = 1
    colours[len(sphere.vertices):, 2] = 1
    mesh = Mesh(torch.tensor(both.vertices, dtype=torch.float32), torch.tensor(both.faces), torch.tensor(colours))
    preview_png(mesh, tmp_path / "p.png", size=200)
    image = np.asarray(Image.open(tmp_path / "p.png"), dtype=int)
    box_centre, sphere_left, corner = image[100, 120], image[100, 55], image[5, 5]
    assert box_centre[2] > 150 and box_centre[0] < 30
    assert sphere_left[0] > 100 and sphere_left[2] < 30
    assert (corner == 255).all()


def test_an_unwrapper_crash_is_contained_and_retried(tmp_path: Path) -> None:
    """xatlas segfaults on a regular 82k-face icosphere here; the export survives and says so."""
    sphere = trimesh.creation.icosphere(subdivisions=6, radius=0.4)
    vertices = np.asarray(sphere.vertices, dtype=np.float32)
    mesh = Mesh(torch.from_numpy(vertices), torch.from_numpy(np.asarray(sphere.faces)),
                torch.from_numpy(smooth_colours(vertices)))
    report = export_glb(mesh, tmp_path / "s.glb", texture_size=128)
    assert report.notices == ["xatlas failed on 81920 faces; retried with 57344"]
    assert report.faces_out == 57344
    assert gltf_issues(tmp_path / "s.glb")["numErrors"] == 0

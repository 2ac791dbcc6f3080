"""Textured GLB export: cleanup, decimation, unwrap, baking, a valid file or none at all."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from gltf_checks import gltf_issues, load_glb, read_glb, sample_texture
from PIL import Image

from amodal3r.io.export import export_glb
from amodal3r.representations.mesh import Mesh


def smooth_colours(vertices: np.ndarray) -> np.ndarray:
    """Colour varying slowly over the surface, so a texel near a vertex must show its colour;
    the last three channels (the decoder's normal channels) are noise that must not leak in."""
    noise = np.random.default_rng(0).random((len(vertices), 3))
    return np.concatenate([vertices + 0.5, noise], axis=1).astype(np.float32)


def sphere_with_fragment(subdivisions: int = 4) -> Mesh:
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.4)
    fragment = trimesh.creation.icosphere(subdivisions=0, radius=0.01)
    fragment.apply_translation([0.45, 0.45, 0.45])
    both = trimesh.util.concatenate([sphere, fragment])
    vertices = np.asarray(both.vertices, dtype=np.float32)
    return Mesh(
        torch.from_numpy(vertices), torch.from_numpy(np.asarray(both.faces)), torch.from_numpy(smooth_colours(vertices))
    )


def to_decoder_frame(gltf_positions: np.ndarray) -> np.ndarray:
    """glTF Y-up back to the decoder's Z-up: (x, y, z) -> (x, -z, y)."""
    return gltf_positions @ np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=np.float32)


def test_textured_glb_round_trip(tmp_path: Path) -> None:
    mesh = sphere_with_fragment()
    report = export_glb(mesh, tmp_path / "a.glb", texture_size=256)
    assert (report.faces_in, report.faces_cleaned, report.faces_out) == (5140, 5120, 5120)  # fragment gone
    assert report.bytes == (tmp_path / "a.glb").stat().st_size
    assert list(report.seconds) == ["cleanup", "unwrap", "bake", "write"]

    # Read back by trimesh, as Blender-side tools and the CLI users do.
    glb = load_glb(tmp_path / "a.glb")
    texture = np.asarray(glb.visual.material.baseColorTexture.convert("RGB"), dtype=np.float32) / 255
    assert texture.shape == (256, 256, 3)
    uv = np.asarray(glb.visual.uv)
    assert uv.min() >= 0 and uv.max() <= 1
    texel = texture[np.clip(((1 - uv[:, 1]) * 256).astype(int), 0, 255), np.clip((uv[:, 0] * 256).astype(int), 0, 255)]
    expected = to_decoder_frame(np.asarray(glb.vertices, dtype=np.float32)) + 0.5
    assert np.abs(texel - expected).mean() < 0.02
    assert np.percentile(np.abs(texel - expected), 99) < 0.08

    # Read raw, by the glTF specification: Y-up, UV origin top-left, unit outward normals.
    gltf, arrays, pixels = read_glb(tmp_path / "a.glb")
    material = gltf["materials"][0]["pbrMetallicRoughness"]
    assert material["metallicFactor"] == 0 and material["roughnessFactor"] == 1
    positions, normals = arrays["POSITION"], arrays["NORMAL"]
    assert np.abs(np.linalg.norm(positions, axis=1) - 0.4).max() < 1e-4
    assert positions[:, 1].max() > 0.399  # the decoder's top (+Z) is glTF's +Y
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1, atol=1e-4)
    assert (np.einsum("nc,nc->n", normals, positions / 0.4) > 0.99).all()
    corners = positions[arrays["indices"]]
    winding = np.einsum(
        "nc,nc->n", np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), corners.mean(axis=1)
    )
    assert (winding > 0).all()  # counter-clockwise seen from outside: front faces outward
    raw_texel = sample_texture(pixels, arrays["TEXCOORD_0"])
    raw_expected = to_decoder_frame(positions) + 0.5
    assert np.abs(raw_texel - raw_expected).mean() < 0.02

    issues = gltf_issues(tmp_path / "a.glb")
    assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, issues["messages"]


def test_decimation_before_unwrap(tmp_path: Path) -> None:
    report = export_glb(sphere_with_fragment(subdivisions=5), tmp_path / "d.glb", texture_size=128, target_faces=4000)
    assert report.faces_cleaned == 20480
    assert 3800 <= report.faces_out <= 4200
    assert list(report.seconds) == ["cleanup", "decimate", "unwrap", "bake", "write"]
    assert len(read_glb(tmp_path / "d.glb")[1]["indices"]) == report.faces_out
    assert gltf_issues(tmp_path / "d.glb")["numErrors"] == 0


def test_failure_leaves_nothing(tmp_path: Path) -> None:
    empty = Mesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 6))
    with pytest.raises(ValueError, match="cannot export an empty mesh"):
        export_glb(empty, tmp_path / "x.glb")
    flat = Mesh(torch.zeros(3, 3), torch.tensor([[0, 1, 2]]), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="zero area"):
        export_glb(flat, tmp_path / "x.glb")
    mesh = sphere_with_fragment(subdivisions=1)
    with pytest.raises(ValueError, match="without vertex colours"):
        export_glb(Mesh(mesh.vertices, mesh.faces), tmp_path / "x.glb")
    with pytest.raises(ValueError, match="texture_size"):
        export_glb(mesh, tmp_path / "x.glb", texture_size=0)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_nothing_and_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    mesh = sphere_with_fragment(subdivisions=2)
    target = tmp_path / "w.glb"
    target.write_bytes(b"old")

    def refuse(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        export_glb(mesh, target, texture_size=64)
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"old"
    monkeypatch.undo()
    export_glb(mesh, target, texture_size=64)
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes()[:4] == b"glTF"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not a private temp file


def test_preview_draws_the_nearest_surface(tmp_path: Path) -> None:
    from amodal3r.io.export import preview_png

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    box = trimesh.creation.box(extents=[0.3, 0.3, 0.3])
    box.apply_translation([0.1, -0.3, 0.0])  # in front of the sphere for a viewer at -Y
    both = trimesh.util.concatenate([sphere, box])
    colours = np.zeros((len(both.vertices), 6), np.float32)
    colours[: len(sphere.vertices), 0] = 1
    colours[len(sphere.vertices) :, 2] = 1
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
    mesh = Mesh(
        torch.from_numpy(vertices),
        torch.from_numpy(np.asarray(sphere.faces)),
        torch.from_numpy(smooth_colours(vertices)),
    )
    report = export_glb(mesh, tmp_path / "s.glb", texture_size=128)
    assert report.notices == ["xatlas failed on 81920 faces; retried with 57344"]
    assert report.faces_out == 57344
    assert gltf_issues(tmp_path / "s.glb")["numErrors"] == 0

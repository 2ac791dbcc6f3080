"""The silhouette rasteriser against a brute-force reference: every pixel centre tested against
every face with barycentric coordinates (numpy, written independently of the scan conversion)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from amodal3r.modules.silhouette import rasterize_silhouette

HEIGHT, WIDTH = 96, 128
FX = FY = 110.0
CX, CY = 61.3, 49.7


def reference(vertices: np.ndarray, faces: np.ndarray, near: float = 1e-3) -> np.ndarray:
    """Pixel centres inside a face (barycentric weights all >= 0), faces touching z <= near skipped."""
    z = vertices[:, 2]
    u = FX * vertices[:, 0] / z + CX
    v = FY * vertices[:, 1] / z + CY
    px, py = np.meshgrid(np.arange(WIDTH) + 0.5, np.arange(HEIGHT) + 0.5)
    out = np.zeros((HEIGHT, WIDTH), dtype=bool)
    for face in faces:
        if (z[face] <= near).any():
            continue
        (ax, bx, cx), (ay, by, cy) = u[face], v[face]
        det = (by - cy) * (ax - cx) + (cx - bx) * (ay - cy)
        if det == 0:
            continue
        w0 = ((by - cy) * (px - cx) + (cx - bx) * (py - cy)) / det
        w1 = ((cy - ay) * (px - cx) + (ax - cx) * (py - cy)) / det
        out |= (w0 >= 0) & (w1 >= 0) & (1 - w0 - w1 >= 0)
    return out


def posed(mesh: trimesh.Trimesh, seed: int) -> np.ndarray:
    """The mesh turned at random and put 2.5-4 units in front of the camera, a little off axis."""
    rng = np.random.default_rng(seed)
    rotation = trimesh.transformations.random_rotation_matrix(rng.random(3))[:3, :3]
    offset = np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.3, 0.3), rng.uniform(2.5, 4.0)])
    return mesh.vertices @ rotation.T + offset


def l_shape() -> trimesh.Trimesh:
    """Two boxes meeting at a corner: concave, with faces inside each other."""
    a = trimesh.creation.box((1.0, 0.3, 0.4), trimesh.transformations.translation_matrix((0, -0.35, 0)))
    b = trimesh.creation.box((0.3, 1.0, 0.4), trimesh.transformations.translation_matrix((-0.35, 0, 0)))
    return trimesh.util.concatenate([a, b])


MESHES = {
    "sphere": lambda: trimesh.creation.icosphere(subdivisions=3),
    "box": lambda: trimesh.creation.box((1.2, 0.5, 0.8)),
    "l_shape": l_shape,
    "torus": lambda: trimesh.creation.torus(major_radius=0.7, minor_radius=0.2),
    "cylinder": lambda: trimesh.creation.cylinder(radius=0.4, height=1.2, sections=24),
}


def draw(vertices: np.ndarray, faces: np.ndarray, **options) -> np.ndarray:
    out = rasterize_silhouette(
        torch.from_numpy(vertices).float(), torch.from_numpy(faces), FX, FY, CX, CY, HEIGHT, WIDTH, **options
    )
    return out[0].numpy()


@pytest.mark.parametrize("name", sorted(MESHES))
def test_matches_the_reference(name: str) -> None:
    mesh = MESHES[name]()
    for seed in range(3):
        vertices = posed(mesh, seed)
        expected = reference(vertices, mesh.faces)
        got = draw(vertices, mesh.faces)
        assert expected.sum() > 200
        assert (got == expected).mean() >= 0.99
        # Differences can only be pixel centres on an edge, where the rules differ.
        assert (got != expected).sum() <= 0.01 * expected.sum() + 5


def test_a_batch_is_every_pose_drawn_alone() -> None:
    mesh = MESHES["l_shape"]()
    poses = np.stack([posed(mesh, seed) for seed in range(5)])
    batch = rasterize_silhouette(
        torch.from_numpy(poses).float(), torch.from_numpy(mesh.faces), FX, FY, CX, CY, HEIGHT, WIDTH
    )
    assert batch.shape == (5, HEIGHT, WIDTH) and batch.dtype == torch.bool
    for i in range(5):
        np.testing.assert_array_equal(batch[i].numpy(), draw(poses[i], mesh.faces))


def test_one_side_of_a_closed_mesh_covers_the_same_pixels() -> None:
    for name in ("sphere", "l_shape", "torus"):
        mesh = MESHES[name]()
        vertices = posed(mesh, 7)
        both = draw(vertices, mesh.faces)
        np.testing.assert_array_equal(draw(vertices, mesh.faces, facing=1), both)
        np.testing.assert_array_equal(draw(vertices, mesh.faces, facing=-1), both)


def test_float_output_is_the_same_coverage() -> None:
    mesh = MESHES["torus"]()
    vertices = posed(mesh, 3)
    as_float = draw(vertices, mesh.faces, dtype=torch.float32)
    assert as_float.dtype == np.float32 and set(np.unique(as_float)) <= {0.0, 1.0}
    np.testing.assert_array_equal(as_float > 0.5, draw(vertices, mesh.faces))


def test_faces_behind_the_camera_are_dropped() -> None:
    mesh = MESHES["box"]()
    behind = mesh.vertices + np.array([0.0, 0.0, -3.0])
    assert not draw(behind, mesh.faces).any()
    straddling = mesh.vertices * np.array([1.0, 1.0, 4.0]) + np.array([0.0, 0.0, 1.0])  # z from -1 to 3
    got = draw(straddling, mesh.faces)
    in_front = [f for f in mesh.faces if (straddling[f, 2] > 1e-3).all()]
    np.testing.assert_array_equal(got, reference(straddling, np.array(in_front).reshape(-1, 3)))


def test_a_quad_larger_than_the_image_covers_every_pixel_without_a_gap() -> None:
    vertices = np.array([[-10, -10, 1], [10, -10, 1], [10, 10, 1], [-10, 10, 1]], dtype=np.float64)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    assert draw(vertices, faces).all()


def test_two_triangles_sharing_an_edge_leave_no_gap() -> None:
    # A quad whose diagonal passes exactly through pixel centres.
    z = 2.0
    corners = np.array([[10.5, 10.5], [60.5, 10.5], [60.5, 60.5], [10.5, 60.5]])
    vertices = np.column_stack(((corners[:, 0] - CX) * z / FX, (corners[:, 1] - CY) * z / FY, np.full(4, z)))
    got = draw(vertices, np.array([[0, 1, 2], [0, 2, 3]]))
    assert got[11:60, 11:60].all()
    assert not got[:10].any() and not got[:, :10].any()


def test_empty_inputs() -> None:
    vertices = torch.zeros(2, 0, 3)
    out = rasterize_silhouette(vertices, torch.zeros(0, 3, dtype=torch.long), FX, FY, CX, CY, HEIGHT, WIDTH)
    assert out.shape == (2, HEIGHT, WIDTH) and not out.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_what_the_cpu_draws() -> None:
    mesh = MESHES["torus"]()
    poses = torch.from_numpy(np.stack([posed(mesh, seed) for seed in range(8)])).float()
    faces = torch.from_numpy(mesh.faces)
    cpu = rasterize_silhouette(poses, faces, FX, FY, CX, CY, HEIGHT, WIDTH)
    gpu = rasterize_silhouette(poses.cuda(), faces.cuda(), FX, FY, CX, CY, HEIGHT, WIDTH)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() == cpu).float().mean().item() > 0.999


def test_degenerate_faces_draw_nothing() -> None:
    vertices = np.array([[0, 0, 2], [0.5, 0.5, 2], [1.0, 1.0, 2]], dtype=np.float64)  # collinear
    assert not draw(vertices, np.array([[0, 1, 2]])).any()
    assert math.isfinite(float(draw(vertices, np.array([[0, 0, 0]])).sum()))


def test_faces_reaching_towards_the_camera_plane_project_far_but_draw_right() -> None:
    rng = np.random.default_rng(5)
    centres = np.column_stack((rng.uniform(-0.8, 0.8, 24), rng.uniform(-0.6, 0.6, 24), rng.uniform(2, 4, 24)))
    vertices = (centres[:, None] + rng.normal(0, 0.08, (24, 3, 3))).reshape(-1, 3)
    vertices[0::12, 2] = 1.1e-3  # just in front of the near plane: projected up to 1e5 px away
    vertices[3::12, 2] = 1.1e-3
    faces = np.arange(len(vertices)).reshape(-1, 3)
    got, expected = draw(vertices, faces), reference(vertices, faces)
    assert 0.05 < expected.mean() < 0.9
    assert (got == expected).mean() >= 0.99

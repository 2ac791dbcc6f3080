"""Tests of the FlexiCubes mesh extraction used by the SLat mesh decoder."""

from __future__ import annotations

import math

import pytest
import torch
import trimesh
from conftest import golden_case

from amodal3r.representations import flexicubes_tables as tables
from amodal3r.representations.mesh import Mesh, sparse_features_to_mesh


def _match_vertices(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> torch.Tensor:
    """For each expected vertex, the index of the nearest actual vertex; asserts a 1:1 match within tol."""
    assert actual.shape == expected.shape
    match = torch.empty(expected.shape[0], dtype=torch.long)
    dist = torch.empty(expected.shape[0], dtype=torch.float64)
    a = actual.double()
    for start in range(0, expected.shape[0], 2048):
        d = torch.cdist(expected[start : start + 2048].double(), a)
        dist[start : start + 2048], match[start : start + 2048] = d.min(dim=1)
    assert dist.max().item() <= tol, f"vertex off by {dist.max().item():.3g}"
    assert torch.unique(match).numel() == match.numel(), "vertex matching is not one-to-one"
    return match


def _canonical_faces(faces: torch.Tensor) -> torch.Tensor:
    """Rotate each triangle so its smallest index comes first (keeps winding), then sort rows."""
    shift = faces.argmin(dim=1, keepdim=True)
    cols = (shift + torch.arange(3)) % 3
    rotated = faces.gather(1, cols)
    key = (rotated[:, 0] * (faces.max() + 1) + rotated[:, 1]) * (faces.max() + 1) + rotated[:, 2]
    return rotated[torch.argsort(key)]


def assert_same_mesh(actual: Mesh, expected: dict[str, torch.Tensor], tol: float = 1e-4) -> None:
    """Order-independent mesh comparison: vertex set, oriented triangle set, matched attributes."""
    exp_v, exp_f = expected["vertices"], expected["faces"].long()
    assert actual.vertices.dtype == torch.float32 and actual.faces.dtype == torch.long
    assert actual.faces.shape == exp_f.shape
    match = _match_vertices(actual.vertices, exp_v, tol)
    assert torch.equal(_canonical_faces(actual.faces), _canonical_faces(match[exp_f]))
    if "vertex_attrs" in expected:
        exp_a = expected["vertex_attrs"]
        err = (actual.vertex_attrs[match] - exp_a).abs().max().item()
        assert err <= tol * (1 + exp_a.abs().max().item()), f"vertex attrs off by {err:.3g}"


@pytest.mark.parametrize("case", ["slat_dec_mesh"])
def test_golden_mesh_extraction(case: str) -> None:
    folder = golden_case(case)
    from safetensors.torch import load_file

    io = load_file(str(folder / "io.safetensors"))
    expected = load_file(str(folder / "mesh.safetensors"))
    feats = io["dec_feats"].clone()
    mesh = sparse_features_to_mesh(io["dec_coords"], feats, resolution=256, use_color=True)
    assert torch.equal(feats, io["dec_feats"]), "input features were modified"
    assert_same_mesh(mesh, expected)
    # Stronger than required: the reference's own vertex and face order is reproduced too.
    assert torch.equal(mesh.faces, expected["faces"].long())
    assert (mesh.vertices - expected["vertices"]).abs().max().item() < 1e-6


def _ball_features(res: int, radius: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder-like features for a solid ball: sdf = (distance - radius) / res, random extras."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.full((3,), res / 2)
    grid = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
    keep = (grid + 0.5 - centre).norm(dim=1) < radius + 2.5
    xyz = grid[keep]
    corners = xyz[:, None, :] + tables.CORNER_OFFSETS  # [N, 8, 3]
    sdf = ((corners - centre).norm(dim=-1) - radius) / res
    n = xyz.shape[0]
    deform = 0.3 * torch.randn(n, 8, 3, generator=g)
    # Random per-cube deformations and colours: shared corners get averaged anyway.
    weights = torch.randn(n, 21, generator=g)
    color = 2 * torch.randn(n, 8, 6, generator=g)
    feats = torch.cat([sdf, deform.reshape(n, 24), weights, color.reshape(n, 48)], dim=1)
    coords = torch.cat([torch.zeros(n, 1, dtype=torch.int32), xyz.int()], dim=1)
    return coords, feats


def test_sphere_is_closed_manifold() -> None:
    res, radius = 48, 13.7  # not an integer: an sdf of exactly 0 would be mis-oriented (as in the reference)
    coords, feats = _ball_features(res, radius)
    perm = torch.randperm(coords.shape[0], generator=torch.Generator().manual_seed(1))
    mesh = sparse_features_to_mesh(coords, feats, resolution=res)
    assert mesh.success and mesh.vertex_attrs.shape == (mesh.vertices.shape[0], 6)
    attrs = mesh.vertex_attrs
    assert bool(((attrs > 0) & (attrs < 1)).all()), "colours must be sigmoid-activated"

    f = mesh.faces
    assert bool(((f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])).all())
    assert int(f.min()) >= 0 and int(f.max()) < mesh.vertices.shape[0]
    tm = trimesh.Trimesh(mesh.vertices.double().numpy(), f.numpy(), process=False)
    assert (tm.area_faces > 0).all()
    assert tm.is_winding_consistent and tm.is_watertight
    # The sdf bias of -1/res moves the surface one cube outwards; faces point outwards.
    r_world = (radius + 1) / res
    assert tm.volume > 0
    assert abs(tm.volume / (4 / 3 * math.pi * r_world**3) - 1) < 0.05
    dist = mesh.vertices.norm(dim=1)  # the ball is centred on the grid centre = world origin
    assert float((dist - r_world).abs().max()) < 1.5 / res

    # Input row order only changes the averaging order (rounding), not the mesh.
    shuffled = sparse_features_to_mesh(coords[perm], feats[perm], resolution=res)
    assert torch.equal(shuffled.faces, mesh.faces)
    assert torch.allclose(shuffled.vertices, mesh.vertices, rtol=0, atol=1e-6)

    # Without colour: 53 channels, same geometry.
    plain = sparse_features_to_mesh(coords, feats[:, :53], resolution=res, use_color=False)
    assert plain.vertex_attrs is None
    assert torch.equal(plain.vertices, mesh.vertices) and torch.equal(plain.faces, mesh.faces)


def test_empty_and_insideless_inputs() -> None:
    coords = torch.tensor([[0, 3, 3, 3]], dtype=torch.int32)
    feats = torch.ones(1, 101)  # all corners outside: no surface
    mesh = sparse_features_to_mesh(coords, feats, resolution=8)
    assert not mesh.success and mesh.vertices.shape == (0, 3) and mesh.vertex_attrs.shape == (0, 6)
    empty = sparse_features_to_mesh(coords[:0], feats[:0], resolution=8)
    assert empty.faces.shape == (0, 3) and empty.faces.dtype == torch.long
    with pytest.raises(ValueError):
        sparse_features_to_mesh(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), torch.zeros(2, 101))


def test_single_inside_corner_makes_closed_octahedron_like_cap() -> None:
    """One cube with one negative corner: the 8 cubes around that vertex form a closed surface."""
    coords = torch.tensor([[0, 3, 3, 3]])
    feats = torch.zeros(1, 101)
    feats[:, 0:8] = 0.5
    feats[:, 7] = -0.5  # corner 7 = vertex (4, 4, 4)
    mesh = sparse_features_to_mesh(coords, feats, resolution=8)
    # All 8 cubes around vertex (4,4,4) cut the surface: 8 dual vertices, 6 quads, 12 triangles.
    assert mesh.vertices.shape == (8, 3) and mesh.faces.shape == (12, 3)
    centre = torch.full((3,), 4 / 8 - 0.5)
    normals = torch.cross(
        mesh.vertices[mesh.faces[:, 1]] - mesh.vertices[mesh.faces[:, 0]],
        mesh.vertices[mesh.faces[:, 2]] - mesh.vertices[mesh.faces[:, 0]],
        dim=1,
    )
    outward = ((mesh.vertices[mesh.faces].mean(dim=1) - centre) * normals).sum(dim=1)
    assert bool((outward > 0).all()), "faces must point towards positive sdf"


def test_tables_are_consistent() -> None:
    for case in range(256):
        inside = [(case >> i) & 1 for i in range(8)]
        cut = {e for e, (a, b) in enumerate(tables.EDGES) if inside[a] != inside[b]}
        n = int(tables.NUM_VD_TABLE[case])
        groups = [[e for e in row if e >= 0] for row in tables.DMC_TABLE[case].tolist()]
        assert all(groups[n:][k] == [] for k in range(4 - n))
        listed = [e for g in groups[:n] for e in g]
        assert sorted(listed) == sorted(cut)  # every cut edge in exactly one group
    assert int(tables.AMBIGUOUS_FLAG.sum()) == 36
    assert int(tables.NUM_VD_TABLE.max()) == 4

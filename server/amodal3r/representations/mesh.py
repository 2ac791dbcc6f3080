"""Mesh representation and the sparse-voxel-features -> mesh conversion of the SLat mesh decoder.

The mesh decoder predicts, for each occupied cube of a 256^3 grid, 8 corner sdf values, 8 corner
deformations, 21 FlexiCubes weights and (optionally) 8 corner colours of 6 channels.  Corner
values shared by neighbouring cubes are averaged into one value per grid vertex, and FlexiCubes
turns the result into a triangle mesh.

The reference scatters everything into dense (res+1)^3 grids, where unset vertices get sdf 1,
deformation 0 and colour logit 0, and unset cubes get weights 0; with the index grids that is
over 5 GB at res 256 whatever the object.
Here only the cubes that can carry surface are built: a cube crosses the surface only if one of
its corners is negative, and only averaged (occupied) vertices can be negative, so the candidates
are the 8 cubes around each negative vertex.  Missing vertices and cubes get the same defaults,
so the output is identical to the dense formulation, including vertex and face order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from amodal3r.representations import flexicubes_tables as tables

from .flexicubes import flexicubes, sorted_lookup

SDF_CHANNELS = slice(0, 8)
DEFORM_CHANNELS = slice(8, 32)
WEIGHT_CHANNELS = slice(32, 53)
COLOR_CHANNELS = slice(53, 101)
COLOR_DIM = 6
MIN_FACE_HEIGHT = 1e-8  # world units; float32 positions near 0.5 are resolved to 6e-8


@dataclass
class Mesh:
    """A triangle mesh with optional per-vertex attributes (the decoder's 6 colour channels)."""

    vertices: Tensor  # [V, 3] float32, world units (grid spans [-0.5, 0.5])
    faces: Tensor  # [F, 3] int64
    vertex_attrs: Tensor | None = None  # [V, C]

    @property
    def success(self) -> bool:
        return self.vertices.shape[0] > 0 and self.faces.shape[0] > 0

    def to(self, device: torch.device | str) -> Mesh:
        attrs = None if self.vertex_attrs is None else self.vertex_attrs.to(device)
        return Mesh(self.vertices.to(device), self.faces.to(device), attrs)

    def welded(self) -> Mesh:
        """Merge vertices at identical positions and drop the faces of zero area.

        FlexiCubes places the dual vertices of neighbouring cubes at the very same point, or on one
        line, where a cube's surface degenerates; such faces have no area and confuse exporters.
        """
        positions, inverse = torch.unique(self.vertices, dim=0, return_inverse=True)
        faces = inverse[self.faces]
        corners = positions[faces].double()
        edges = corners.roll(-1, dims=1) - corners
        area2 = torch.linalg.cross(edges[:, 0], edges[:, 1]).norm(dim=1)
        keep = area2 > MIN_FACE_HEIGHT * edges.norm(dim=2).amax(dim=1)
        attrs = None
        if self.vertex_attrs is not None:
            first = torch.full((positions.shape[0],), self.vertices.shape[0], dtype=torch.long, device=faces.device)
            first.scatter_reduce_(0, inverse, torch.arange(inverse.shape[0], device=faces.device), reduce="amin")
            attrs = self.vertex_attrs[first]
        return Mesh(positions, faces[keep], attrs)


def _linear_id(xyz: Tensor, size: int) -> Tensor:
    """x-major linear index in a size^3 grid (the dense reference's flattening order)."""
    return (xyz[..., 0] * size + xyz[..., 1]) * size + xyz[..., 2]


def _from_linear_id(key: Tensor, size: int) -> Tensor:
    return torch.stack((key // (size * size), (key // size) % size, key % size), dim=-1)


def deformed_positions(xyz: Tensor, deform: Tensor, resolution: int) -> Tensor:
    """Grid vertex -> world position, moved by at most half a cube by the tanh-bounded offset."""
    return xyz / resolution - 0.5 + (1 - 1e-8) / (resolution * 2) * torch.tanh(deform)


def sparse_features_to_mesh(
    coords: Tensor,
    feats: Tensor,
    resolution: int = 256,
    use_color: bool = True,
) -> Mesh:
    """Turn the mesh decoder's sparse output into a mesh (inference path of the reference).

    Args:
        coords: [N, 4] (batch, x, y, z) or [N, 3] (x, y, z) integer cube coordinates of ONE
            batch element, unique, in [0, resolution), in any row order.
        feats: [N, 101] (or [N, 53] without colour): sdf 0:8, deform 8:32, weights 32:53,
            colour 53:101 (8 corners x 6 channels).
        resolution: cubes per axis.
        use_color: interpolate the colour channels to the vertices.

    Returns:
        Mesh with float32 vertices, int64 faces and sigmoid-activated colours (or None).
    """
    if coords.shape[1] == 4:
        if coords.shape[0] and bool((coords[:, 0] != coords[0, 0]).any()):
            raise ValueError("coords hold several batch elements; extract one mesh per element")
        coords = coords[:, 1:]
    feats = feats.to(torch.float32)
    device = feats.device
    xyz = coords.to(device=device, dtype=torch.long)
    n = xyz.shape[0]
    res, res_v = resolution, resolution + 1
    corner_offsets = tables.on_device("CORNER_OFFSETS", device)

    # --- average the per-cube corner values into per-vertex values ----------------------------
    corner_key = _linear_id(xyz[:, None, :] + corner_offsets, res_v).reshape(-1)  # [N*8]
    vert_key, corner_vert = torch.unique(corner_key, return_inverse=True)
    n_verts = vert_key.numel()

    # One table of per-corner channels, [sdf | deform xyz | colour], as the decoder lays them out.
    sdf_bias = -1.0 / res  # moves the zero level slightly outwards
    parts = [
        (feats[:, SDF_CHANNELS] + sdf_bias).reshape(n, 8, 1),
        feats[:, DEFORM_CHANNELS].reshape(n, 8, 3),
    ]
    if use_color:
        parts.append(feats[:, COLOR_CHANNELS].reshape(n, 8, COLOR_DIM))
    corner_attrs = torch.cat(parts, dim=2).flatten(0, 1)
    del parts
    # A scatter "mean": sum in corner order (cube-major), then divide by the count.
    count = torch.zeros(n_verts, dtype=feats.dtype, device=device)
    count.index_add_(0, corner_vert, torch.ones_like(corner_key, dtype=feats.dtype))
    vert_attrs = torch.zeros((n_verts, corner_attrs.shape[1]), dtype=feats.dtype, device=device)
    vert_attrs.index_add_(0, corner_vert, corner_attrs)
    del corner_attrs
    vert_attrs /= count[:, None]
    vert_sdf = vert_attrs[:, 0]

    # --- candidate cubes: the 8 cubes around every negative vertex -----------------------------
    neg_xyz = _from_linear_id(vert_key[vert_sdf < 0], res_v)
    cand = (neg_xyz[:, None, :] - corner_offsets).reshape(-1, 3)
    cand = cand[((cand >= 0) & (cand < res)).all(dim=1)]
    cube_key = torch.unique(_linear_id(cand, res))
    cube_xyz = _from_linear_id(cube_key, res)

    # Keep the cubes with mixed signs (an absent vertex has sdf 1).
    corner_key = _linear_id(cube_xyz[:, None, :] + corner_offsets, res_v)  # [S, 8]
    pos, found = sorted_lookup(vert_key, corner_key)
    keep = ~(found & (vert_sdf[pos] < 0)).all(dim=1)
    cube_key, cube_xyz, corner_key = cube_key[keep], cube_xyz[keep], corner_key[keep]
    pos, found = pos[keep], found[keep]

    # --- vertex table: the averaged vertices, then the absent corners with default values ------
    absent_key, absent_idx = torch.unique(corner_key[~found], return_inverse=True)
    cube_corners = pos.masked_scatter(~found, n_verts + absent_idx)
    default = torch.zeros(vert_attrs.shape[1], dtype=feats.dtype, device=device)
    default[0] = 1.0  # sdf: outside
    attrs = torch.cat((vert_attrs, default.expand(absent_key.numel(), -1)))
    table_xyz = _from_linear_id(torch.cat((vert_key, absent_key)), res_v)
    positions = deformed_positions(table_xyz, attrs[:, 1:4], res)
    # Activated on the strided slice like the reference, so CPU kernels round identically.
    colors = torch.sigmoid(attrs[:, 4:]) if use_color else None

    # --- per-cube weights (absent cubes: raw weights 0) ---------------------------------------
    in_key, in_order = torch.sort(_linear_id(xyz, res))
    pos, found = sorted_lookup(in_key, cube_key)
    weights = torch.where(found[:, None], feats[in_order[pos], WEIGHT_CHANNELS], 0.0)

    vertices, faces, vertex_attrs = flexicubes(
        cube_xyz, cube_corners, positions, attrs[:, 0], res, weights=weights, colors=colors
    )
    return Mesh(vertices=vertices, faces=faces, vertex_attrs=vertex_attrs)

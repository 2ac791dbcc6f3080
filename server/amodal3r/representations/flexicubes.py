"""FlexiCubes iso-surface extraction (inference only) on a sparse set of cubes, in plain PyTorch.

FlexiCubes (Shen et al. 2023) is Dual Marching Cubes with learned weights:

* every connected surface patch inside a cube gives one *dual vertex*; it is the ``beta``-weighted
  mean of the zero crossings on the patch's edges, each crossing being found by linear
  interpolation of the corner sdf values scaled by the per-corner weights ``alpha``;
* every sign-changing grid edge shared by four cubes gives one quad joining the four dual
  vertices around it, oriented towards positive sdf;
* each quad is split into two triangles along the diagonal whose two vertices have the larger
  product of the per-cube weights ``gamma``.

The reference runs this on a dense grid.  Here the caller passes only the cubes that may touch
the surface together with a compact vertex table; the result is the same as long as every cube
with mixed corner signs is included, the cube list is sorted by linear cube id and the vertex
table by linear vertex id (both x-major), which also reproduces the reference's output order.

Summations run in a fixed order with no atomics, so results are deterministic on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import flexicubes_tables as tables

WEIGHT_SCALE = 0.99


def _lookup(sorted_keys: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
    """Index of each query in a sorted 1-D key tensor, and whether it was found there."""
    if sorted_keys.numel() == 0:
        zeros = torch.zeros_like(query)
        return zeros, torch.zeros_like(query, dtype=torch.bool)
    pos = torch.searchsorted(sorted_keys, query).clamp_(max=sorted_keys.numel() - 1)
    return pos, sorted_keys[pos] == query


def _normalize_weights(weights: Tensor | None, n: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Map raw network weights to positive (beta [n,12], alpha [n,8], gamma [n]); absent = all ones."""
    if weights is None:
        one = torch.ones((), dtype=like.dtype, device=like.device)
        return one.expand(n, 12), one.expand(n, 8), one.expand(n)
    beta = torch.tanh(weights[:, :12]) * WEIGHT_SCALE + 1
    alpha = torch.tanh(weights[:, 12:20]) * WEIGHT_SCALE + 1
    gamma = torch.sigmoid(weights[:, 20]) * WEIGHT_SCALE + (1 - WEIGHT_SCALE) / 2
    return beta, alpha, gamma


def _resolve_ambiguity(case: Tensor, cube_xyz: Tensor, resolution: int) -> Tensor:
    """Invert C16/C19 cases that face another such case across their ambiguous face.

    Both cubes would otherwise triangulate the shared face differently and leave a hole.
    Flags are read from the original cases, so a pair of such cubes is inverted on both sides.
    """
    device = case.device
    flagged = tables.on_device("AMBIGUOUS_FLAG", device)[case]
    idx = flagged.nonzero().squeeze(1)
    if idx.numel() == 0:
        return case
    xyz = cube_xyz[idx]
    adj = xyz + tables.on_device("AMBIGUOUS_DIR", device)[case[idx]]
    inside = ((adj >= 0) & (adj < resolution)).all(dim=1)
    r = resolution
    keys = (xyz[:, 0] * r + xyz[:, 1]) * r + xyz[:, 2]
    adj_keys = (adj[:, 0] * r + adj[:, 1]) * r + adj[:, 2]
    keys_sorted, _ = torch.sort(keys)
    _, found = _lookup(keys_sorted, adj_keys)
    invert = idx[found & inside]
    case = case.clone()
    case[invert] = 255 - case[invert]
    return case


def _interp(w_a: Tensor, w_b: Tensor, v_a: Tensor, v_b: Tensor) -> Tensor:
    """Zero crossing of the line through (v_a, w_a), (v_b, w_b), written as the reference does."""
    neg_w_a = -w_a
    return (v_a * w_b + v_b * neg_w_a) / (w_b + neg_w_a)


def flexicubes(
    cube_xyz: Tensor,
    cube_corners: Tensor,
    vertices: Tensor,
    sdf: Tensor,
    resolution: int,
    weights: Tensor | None = None,
    colors: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Extract the FlexiCubes mesh of a sparse cube set.

    Args:
        cube_xyz: [S, 3] integer grid coordinates of the candidate cubes, sorted by linear id.
        cube_corners: [S, 8] indices into the vertex table of each cube's corners
            (corner order of :data:`flexicubes_tables.CORNERS`).
        vertices: [V, 3] (deformed) positions of the grid vertices.
        sdf: [V] signed distance per vertex; negative is inside.
        resolution: cubes per axis of the grid (cubes outside it are treated as absent).
        weights: [S, 21] raw weights per cube (beta 0:12, alpha 12:20, gamma 20), or None.
        colors: [V, C] per-vertex attributes (already activated) interpolated like positions.

    Returns:
        (dual vertices [M, 3], triangles [F, 3] int64, attributes [M, C] or None).
    """
    device = vertices.device
    n_attr = 0 if colors is None else colors.shape[1]

    occ = sdf[cube_corners] < 0  # [S, 8]
    n_in = occ.sum(dim=1)
    surf = (n_in > 0) & (n_in < 8)
    if not bool(surf.any()):
        return (
            vertices.new_zeros((0, 3)),
            torch.zeros((0, 3), dtype=torch.long, device=device),
            None if colors is None else vertices.new_zeros((0, n_attr)),
        )
    surf_idx = surf.nonzero().squeeze(1)
    cube_xyz, cube_corners, occ = cube_xyz[surf_idx], cube_corners[surf_idx], occ[surf_idx]
    if weights is not None:
        weights = weights[surf_idx]
    n_cubes = surf_idx.numel()
    beta, alpha, gamma = _normalize_weights(weights, n_cubes, vertices)

    # --- case ids ---------------------------------------------------------------------------
    bits = 2 ** torch.arange(8, device=device)
    case = (occ.long() * bits).sum(dim=1)
    case = _resolve_ambiguity(case, cube_xyz.long(), resolution)

    # --- dual vertices ------------------------------------------------------------------------
    # Order: cubes grouped by their number of dual vertices (ascending, stable), then by group.
    num_vd = tables.on_device("NUM_VD_TABLE", device)[case]
    _, order = torch.sort(num_vd, stable=True)
    vd_cube = torch.repeat_interleave(order, num_vd[order])  # [M]
    n_vd = vd_cube.numel()
    starts = torch.cumsum(num_vd[order], 0) - num_vd[order]
    vd_group = torch.arange(n_vd, device=device) - torch.repeat_interleave(starts, num_vd[order])
    groups = tables.on_device("DMC_TABLE", device)[case[vd_cube], vd_group]  # [M, 7], -1 padded
    valid = groups >= 0
    edge = groups.clamp(min=0)

    edge_a = tables.on_device("EDGE_A", device)
    edge_b = tables.on_device("EDGE_B", device)
    cube_col = vd_cube[:, None].expand_as(edge)
    ca, cb = edge_a[edge], edge_b[edge]  # local corners of each edge
    va, vb = cube_corners[cube_col, ca], cube_corners[cube_col, cb]  # vertex-table ids
    wa = (sdf[va] * alpha[cube_col, ca])[..., None]
    wb = (sdf[vb] * alpha[cube_col, cb])[..., None]
    edge_beta = torch.where(valid, beta[cube_col, edge], 0)[..., None]  # [M, 7, 1]
    ue = torch.where(valid[..., None], _interp(wa, wb, vertices[va], vertices[vb]), 0)

    # Sequential sums over the (up to 7) edges, in table order, as the reference accumulates.
    beta_sum = torch.zeros((n_vd, 1), dtype=vertices.dtype, device=device)
    vd = torch.zeros((n_vd, 3), dtype=vertices.dtype, device=device)
    for k in range(edge.shape[1]):
        beta_sum = beta_sum + edge_beta[:, k]
        vd = vd + ue[:, k] * edge_beta[:, k]
    vd = vd / beta_sum

    vd_color = None
    if colors is not None:
        uc = torch.where(valid[..., None], _interp(wa, wb, colors[va], colors[vb]), 0)
        vd_color = torch.zeros((n_vd, n_attr), dtype=colors.dtype, device=device)
        for k in range(edge.shape[1]):
            vd_color = vd_color + uc[:, k] * edge_beta[:, k]
        vd_color = vd_color / beta_sum

    # Which dual vertex each (cube, local edge) belongs to.
    slot_vd = torch.full((n_cubes, 12), -1, dtype=torch.long, device=device)
    vd_ids = torch.arange(n_vd, device=device)[:, None].expand_as(edge)
    slot_vd[cube_col[valid], edge[valid]] = vd_ids[valid]

    # --- quads around sign-changing edges shared by 4 cubes ------------------------------------
    cut = occ[:, edge_a] != occ[:, edge_b]  # [S, 12]
    cut_cube, cut_edge = cut.nonzero(as_tuple=True)  # cube-major, like the reference's slots
    end_a = cube_corners[cut_cube, edge_a[cut_edge]]
    end_b = cube_corners[cut_cube, edge_b[cut_edge]]
    n_verts = vertices.shape[0]
    _, edge_id, counts = torch.unique(end_a * n_verts + end_b, return_inverse=True, return_counts=True)
    full = counts[edge_id] == 4
    edge_id, slot_ids = edge_id[full], slot_vd[cut_cube[full], cut_edge[full]]
    edge_sorted, perm = torch.sort(edge_id, stable=True)  # the 4 cubes come in linear-id order
    quads = slot_ids[perm].reshape(-1, 4)
    first_end = end_a[full][perm].reshape(-1, 4)[:, 0]
    # Orient every quad so its normal points towards positive sdf.
    flip = sdf[first_end] > 0
    quads = torch.cat((quads[flip][:, [0, 1, 3, 2]], quads[~flip][:, [2, 3, 1, 0]]))

    # --- split quads along the diagonal with the larger gamma product ---------------------------
    quad_gamma = gamma[vd_cube][quads]
    split_02 = quad_gamma[:, 0] * quad_gamma[:, 2] > quad_gamma[:, 1] * quad_gamma[:, 3]
    tri_02 = quads[:, [0, 1, 2, 0, 2, 3]]
    tri_13 = quads[:, [0, 1, 3, 3, 1, 2]]
    faces = torch.where(split_02[:, None], tri_02, tri_13).reshape(-1, 3)
    return vd, faces, vd_color

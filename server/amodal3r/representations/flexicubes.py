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
the surface together with a vertex table in any order; the result is the same as long as every
cube with mixed corner signs is included.  Listing the cubes by linear id (x-major) also
reproduces the reference's vertex and face order.

Summations run in a fixed order with no atomics, so results are deterministic on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from amodal3r.representations import flexicubes_tables as tables

WEIGHT_SCALE = 0.99


def sorted_lookup(sorted_keys: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
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

    Otherwise the two cubes would resolve their shared ambiguous face inconsistently.  Flags are
    read from the original cases, so both cubes of such a pair are inverted.
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
    _, found = sorted_lookup(keys_sorted, adj_keys)
    invert = idx[found & inside]
    case = case.clone()
    case[invert] = 255 - case[invert]
    return case


def _interp(w_a: Tensor, w_b: Tensor, v_a: Tensor, v_b: Tensor) -> Tensor:
    """Zero crossing of the line through (v_a, w_a), (v_b, w_b), written as the reference does."""
    neg_w_a = -w_a
    return (v_a * w_b + v_b * neg_w_a) / (w_b + neg_w_a)


def _sum_in_order(values: Tensor, first: Tensor, count: Tensor) -> Tensor:
    """Per-row sums of consecutive runs values[first[i] : first[i] + count[i]], added left to right.

    Plain sequential accumulation (what a CPU ``index_add_`` does), so results are bitwise
    reproducible on any device.
    """
    out = values.new_zeros((first.numel(),) + values.shape[1:])
    for k in range(int(count.max()) if count.numel() else 0):
        rows = (count > k).nonzero().squeeze(1)
        out[rows] = out[rows] + values[first[rows] + k]
    return out


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
        cube_xyz: [S, 3] integer grid coordinates of the candidate cubes (unique).  Sorting them by
            linear id (x-major) reproduces the reference's vertex order.
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
    cube_xyz, cube_corners, occ = cube_xyz[surf_idx].long(), cube_corners[surf_idx], occ[surf_idx]
    if weights is not None:
        weights = weights[surf_idx]
    beta, alpha, gamma = _normalize_weights(weights, surf_idx.numel(), vertices)

    # --- case ids -----------------------------------------------------------------------------
    bits = 2 ** torch.arange(8, device=device)
    case = (occ.long() * bits).sum(dim=1)
    case = _resolve_ambiguity(case, cube_xyz, resolution)

    # --- dual vertices ------------------------------------------------------------------------
    # Order: cubes grouped by their number of dual vertices (ascending, stable), then by group.
    num_vd = tables.on_device("NUM_VD_TABLE", device)[case]
    _, order = torch.sort(num_vd, stable=True)
    vd_cube = torch.repeat_interleave(order, num_vd[order])  # [M]
    n_vd = vd_cube.numel()
    starts = torch.cumsum(num_vd[order], 0) - num_vd[order]
    vd_group = torch.arange(n_vd, device=device) - torch.repeat_interleave(starts, num_vd[order])
    groups = tables.on_device("DMC_TABLE", device)[case[vd_cube], vd_group]  # [M, 7], -1 padded

    # One row per (dual vertex, edge of its group): these are exactly the sign-changing edges of
    # the surface cubes, each listed once, dual vertex by dual vertex in table order.
    in_group = groups >= 0
    group_size = in_group.sum(dim=1)
    slot_vd, slot_k = in_group.nonzero(as_tuple=True)
    edge = groups[slot_vd, slot_k]
    cube = vd_cube[slot_vd]
    ca = tables.on_device("EDGE_A", device)[edge]
    cb = tables.on_device("EDGE_B", device)[edge]
    va, vb = cube_corners[cube, ca], cube_corners[cube, cb]

    # Zero crossing of each edge with the sdf scaled by alpha, weighted by beta.
    wa = (sdf[va] * alpha[cube, ca])[:, None]
    wb = (sdf[vb] * alpha[cube, cb])[:, None]
    edge_beta = beta[cube, edge][:, None]
    payload = vertices if colors is None else torch.cat((vertices, colors), dim=1)
    crossing = _interp(wa, wb, payload[va], payload[vb]) * edge_beta
    first = torch.cumsum(group_size, 0) - group_size
    beta_sum = _sum_in_order(edge_beta, first, group_size)
    vd_payload = _sum_in_order(crossing, first, group_size) / beta_sum
    del crossing
    vd = vd_payload[:, :3].contiguous()
    vd_color = None if colors is None else vd_payload[:, 3:].contiguous()

    # --- quads around sign-changing edges shared by 4 cubes -------------------------------------
    # An edge is named by its first endpoint and direction, ordered like the reference's sorted
    # (first, second) endpoint ids; each of its cubes gets its rank 0..3 in linear cube order.
    offsets = tables.on_device("CORNER_OFFSETS", device)
    r1 = resolution + 1
    p0 = cube_xyz[cube] + offsets[ca]
    edge_key = ((p0[:, 0] * r1 + p0[:, 1]) * r1 + p0[:, 2]) * 3
    edge_key += tables.on_device("EDGE_ORDER", device)[edge]
    slot_key = edge_key * 4 + tables.on_device("QUAD_POSITION", device)[edge]
    slot_key, perm = torch.sort(slot_key)
    _, per_edge = torch.unique_consecutive(slot_key // 4, return_counts=True)
    full = torch.repeat_interleave(per_edge == 4, per_edge)  # edges inside the grid
    quads = slot_vd[perm[full]].reshape(-1, 4)
    first_end = va[perm[full]].reshape(-1, 4)[:, 0]
    # Orient every quad so its normal points towards positive sdf.  (An sdf of exactly 0 at the
    # first endpoint counts as outside for the cut test but as inside here, as in the reference.)
    flip = sdf[first_end] > 0
    quads = torch.cat((quads[flip][:, [0, 1, 3, 2]], quads[~flip][:, [2, 3, 1, 0]]))

    # --- split quads along the diagonal with the larger gamma product ---------------------------
    quad_gamma = gamma[vd_cube][quads]
    split_02 = quad_gamma[:, 0] * quad_gamma[:, 2] > quad_gamma[:, 1] * quad_gamma[:, 3]
    tri_02 = quads[:, [0, 1, 2, 0, 2, 3]]
    tri_13 = quads[:, [0, 1, 3, 3, 1, 2]]
    faces = torch.where(split_02[:, None], tri_02, tri_13).reshape(-1, 3)
    return vd, faces, vd_color

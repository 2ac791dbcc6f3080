"""Submanifold sparse 3D convolution over neighbour tables built once per coordinate set.

The weight layout is the official one, ``[out, kx, ky, kz, in]``: kernel cell ``(dx, dy, dz)``
reads the input voxel at offset ``(dx - 1, dy - 1, dz - 1)`` from the output voxel. Output sites
are the input sites. ``spconv`` may serve CUDA tensors instead when installed; never CPU tensors,
whose multi-threaded spconv convolution gives wrong, run-to-run different results.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from amodal3r.api.environment import SPARSE_CONV, SPCONV_ON_CPU

from ..matmul import linear
from ..shortcuts import SHORTCUTS
from .tensor import SparseTensor

NeighbourMap = list[tuple[torch.Tensor, torch.Tensor]]
GATHER_BYTES = 64 << 20  # size of one chunk of gathered neighbour features
GATHER_MAX_CHANNELS = 64  # wider inputs convolve per kernel cell instead


def coordinate_keys(coords: torch.Tensor, extent: int) -> torch.Tensor:
    """One int64 key per voxel, ordered like ``(batch, x, y, z)``; coordinates may be -1..extent."""
    c = coords.long() + 1
    side = extent + 2
    return ((c[:, 0] * side + c[:, 1]) * side + c[:, 2]) * side + c[:, 3]


def kernel_offsets(kernel_size: int, device: torch.device) -> torch.Tensor:
    """``[k^3, 3]`` offsets in weight order (x slowest, z fastest), centred on zero."""
    r = torch.arange(kernel_size, device=device) - kernel_size // 2
    grid = torch.meshgrid(r, r, r, indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3).int()


def build_neighbour_index(coords: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``[N, k^3]``: for each voxel and kernel cell, the row of the neighbour it reads, or ``N``
    where there is none (a zero row is appended to the features at that index)."""
    n = coords.shape[0]
    extent = int(coords[:, 1:].max().item()) + 1 if n else 1
    keys = coordinate_keys(coords, extent + kernel_size)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    offsets = kernel_offsets(kernel_size, coords.device)
    index = torch.full((n, len(offsets)), n, dtype=torch.long, device=coords.device)
    for k, offset in enumerate(offsets):
        shifted = coords.clone()
        shifted[:, 1:] += offset
        query = coordinate_keys(shifted, extent + kernel_size)
        pos = torch.searchsorted(sorted_keys, query).clamp_(max=max(n - 1, 0))
        found = (sorted_keys[pos] == query) & (shifted[:, 1:] >= 0).all(dim=1) if n else query < 0
        index[found, k] = order[pos[found]]
    return index


def _subdivision_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """``[8, 27]`` each: for child ``c`` (bits ``4x + 2y + z``) and 3^3 kernel cell ``k``, the parent
    kernel cell holding the neighbour and which child of that parent it is."""
    parent_cell = torch.empty(8, 27, dtype=torch.long)
    child = torch.empty(8, 27, dtype=torch.long)
    for c in range(8):
        bits = (c >> 2 & 1, c >> 1 & 1, c & 1)
        for k in range(27):
            moved = [b + d for b, d in zip(bits, (k // 9 - 1, k // 3 % 3 - 1, k % 3 - 1), strict=True)]
            e = [m // 2 for m in moved]  # -1, 0 or 1 parent cells away
            parent_cell[c, k] = 9 * (e[0] + 1) + 3 * (e[1] + 1) + (e[2] + 1)
            child[c, k] = 4 * (moved[0] % 2) + 2 * (moved[1] % 2) + moved[2] % 2
    return parent_cell, child


def subdivided_neighbour_index(parent_index: torch.Tensor) -> torch.Tensor:
    """The 3^3 neighbour index of a subdivided set (row ``8 p + c`` is child ``c`` of parent ``p``,
    every parent has all 8 children) from its parents' 3^3 index, by table lookups: a child's
    neighbour exists exactly when the parent cell holding it does. Equals :func:`build_neighbour_index`
    on the children's coordinates, without 27 searches over 8x as many keys."""
    n = parent_index.shape[0]
    parent_cell, child = (t.to(parent_index.device) for t in _subdivision_tables())
    parents = parent_index[:, parent_cell.reshape(-1)].reshape(n, 8, 27)
    index = torch.where(parents < n, 8 * parents + child, 8 * n)
    return index.reshape(8 * n, 27)


def neighbour_index(x: SparseTensor, kernel_size: int) -> torch.Tensor:
    key = ("neighbour_index", kernel_size)
    if key not in x.cache:
        x.cache[key] = build_neighbour_index(x.coords, kernel_size)
    return x.cache[key]


def neighbour_map(x: SparseTensor, kernel_size: int) -> NeighbourMap:
    """Per kernel cell, the pairs ``(out_rows, in_rows)`` it connects (for per-cell kernels)."""
    key = ("neighbours", kernel_size)
    if key not in x.cache:
        index = neighbour_index(x, kernel_size)
        rows = torch.arange(index.shape[0], device=index.device)
        x.cache[key] = [(rows[column < index.shape[0]], column[column < index.shape[0]]) for column in index.t()]
    return x.cache[key]


def gathered_conv(
    feats: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``out[o] = bias + sum_k W_k @ feats[index[o, k]]``: the k^3 neighbours of a chunk of voxels
    are gathered side by side and multiplied by the flattened kernel in one GEMM per chunk.
    Fastest for narrow features (the decoders' 128^3 and 256^3 levels)."""
    c_out, c_in = weight.shape[0], weight.shape[-1]
    kernel = weight.reshape(c_out, -1)  # [out, k^3 * in]: neighbour-major like the gathered rows
    padded = torch.cat([feats, feats.new_zeros(1, c_in)])
    out = feats.new_empty(feats.shape[0], c_out)
    chunk = max(1024, GATHER_BYTES // (index.shape[1] * c_in * feats.element_size()))
    for start in range(0, feats.shape[0], chunk):
        gathered = padded[index[start : start + chunk]].reshape(-1, kernel.shape[1])
        out[start : start + chunk] = linear(gathered, kernel)
    if bias is not None:
        out += bias
    return out


def add_rows(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``out[rows] += values`` for distinct ``rows``. A kernel cell reaches each voxel at most once, so
    a gather, an add and an indexed copy do it: all three run in parallel, where torch's CPU
    scatter-add (``index_add_``) does not. Same sums, same rounding."""
    if SHORTCUTS.scatter_free:
        out[rows] = out.index_select(0, rows).add_(values)
    else:
        out.index_add_(0, rows, values)


def scattered_conv(
    feats: torch.Tensor, pairs: NeighbourMap, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The same convolution as one GEMM per kernel cell over the voxel pairs it connects, added
    into place. Fastest for wide features, where gathering 27 copies costs more than it saves."""
    c_out, c_in = weight.shape[0], weight.shape[-1]
    kernels = weight.reshape(c_out, -1, c_in)
    centre = len(pairs) // 2
    out = linear(feats, kernels[:, centre])
    for k, (out_rows, in_rows) in enumerate(pairs):
        if k != centre and out_rows.numel():
            add_rows(out, out_rows, linear(feats.index_select(0, in_rows), kernels[:, k]))
    if bias is not None:
        out += bias
    return out


def submanifold_conv(
    x: SparseTensor, feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Pick the faster formulation for the feature width (measured on a 2-core CPU)."""
    kernel_size = weight.shape[1]
    if weight.shape[-1] <= GATHER_MAX_CHANNELS:
        return gathered_conv(feats, neighbour_index(x, kernel_size), weight, bias)
    return scattered_conv(feats, neighbour_map(x, kernel_size), weight, bias)


class _Kernel(nn.Module):
    """Holds ``weight [out, k, k, k, in]`` and ``bias`` under the official ``.conv`` key prefix."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, kernel_size, kernel_size, kernel_size, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        bound = (in_channels * kernel_size**3) ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def use_spconv(x: SparseTensor) -> bool:
    """``AMODAL3R_SPARSE_CONV=spconv`` routes CUDA tensors through spconv. CPU tensors go through it
    only when also ``AMODAL3R_SPCONV_ON_CPU=1`` with torch on one thread, to compare the backends."""
    if os.environ.get(SPARSE_CONV, "torch") != "spconv":
        return False
    if x.device.type == "cuda":
        return True
    return os.environ.get(SPCONV_ON_CPU) == "1" and torch.get_num_threads() == 1


class SparseConv3d(nn.Module):
    """Submanifold convolution (output sites = input sites), stride 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.conv = _Kernel(in_channels, out_channels, kernel_size, bias)

    def forward(self, x: SparseTensor) -> SparseTensor:
        feats = x.feats.to(self.conv.weight.dtype)
        if use_spconv(x):
            from .spconv_backend import spconv_submanifold_conv

            out = spconv_submanifold_conv(x, feats, self.conv.weight, self.conv.bias)
        else:
            out = submanifold_conv(x, feats, self.conv.weight, self.conv.bias)
        return x.replace(out)

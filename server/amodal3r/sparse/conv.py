"""Submanifold sparse 3D convolution by gather-GEMM-scatter over cached neighbour maps.

The weight layout is the official one, ``[out, kx, ky, kz, in]``: kernel cell ``(dx, dy, dz)``
reads the input voxel at offset ``(dx - 1, dy - 1, dz - 1)`` from the output voxel. Output sites
are the input sites. ``spconv`` may serve CUDA tensors instead when installed; never CPU tensors,
whose multi-threaded spconv convolution gives wrong, run-to-run different results.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .tensor import SparseTensor

NeighbourMap = list[tuple[torch.Tensor, torch.Tensor]]


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


def build_neighbour_map(coords: torch.Tensor, kernel_size: int) -> NeighbourMap:
    """For each kernel cell, the pairs ``(out_rows, in_rows)`` of voxels that it connects."""
    extent = int(coords[:, 1:].max().item()) + 1 if coords.shape[0] else 1
    keys = coordinate_keys(coords, extent + kernel_size)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    rows = torch.arange(coords.shape[0], device=coords.device)
    pairs: NeighbourMap = []
    for offset in kernel_offsets(kernel_size, coords.device):
        if not offset.any():
            pairs.append((rows, rows))
            continue
        shifted = coords.clone()
        shifted[:, 1:] += offset
        query = coordinate_keys(shifted, extent + kernel_size)
        pos = torch.searchsorted(sorted_keys, query).clamp_(max=max(len(sorted_keys) - 1, 0))
        found = sorted_keys[pos] == query if len(sorted_keys) else torch.zeros_like(query, dtype=torch.bool)
        found &= (shifted[:, 1:] >= 0).all(dim=1)
        pairs.append((rows[found], order[pos[found]]))
    return pairs


def neighbour_map(x: SparseTensor, kernel_size: int) -> NeighbourMap:
    key = ("neighbours", kernel_size)
    if key not in x.cache:
        x.cache[key] = build_neighbour_map(x.coords, kernel_size)
    return x.cache[key]


def submanifold_conv(feats: torch.Tensor, pairs: NeighbourMap, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """``out[o] = bias + sum_k W_k @ feats[i]`` over the neighbour pairs ``(o, i)`` of each cell ``k``."""
    c_out, c_in = weight.shape[0], weight.shape[-1]
    kernels = weight.reshape(c_out, -1, c_in)
    centre = len(pairs) // 2
    out = feats @ kernels[:, centre].t()
    for k, (out_rows, in_rows) in enumerate(pairs):
        if k == centre or out_rows.numel() == 0:
            continue
        out.index_add_(0, out_rows, feats.index_select(0, in_rows) @ kernels[:, k].t())
    if bias is not None:
        out += bias
    return out


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
    if os.environ.get("AMODAL3R_SPARSE_CONV", "torch") != "spconv":
        return False
    if x.device.type == "cuda":
        return True
    return os.environ.get("AMODAL3R_SPCONV_ON_CPU") == "1" and torch.get_num_threads() == 1


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
            out = submanifold_conv(feats, neighbour_map(x, self.kernel_size), self.conv.weight, self.conv.bias)
        return x.replace(out)


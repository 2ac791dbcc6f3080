"""Sparse 2x downsampling (average pooling) and the matching upsampling (copy back)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..shortcuts import SHORTCUTS
from .tensor import SparseTensor


@dataclass
class DownsampleMap:
    """How fine rows pool into coarse rows; cached so every layer and step reuses it."""

    coarse_coords: torch.Tensor
    fine_to_coarse: torch.Tensor
    divisor: torch.Tensor
    coarse_cache: dict
    children: torch.Tensor  # [coarse, most children] fine rows in order, padded with the row count


def children_table(fine_to_coarse: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[coarse, max(counts)]``: the fine rows of each coarse voxel in increasing order, padded with
    ``len(fine_to_coarse)`` (which reads a zero row appended to the features)."""
    n = fine_to_coarse.shape[0]
    order = torch.argsort(fine_to_coarse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n, device=order.device) - starts[fine_to_coarse[order]]
    table = torch.full((counts.shape[0], int(counts.max()) if n else 1), n, dtype=torch.long, device=order.device)
    table[fine_to_coarse[order], slot] = order
    return table


def downsample_map(x: SparseTensor, factor: int) -> DownsampleMap:
    key = ("downsample", factor)
    if key not in x.cache:
        coarse = x.coords.clone()
        coarse[:, 1:] //= factor
        extent = int(coarse[:, 1:].max().item()) + 1 if coarse.shape[0] else 1
        c = coarse.long()
        keys = ((c[:, 0] * extent + c[:, 1]) * extent + c[:, 2]) * extent + c[:, 3]
        unique_keys, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        coords = torch.stack(
            [
                unique_keys // extent**3,
                unique_keys // extent**2 % extent,
                unique_keys // extent % extent,
                unique_keys % extent,
            ],
            dim=1,
        ).int()
        # The reference pools with scatter_reduce('mean') onto zeros with include_self=True, so each
        # coarse voxel is divided by (children + 1). The official weights were trained that way.
        divisor = (counts + 1).unsqueeze(1)
        x.cache[key] = DownsampleMap(
            coords,
            inverse,
            divisor,
            {("upsample", factor): (x.coords, x.layout, inverse, x.cache)},
            children_table(inverse, counts),
        )
    return x.cache[key]


class SparseDownsample(nn.Module):
    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = factor

    def forward(self, x: SparseTensor) -> SparseTensor:
        m = downsample_map(x, self.factor)
        if SHORTCUTS.scatter_free:
            padded = torch.cat([x.feats, x.feats.new_zeros(1, *x.feats.shape[1:])])
            pooled = padded[m.children].sum(dim=1)  # children in row order; rounding may differ slightly
        else:
            pooled = torch.zeros(m.coarse_coords.shape[0], *x.feats.shape[1:], dtype=x.dtype, device=x.device)
            pooled.index_add_(0, m.fine_to_coarse, x.feats)
        pooled = pooled / m.divisor.to(x.dtype).view(-1, *[1] * (x.feats.dim() - 1))
        return SparseTensor(pooled, m.coarse_coords, x.batch_size, cache=m.coarse_cache)


class SparseUpsample(nn.Module):
    """Nearest upsampling back onto the fine coordinates of the paired :class:`SparseDownsample`."""

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = factor

    def forward(self, x: SparseTensor) -> SparseTensor:
        entry = x.cache.get(("upsample", self.factor))
        if entry is None:
            raise ValueError("SparseUpsample needs the coordinates of a preceding SparseDownsample")
        fine_coords, fine_layout, fine_to_coarse, fine_cache = entry
        return SparseTensor(x.feats.index_select(0, fine_to_coarse), fine_coords, x.batch_size, fine_layout, fine_cache)

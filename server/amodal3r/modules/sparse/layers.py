"""Per-voxel layers on :class:`SparseTensor` features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..matmul import linear
from .tensor import SparseTensor


class SparseLinear(nn.Linear):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(linear(x.feats, self.weight, self.bias))


class SparseSiLU(nn.Module):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(F.silu(x.feats))


class SparseGELU(nn.GELU):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(x.feats))


class SparseLayerNorm32(nn.LayerNorm):
    """Layer norm over the channels of each voxel, computed in float32."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(x.feats.float()).type(x.dtype))


class SparseGroupNorm32(nn.GroupNorm):
    """Group norm over all voxels of each batch element, computed in float32."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        feats = x.feats.float()
        out = torch.empty_like(feats)
        for rows in x.layout:
            part = feats[rows].t().unsqueeze(0)
            out[rows] = super().forward(part).squeeze(0).t()
        return x.replace(out.type(x.dtype))

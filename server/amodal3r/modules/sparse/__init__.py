"""Sparse voxel tensors and layers in pure PyTorch."""

from .conv import SparseConv3d, build_neighbour_index
from .layers import (
    SparseGELU,
    SparseGroupNorm32,
    SparseLayerNorm32,
    SparseLinear,
    SparseSiLU,
)
from .spatial import SparseDownsample, SparseUpsample
from .tensor import SparseTensor

__all__ = [
    "SparseConv3d",
    "SparseDownsample",
    "SparseGELU",
    "SparseGroupNorm32",
    "SparseLayerNorm32",
    "SparseLinear",
    "SparseSiLU",
    "SparseTensor",
    "SparseUpsample",
    "build_neighbour_index",
]

"""Optional spconv implementation of the submanifold convolution, for CUDA tensors."""

from __future__ import annotations

import torch

from .tensor import SparseTensor


def spconv_submanifold_conv(
    x: SparseTensor, feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The same convolution through ``spconv.SubMConv3d``, sharing our ``[out, k, k, k, in]`` weight."""
    import spconv.pytorch as spconv

    c_out, k, c_in = weight.shape[0], weight.shape[1], weight.shape[-1]
    conv = spconv.SubMConv3d(c_in, c_out, k, bias=bias is not None, algo=spconv.ConvAlgo.Native)
    conv.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        conv.bias = torch.nn.Parameter(bias, requires_grad=False)
    spatial = (x.coords[:, 1:].max(dim=0).values + 1).tolist()
    return conv(spconv.SparseConvTensor(feats.contiguous(), x.coords, spatial, x.batch_size)).features

"""Structured-latent mesh decoder: 64^3 latents -> per-cube FlexiCubes features at 256^3 -> mesh.

The transformer trunk runs on the 64^3 voxels; two subdivision blocks split every voxel into its
8 children twice (64 -> 128 -> 256), and a linear layer predicts, per 256^3 cube, the FlexiCubes
inputs: 8 corner sdf values, 8x3 corner deformations, 21 weights and, with ``use_color``, 8x6
corner colour channels (101 channels in all, 53 without colour).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..representations.mesh import Mesh, sparse_features_to_mesh
from ..sparse import SparseConv3d, SparseGroupNorm32, SparseLinear, SparseSiLU, SparseTensor
from .structured_latent_vae import AttnMode, SparseTransformerBase

# Child c of a voxel sits at 2 * voxel + CHILD_OFFSETS[c], c = 4*dx + 2*dy + dz.
CHILD_OFFSETS = torch.tensor([[dx, dy, dz] for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)], dtype=torch.int32)

SDF_CHANNELS, DEFORM_CHANNELS, WEIGHT_CHANNELS, COLOR_CHANNELS = 8, 8 * 3, 21, 8 * 6


def mesh_feature_channels(use_color: bool) -> int:
    return SDF_CHANNELS + DEFORM_CHANNELS + WEIGHT_CHANNELS + (COLOR_CHANNELS if use_color else 0)


def subdivide(x: SparseTensor) -> SparseTensor:
    """Each voxel becomes its 8 children at twice the resolution, all carrying its features.

    Row ``i`` becomes rows ``8*i + c``, so batch elements stay contiguous. The child coordinates
    (and their cache of neighbour maps) are kept in the parent's cache for reuse.
    """
    key = ("subdivide",)
    if key not in x.cache:
        offsets = torch.cat([torch.zeros(8, 1, dtype=torch.int32), CHILD_OFFSETS], dim=1).to(x.coords.device)
        parent = x.coords * torch.tensor([1, 2, 2, 2], dtype=torch.int32, device=x.coords.device)
        coords = (parent[:, None, :] + offsets[None]).reshape(-1, 4)
        layout = [slice(8 * s.start, 8 * s.stop) for s in x.layout]
        x.cache[key] = (coords, layout, {})
    coords, layout, cache = x.cache[key]
    feats = x.feats.unsqueeze(1).expand(-1, 8, *x.feats.shape[1:]).reshape(-1, *x.feats.shape[1:])
    return SparseTensor(feats, coords, x.batch_size, layout, cache)


class SpconvPointwiseConv3d(SparseConv3d):
    """A 1x1x1 sparse convolution computed the way spconv 2 computes it, which the official weights
    were trained with: spconv stores the weight as ``[out, 1, 1, 1, in]`` but its 1x1 fast path
    multiplies by that memory viewed as ``[in, out]`` (a reinterpretation, not a transpose).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: SparseTensor) -> SparseTensor:
        weight = self.conv.weight.reshape(self.in_channels, self.out_channels)
        out = x.feats.to(weight.dtype) @ weight
        return x.replace(out if self.conv.bias is None else out + self.conv.bias)


class SparseSubdivide(nn.Module):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return subdivide(x)


class SparseSubdivideBlock3d(nn.Module):
    """GroupNorm-SiLU, subdivide, conv-GroupNorm-SiLU-conv, plus a (1x1x1 conv) skip of the subdivided input."""

    def __init__(self, channels: int, resolution: int, out_channels: int | None = None, num_groups: int = 32):
        super().__init__()
        self.channels, self.resolution, self.out_resolution = channels, resolution, resolution * 2
        self.out_channels = out_channels or channels
        self.act_layers = nn.Sequential(SparseGroupNorm32(num_groups, channels), SparseSiLU())
        self.sub = SparseSubdivide()
        self.out_layers = nn.Sequential(
            SparseConv3d(channels, self.out_channels, 3),
            SparseGroupNorm32(num_groups, self.out_channels),
            SparseSiLU(),
            SparseConv3d(self.out_channels, self.out_channels, 3),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = SpconvPointwiseConv3d(channels, self.out_channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.out_layers(self.sub(self.act_layers(x)))
        # The skip acts on each row alone, so it runs before subdividing: same values, 8x less work.
        return h.replace(h.feats + self.sub(self.skip_connection(x)).feats)


class SLatMeshDecoder(SparseTransformerBase):
    """TRELLIS's structured-latent mesh decoder (official args and state-dict keys)."""

    def __init__(self, resolution: int, model_channels: int, latent_channels: int, num_blocks: int,
                 num_heads: int | None = None, num_head_channels: int | None = 64, mlp_ratio: float = 4,
                 attn_mode: AttnMode = "swin", window_size: int = 8, pe_mode: Literal["ape", "rope"] = "ape",
                 use_fp16: bool = False, use_checkpoint: bool = False, qk_rms_norm: bool = False,
                 representation_config: dict | None = None):
        super().__init__(latent_channels, model_channels, num_blocks, num_heads, num_head_channels, mlp_ratio,
                         attn_mode, window_size, pe_mode, use_fp16=False, qk_rms_norm=qk_rms_norm)
        self.resolution = resolution
        self.rep_config = dict(representation_config or {})
        self.use_color = bool(self.rep_config.get("use_color", False))
        self.mesh_resolution = resolution * 4
        self.out_channels = mesh_feature_channels(self.use_color)
        self.upsample = nn.ModuleList([
            SparseSubdivideBlock3d(model_channels, resolution, model_channels // 4),
            SparseSubdivideBlock3d(model_channels // 4, resolution * 2, model_channels // 8),
        ])
        self.out_layer = SparseLinear(model_channels // 8, self.out_channels)
        if use_fp16:
            self.set_torso_dtype(torch.float16)

    def torso(self) -> list[nn.Module]:
        return [self.blocks, self.upsample]

    def decode(self, x: SparseTensor) -> SparseTensor:
        """The per-cube features at ``4 * resolution`` right before mesh extraction."""
        h = super().forward(x)
        for block in self.upsample:
            h = block(h)
        return self.out_layer(h.type(x.dtype))

    def to_representation(self, x: SparseTensor) -> list[Mesh]:
        """One FlexiCubes mesh per batch element."""
        return [sparse_features_to_mesh(x.coords[rows], x.feats[rows].float(), self.mesh_resolution, self.use_color)
                for rows in x.layout]

    def forward(self, x: SparseTensor) -> list[Mesh]:
        return self.to_representation(self.decode(x))


class ElasticSLatMeshDecoder(SLatMeshDecoder):
    """TRELLIS's memory-elastic training variant; at inference it is the plain decoder."""

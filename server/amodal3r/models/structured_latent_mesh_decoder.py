"""Structured-latent mesh decoder: 64^3 latents -> per-cube FlexiCubes features at 256^3 -> mesh.

The transformer trunk runs on the 64^3 voxels; two subdivision blocks split every voxel into its
8 children twice (64 -> 128 -> 256), and a linear layer predicts, per 256^3 cube, the FlexiCubes
inputs: 8 corner sdf values, 8x3 corner deformations, 21 weights and, with ``use_color``, 8x6
corner colour channels (101 channels in all, 53 without colour).
"""

from __future__ import annotations

import torch
from torch import nn

from amodal3r.modules.matmul import linear
from amodal3r.modules.shortcuts import SHORTCUTS
from amodal3r.modules.sparse import (
    SparseConv3d,
    SparseGroupNorm32,
    SparseLinear,
    SparseSiLU,
    SparseTensor,
)
from amodal3r.modules.sparse.conv import add_rows, neighbour_index, neighbour_map, subdivided_neighbour_index
from amodal3r.representations.mesh import Mesh, sparse_features_to_mesh

from .structured_latent_vae import SparseTransformerBase

# Child c of a voxel sits at 2 * voxel + CHILD_OFFSETS[c], c = 4*dx + 2*dy + dz.
CHILD_OFFSETS = torch.tensor([[dx, dy, dz] for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)], dtype=torch.int32)

SDF_CHANNELS, DEFORM_CHANNELS, WEIGHT_CHANNELS, COLOR_CHANNELS = 8, 8 * 3, 21, 8 * 6


def mesh_feature_channels(use_color: bool) -> int:
    return SDF_CHANNELS + DEFORM_CHANNELS + WEIGHT_CHANNELS + (COLOR_CHANNELS if use_color else 0)


def _children(x: SparseTensor) -> tuple[torch.Tensor, list[slice], dict]:
    """Coordinates, layout and (shared) cache of the subdivided voxels, kept in the parent's cache."""
    key = ("subdivide",)
    if key not in x.cache:
        offsets = torch.cat([torch.zeros(8, 1, dtype=torch.int32), CHILD_OFFSETS], dim=1).to(x.coords.device)
        parent = x.coords * torch.tensor([1, 2, 2, 2], dtype=torch.int32, device=x.coords.device)
        coords = (parent[:, None, :] + offsets[None]).reshape(-1, 4)
        layout = [slice(8 * s.start, 8 * s.stop) for s in x.layout]
        cache = {}
        if SHORTCUTS.subdivided_neighbours:
            cache[("neighbour_index", 3)] = subdivided_neighbour_index(neighbour_index(x, 3))
        x.cache[key] = (coords, layout, cache)
    return x.cache[key]


def subdivide(x: SparseTensor) -> SparseTensor:
    """Each voxel becomes its 8 children at twice the resolution, all carrying its features.

    Row ``i`` becomes rows ``8*i + c``, so batch elements stay contiguous.
    """
    coords, layout, cache = _children(x)
    feats = x.feats.unsqueeze(1).expand(-1, 8, *x.feats.shape[1:]).reshape(-1, *x.feats.shape[1:])
    return SparseTensor(feats, coords, x.batch_size, layout, cache)


def _child_to_parent_offsets(bit: int) -> torch.Tensor:
    """``[3, 3]``: entry ``(e+1, d+1)`` is 1 when a child with this coordinate bit, moved by ``d``,
    lands in the parent at offset ``e``, i.e. ``(bit + d) // 2 == e``."""
    return torch.tensor([[float((bit + d) // 2 == e) for d in (-1, 0, 1)] for e in (-1, 0, 1)])


def _parent_kernels(weight: torch.Tensor) -> torch.Tensor:
    """``[8, out, 3, 3, 3, in]``: the 3^3 kernel of a conv on subdivided voxels, folded per child onto
    the parent grid (the kernel taps that read the same parent's children are summed)."""
    axis = [_child_to_parent_offsets(bit).to(weight.device) for bit in (0, 1)]
    w = weight.float()
    return torch.stack(
        [
            torch.einsum("ad,be,cf,odefi->oabci", axis[int(c[0])], axis[int(c[1])], axis[int(c[2])], w)
            for c in CHILD_OFFSETS
        ]
    ).to(weight.dtype)


def conv_after_subdivide(x: SparseTensor, conv: SparseConv3d) -> SparseTensor:
    """``conv(subdivide(x))`` without materialising the subdivided features.

    The 8 children of a voxel share its features, and a child's neighbour exists exactly when the
    parent cell holding it exists. So each child's 3^3 convolution is a convolution over the parent
    grid with folded kernels, of which only 2 parent offsets per axis are non-zero: 64 instead of
    216 products per parent. The result equals the direct convolution up to float rounding.
    """
    if conv.kernel_size != 3:
        raise ValueError("conv_after_subdivide expects a 3x3x3 submanifold convolution")
    kernels = _parent_kernels(conv.conv.weight)  # [8, out, 3, 3, 3, in]
    c_out, feats = kernels.shape[1], x.feats.to(kernels.dtype)
    n = feats.shape[0]
    # Centre offset: every child reads its own parent.
    out = linear(feats, kernels[:, :, 1, 1, 1].reshape(8 * c_out, -1)).reshape(8 * n, c_out)
    for k, (out_rows, in_rows) in enumerate(neighbour_map(x, 3)):
        e = (k // 9 - 1, k // 3 % 3 - 1, k % 3 - 1)
        if e == (0, 0, 0) or out_rows.numel() == 0:
            continue
        # Children whose bit along each moved axis points towards the offset reach that parent.
        children = [
            c
            for c, bits in enumerate(CHILD_OFFSETS.tolist())
            if all(step == 0 or bit == (step > 0) for bit, step in zip(bits, e, strict=True))
        ]
        w = kernels[children, :, e[0] + 1, e[1] + 1, e[2] + 1]  # [m, out, in]
        part = linear(feats.index_select(0, in_rows), w.reshape(len(children) * c_out, -1))
        rows = 8 * out_rows[:, None] + torch.tensor(children, device=out_rows.device)[None]
        add_rows(out, rows.reshape(-1), part.reshape(-1, c_out))
    if conv.conv.bias is not None:
        out += conv.conv.bias
    coords, layout, cache = _children(x)
    return SparseTensor(out, coords, x.batch_size, layout, cache)


class SpconvPointwiseConv3d(SparseConv3d):
    """A 1x1x1 sparse convolution computed the way spconv 2 computes it, which the official weights
    were trained with: spconv stores the weight as ``[out, 1, 1, 1, in]`` but its 1x1 fast path
    multiplies by that memory viewed as ``[in, out]`` (a reinterpretation, not a transpose).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: SparseTensor) -> SparseTensor:
        weight = self.conv.weight.reshape(self.in_channels, self.out_channels)
        out = linear(x.feats.to(weight.dtype), weight.t())
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
        # Same as out_layers(sub(act_layers(x))) + skip(sub(x)); the first conv and the per-row skip
        # run on the parents, where they are cheaper (see conv_after_subdivide).
        h = conv_after_subdivide(self.act_layers(x), self.out_layers[0])
        for layer in self.out_layers[1:]:
            h = layer(h)
        return h.replace(h.feats + self.sub(self.skip_connection(x)).feats)


class SLatMeshDecoder(SparseTransformerBase):
    """TRELLIS's structured-latent mesh decoder (official args and state-dict keys)."""

    def __init__(
        self,
        resolution: int,
        model_channels: int,
        latent_channels: int,
        num_blocks: int,
        representation_config: dict | None = None,
        use_fp16: bool = False,
        **trunk: object,
    ):
        trunk = {"attn_mode": "swin", "window_size": 8, **trunk}
        super().__init__(latent_channels, model_channels, num_blocks, **trunk)  # type: ignore[arg-type]
        self.resolution = resolution
        self.rep_config = dict(representation_config or {})
        self.use_color = bool(self.rep_config.get("use_color", False))
        self.mesh_resolution = resolution * 4
        self.out_channels = mesh_feature_channels(self.use_color)
        self.upsample = nn.ModuleList(
            [
                SparseSubdivideBlock3d(model_channels, resolution, model_channels // 4),
                SparseSubdivideBlock3d(model_channels // 4, resolution * 2, model_channels // 8),
            ]
        )
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
        return [
            sparse_features_to_mesh(x.coords[rows], x.feats[rows].float(), self.mesh_resolution, self.use_color)
            for rows in x.layout
        ]

    def forward(self, x: SparseTensor) -> list[Mesh]:
        return self.to_representation(self.decode(x))


class ElasticSLatMeshDecoder(SLatMeshDecoder):
    """TRELLIS's memory-elastic training variant; at inference it is the plain decoder."""

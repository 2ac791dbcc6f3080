"""Structured-latent flow model: denoises features on the occupied 64^3 voxels (TRELLIS stage 2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from amodal3r.modules.blocks import (
    LayerNorm32,
    ModulatedTransformerCrossBlock,
    TimestepEmbedder,
    absolute_position_embedding,
    convert_linear_and_conv,
)
from amodal3r.modules.condition import Condition, ConditionRows, prepare_condition
from amodal3r.modules.sparse import (
    SparseConv3d,
    SparseDownsample,
    SparseLinear,
    SparseTensor,
    SparseUpsample,
)


class SparseResBlock3d(nn.Module):
    """Norm-SiLU-conv twice with a timestep scale/shift, optionally resampling by 2 first."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        downsample: bool = False,
        upsample: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.norm1 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm2 = LayerNorm32(out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = SparseConv3d(channels, out_channels, 3)
        self.conv2 = SparseConv3d(out_channels, out_channels, 3)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.skip_connection = SparseLinear(channels, out_channels) if channels != out_channels else nn.Identity()
        self.updown = SparseDownsample(2) if downsample else SparseUpsample(2) if upsample else None

    def forward(self, x: SparseTensor, emb: torch.Tensor) -> SparseTensor:
        scale, shift = self.emb_layers(emb).type(x.dtype).chunk(2, dim=1)
        if self.updown is not None:
            x = self.updown(x)
        h = self.conv1(x.replace(F.silu(self.norm1(x.feats))))
        h = h.replace(self.norm2(h.feats)) * (1 + scale) + shift
        h = self.conv2(h.replace(F.silu(h.feats)))
        return h + self.skip_connection(x)


def position_embedding(x: SparseTensor, channels: int) -> torch.Tensor:
    """The absolute position embedding of ``x``'s voxels, kept in its cache: same voxels every step."""
    key = ("position_embedding", channels)
    if key not in x.cache:
        x.cache[key] = absolute_position_embedding(x.coords[:, 1:], channels)
    return x.cache[key]


class SLatFlowModel(nn.Module):
    """TRELLIS's structured-latent flow; ``mask_as_cond`` adds Amodal3R's mask-aware cross-attentions."""

    mask_as_cond = False

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        model_channels: int,
        cond_channels: int,
        out_channels: int,
        num_blocks: int,
        num_heads: int | None = None,
        num_head_channels: int = 64,
        mlp_ratio: float = 4,
        patch_size: int = 2,
        num_io_res_blocks: int = 2,
        io_block_channels: list[int] | None = None,
        pe_mode: str = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        use_skip_connection: bool = True,
        share_mod: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        mask_cond_type: str = "mask_patch",
    ):
        super().__init__()
        if pe_mode != "ape":
            raise ValueError(f"pe_mode {pe_mode!r} is not supported: the official models use 'ape'")
        io_block_channels = list(io_block_channels or [])
        if 2 ** len(io_block_channels) != patch_size:
            raise ValueError(
                f"patch_size {patch_size} needs log2(patch_size) = {int(math.log2(patch_size))} "
                f"io_block_channels, got {io_block_channels}"
            )
        self.resolution, self.in_channels, self.out_channels = resolution, in_channels, out_channels
        self.cond_channels = cond_channels
        self.model_channels, self.share_mod, self.use_skip_connection = model_channels, share_mod, use_skip_connection
        self.num_heads = num_heads or model_channels // num_head_channels
        self.dtype = torch.float16 if use_fp16 else torch.float32

        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels))
        self.input_layer = SparseLinear(in_channels, io_block_channels[0])
        self.input_blocks = nn.ModuleList()
        for chs, next_chs in zip(io_block_channels, io_block_channels[1:] + [model_channels], strict=True):
            self.input_blocks.extend(SparseResBlock3d(chs, model_channels) for _ in range(num_io_res_blocks - 1))
            self.input_blocks.append(SparseResBlock3d(chs, model_channels, next_chs, downsample=True))
        self.blocks = nn.ModuleList(
            [
                ModulatedTransformerCrossBlock(
                    model_channels,
                    cond_channels,
                    self.num_heads,
                    mlp_ratio,
                    qk_rms_norm=qk_rms_norm,
                    qk_rms_norm_cross=qk_rms_norm_cross,
                    share_mod=share_mod,
                    mask_as_cond=self.mask_as_cond,
                )
                for _ in range(num_blocks)
            ]
        )
        skip = 2 if use_skip_connection else 1
        self.out_blocks = nn.ModuleList()
        for chs, prev_chs in zip(reversed(io_block_channels), [model_channels] + io_block_channels[:0:-1], strict=True):
            self.out_blocks.append(SparseResBlock3d(prev_chs * skip, model_channels, chs, upsample=True))
            self.out_blocks.extend(
                SparseResBlock3d(chs * skip, model_channels, chs) for _ in range(num_io_res_blocks - 1)
            )
        self.out_layer = SparseLinear(io_block_channels[0], out_channels)
        if use_fp16:
            self.set_torso_dtype(torch.float16)

    def set_torso_dtype(self, dtype: torch.dtype) -> None:
        """Run the res-blocks and transformer in ``dtype``; embedders and io layers stay float32."""
        self.dtype = dtype
        for part in (self.input_blocks, self.blocks, self.out_blocks):
            convert_linear_and_conv(part, dtype)

    def prepare_condition(self, cond: torch.Tensor) -> ConditionRows:
        """Condition rows split once, for every step of a sampling run (see :class:`Condition`)."""
        return prepare_condition(cond, self.mask_as_cond, self.dtype)

    def forward(self, x: SparseTensor, t: torch.Tensor, cond: torch.Tensor | Condition) -> SparseTensor:
        """Velocity of ``x`` at ``t`` (one per latent). A condition tensor conditions element ``i`` on
        row ``i``; a :class:`Condition` of several groups over one group of latents shares them: the
        input blocks and the first self-attention run once."""
        condition = cond if isinstance(cond, Condition) else Condition.per_element(self.prepare_condition(cond))
        repeats = condition.repeats_for(x)
        h = self.input_layer(x).type(self.dtype)
        t_emb = self.t_embedder(t)
        if self.share_mod:
            t_emb = self.adaLN_modulation(t_emb)
        t_emb = t_emb.type(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, t_emb)
            skips.append(h.feats)
        h = h + position_embedding(h, self.model_channels).type(self.dtype)
        for i, block in enumerate(self.blocks):
            h = block(h, t_emb, condition)  # the first block repeats a shared latent
            if i == 0 and repeats > 1:
                t_emb = t_emb.repeat(repeats, 1)
        for block, skip in zip(self.out_blocks, reversed(skips), strict=True):
            if self.use_skip_connection:
                h = h.replace(torch.cat([h.feats, skip.repeat(repeats, 1) if repeats > 1 else skip], dim=1))
            h = block(h, t_emb)
        h = h.replace(F.layer_norm(h.feats, h.feats.shape[-1:]))
        return self.out_layer(h.type(x.dtype))


class SLatFlowModelMaskAsCondWeighted(SLatFlowModel):
    """Amodal3R's structured-latent flow: visibility-weighted and occlusion cross-attention per block."""

    mask_as_cond = True


class ElasticSLatFlowModel(SLatFlowModel):
    """TRELLIS's memory-elastic training variant; at inference it is the plain model."""

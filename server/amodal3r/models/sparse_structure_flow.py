"""Sparse-structure flow transformer: denoises the dense 16^3 occupancy latent (TRELLIS stage 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amodal3r.modules.blocks import (
    ModulatedTransformerCrossBlock,
    TimestepEmbedder,
    absolute_position_embedding,
    convert_linear_and_conv,
)
from amodal3r.modules.condition import Condition, ConditionRows, prepare_condition


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, X, Y, Z]`` to tokens ``[B, (X/p)(Y/p)(Z/p), C p^3]``, x slowest, z fastest."""
    b, c, *res = x.shape
    n = [r // p for r in res]
    x = x.reshape(b, c, n[0], p, n[1], p, n[2], p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, n[0] * n[1] * n[2], c * p**3)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, n: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for a cubic grid of ``n`` patches a side."""
    b = tokens.shape[0]
    x = tokens.reshape(b, n, n, n, channels, p, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, channels, n * p, n * p, n * p)


class SparseStructureFlowModel(nn.Module):
    """TRELLIS's structure flow DiT; ``mask_as_cond`` adds Amodal3R's mask-aware cross-attentions."""

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
        pe_mode: str = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        share_mod: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        mask_cond_type: str = "mask_patch",
    ):
        super().__init__()
        if pe_mode != "ape":
            raise ValueError(f"pe_mode {pe_mode!r} is not supported: the official models use 'ape'")
        self.resolution, self.in_channels, self.out_channels = resolution, in_channels, out_channels
        self.cond_channels = cond_channels
        self.model_channels, self.patch_size, self.share_mod = model_channels, patch_size, share_mod
        self.num_heads = num_heads or model_channels // num_head_channels
        self.dtype = torch.float16 if use_fp16 else torch.float32

        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels))
        n = resolution // patch_size
        grid = torch.stack(torch.meshgrid(*[torch.arange(n)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
        self.register_buffer("pos_emb", absolute_position_embedding(grid, model_channels))
        self.input_layer = nn.Linear(in_channels * patch_size**3, model_channels)
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
        self.out_layer = nn.Linear(model_channels, out_channels * patch_size**3)
        if use_fp16:
            self.set_torso_dtype(torch.float16)

    def set_torso_dtype(self, dtype: torch.dtype) -> None:
        """Run the transformer blocks in ``dtype``; embedders and input/output layers stay float32."""
        self.dtype = dtype
        convert_linear_and_conv(self.blocks, dtype)

    def prepare_condition(self, cond: torch.Tensor) -> ConditionRows:
        """Condition rows split once, for every step of a sampling run (see :class:`Condition`)."""
        return prepare_condition(cond, self.mask_as_cond, self.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | Condition) -> torch.Tensor:
        """Velocity of ``x`` at ``t`` (one per latent). A condition tensor conditions element ``i`` on
        row ``i``; a :class:`Condition` of several groups over one group of latents shares them."""
        expected = [self.in_channels] + [self.resolution] * 3
        if list(x.shape[1:]) != expected:
            raise ValueError(f"input must be [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}")
        condition = cond if isinstance(cond, Condition) else Condition.per_element(self.prepare_condition(cond))
        repeats = condition.repeats_for(x)
        h = self.input_layer(patchify(x, self.patch_size)) + self.pos_emb[None]
        t_emb = self.t_embedder(t)
        if self.share_mod:
            t_emb = self.adaLN_modulation(t_emb)
        t_emb, h = t_emb.type(self.dtype), h.type(self.dtype)
        for i, block in enumerate(self.blocks):
            h = block(h, t_emb, condition)  # the first block repeats a shared latent
            if i == 0 and repeats > 1:
                t_emb = t_emb.repeat(repeats, 1)
        h = F.layer_norm(h.type(x.dtype), h.shape[-1:])
        h = self.out_layer(h)
        return unpatchify(h, self.patch_size, self.out_channels, self.resolution // self.patch_size)


class SparseStructureFlowModelMaskAsCondWeighted(SparseStructureFlowModel):
    """Amodal3R's structure flow: visibility-weighted and occlusion cross-attention in every block."""

    mask_as_cond = True

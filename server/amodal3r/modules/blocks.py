"""Transformer building blocks shared by the flow models (dense tokens and sparse voxels alike)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention, Tokens, visibility_bias
from .condition_tokens import (
    NUM_COND_TOKENS,
    NUM_IMAGE_TOKENS,
    NUM_PATCHES,
    NUM_PREFIX_TOKENS,
)
from .sparse import SparseTensor


class LayerNorm32(nn.LayerNorm):
    """Layer norm computed in float32 whatever the activations' dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of ``t`` (already scaled to 0..1000), then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_size, self.max_period = frequency_size, max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


def absolute_position_embedding(coords: torch.Tensor, channels: int) -> torch.Tensor:
    """``[N, channels]`` sin/cos embedding of integer ``[N, 3]`` positions, zero-padded at the end."""
    freq_dim = channels // 3 // 2
    freqs = 1.0 / (10000 ** (torch.arange(freq_dim, dtype=torch.float32, device=coords.device) / freq_dim))
    angles = torch.outer(coords.reshape(-1).float(), freqs)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(coords.shape[0], -1)
    return F.pad(emb, (0, channels - emb.shape[1]))


class FeedForwardNet(nn.Module):
    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: Tokens) -> Tokens:
        if isinstance(x, SparseTensor):
            return x.replace(self.mlp(x.feats))
        return self.mlp(x)


@dataclass
class Condition:
    """The model condition split into its three parts (see :func:`split_condition`)."""

    tokens: torch.Tensor
    visibility_bias: torch.Tensor | None = None
    occlusion: torch.Tensor | None = None
    occlusion_ratios: torch.Tensor | None = None  # [B, P] when each occlusion row is ratio * ones


def split_condition(cond: torch.Tensor, mask_as_cond: bool, dtype: torch.dtype) -> Condition:
    """``cond [B, 1374 + 1369 + 1369, C]``: image tokens, visibility ratios (channel 0 is read),
    occlusion ratios (all channels, as ordinary context). Plain TRELLIS models take tokens only."""
    if not mask_as_cond:
        return Condition(cond.type(dtype))
    if cond.dim() != 3 or cond.shape[1] != NUM_COND_TOKENS:
        raise ValueError(
            f"condition must be [B, {NUM_COND_TOKENS}, C] (tokens, visibility, occlusion), got {tuple(cond.shape)}"
        )
    n_tok = NUM_IMAGE_TOKENS
    visibility = cond[:, n_tok : n_tok + NUM_PATCHES, 0].type(dtype)
    occlusion = cond[:, n_tok + NUM_PATCHES :]
    ratios = occlusion[..., 0]
    repeated = torch.equal(occlusion, ratios.unsqueeze(-1).expand_as(occlusion))
    return Condition(
        tokens=cond[:, :n_tok].type(dtype),
        visibility_bias=visibility_bias(visibility, NUM_PREFIX_TOKENS),
        occlusion=occlusion.type(dtype),
        occlusion_ratios=ratios if repeated else None,
    )


def _norm(norm: nn.Module, x: Tokens) -> Tokens:
    return x.replace(norm(x.feats)) if isinstance(x, SparseTensor) else norm(x)


def _per_batch(x: Tokens, v: torch.Tensor) -> torch.Tensor:
    """Shape a ``[B, C]`` modulation to act on dense ``[B, L, C]`` tokens; sparse ones broadcast it."""
    return v if isinstance(x, SparseTensor) else v.unsqueeze(1)


class ModulatedTransformerCrossBlock(nn.Module):
    """adaLN self-attention, cross-attention to the image tokens, adaLN MLP (TRELLIS).

    With ``mask_as_cond`` (Amodal3R) the image cross-attention is weighted by the visibility of each
    patch and a second cross-attention attends to the occlusion tokens.
    """

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        share_mod: bool = False,
        mask_as_cond: bool = False,
    ):
        super().__init__()
        self.share_mod, self.mask_as_cond = share_mod, mask_as_cond
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = MultiHeadAttention(channels, num_heads, type="self", qk_rms_norm=qk_rms_norm)
        self.cross_attn = MultiHeadAttention(
            channels, num_heads, ctx_channels, type="cross", qk_rms_norm=qk_rms_norm_cross
        )
        if mask_as_cond:
            self.norm_mask = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
            self.cross_attn_mask = MultiHeadAttention(
                channels, num_heads, ctx_channels, type="cross", qk_rms_norm=qk_rms_norm_cross
            )
        self.mlp = FeedForwardNet(channels, mlp_ratio)
        if not share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def forward(self, x: Tokens, mod: torch.Tensor, cond: Condition) -> Tokens:
        if not self.share_mod:
            mod = self.adaLN_modulation(mod)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (_per_batch(x, m) for m in mod.chunk(6, dim=1))
        h = _norm(self.norm1, x) * (1 + scale_msa) + shift_msa
        x = x + self.self_attn(h) * gate_msa
        x = x + self.cross_attn(_norm(self.norm2, x), cond.tokens, cond.visibility_bias)
        if self.mask_as_cond:
            h = _norm(self.norm_mask, x)
            if cond.occlusion_ratios is not None and not self.cross_attn_mask.qk_rms_norm:
                x = x + self.cross_attn_mask.attend_to_ratios(h, cond.occlusion_ratios)
            else:
                x = x + self.cross_attn_mask(h, cond.occlusion)
        h = _norm(self.norm3, x) * (1 + scale_mlp) + shift_mlp
        return x + self.mlp(h) * gate_mlp


def convert_linear_and_conv(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast the weights of linear and convolution layers (not norms) like the reference's fp16 torso."""
    from .sparse.conv import _Kernel

    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d, _Kernel)):
            m.to(dtype)

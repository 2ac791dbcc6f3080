"""Transformer building blocks shared by the flow models (dense tokens and sparse voxels alike)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention, Tokens
from .condition import IMAGE, OCCLUSION, Condition, cross_attend, repeat_tokens
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


def _norm(norm: nn.Module, x: Tokens) -> Tokens:
    return x.replace(norm(x.feats)) if isinstance(x, SparseTensor) else norm(x)


def _per_batch(x: Tokens, v: torch.Tensor) -> torch.Tensor:
    """Shape a ``[B, C]`` modulation to act on dense ``[B, L, C]`` tokens; sparse ones broadcast it."""
    return v if isinstance(x, SparseTensor) else v.unsqueeze(1)


class ModulatedTransformerCrossBlock(nn.Module):
    """adaLN self-attention, cross-attention to the image tokens, adaLN MLP (TRELLIS).

    With ``mask_as_cond`` (Amodal3R) the image cross-attention is weighted by the visibility of each
    patch and a second cross-attention attends to the occlusion tokens. A latent shared by several
    conditions (see :class:`Condition`) runs its self-attention once and is repeated after it.
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

    def attention_branch(self, x: Tokens, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor) -> Tokens:
        """``x + gate * self_attn(norm1(x) * (1 + scale) + shift)``: no condition, so it compiles alone."""
        h = _norm(self.norm1, x) * (1 + scale) + shift
        return x + self.self_attn(h) * gate

    def mlp_branch(self, x: Tokens, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor) -> Tokens:
        """``x + gate * mlp(norm3(x) * (1 + scale) + shift)``."""
        h = _norm(self.norm3, x) * (1 + scale) + shift
        return x + self.mlp(h) * gate

    def forward(self, x: Tokens, mod: torch.Tensor, cond: Condition) -> Tokens:
        if not self.share_mod:
            mod = self.adaLN_modulation(mod)
        x = self.attention_branch(x, *(_per_batch(x, m) for m in mod.chunk(6, dim=1)[:3]))
        repeats = cond.repeats_for(x)
        if repeats > 1:
            x, mod = repeat_tokens(x, repeats), mod.repeat(repeats, 1)
        x = x + cross_attend(self.cross_attn, _norm(self.norm2, x), cond, IMAGE)
        if self.mask_as_cond:
            x = x + cross_attend(self.cross_attn_mask, _norm(self.norm_mask, x), cond, OCCLUSION)
        return self.mlp_branch(x, *(_per_batch(x, m) for m in mod.chunk(6, dim=1)[3:]))


def convert_linear_and_conv(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast the weights of linear and convolution layers (not norms) like the reference's fp16 torso."""
    from .sparse.conv import _Kernel

    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d, _Kernel)):
            m.to(dtype)

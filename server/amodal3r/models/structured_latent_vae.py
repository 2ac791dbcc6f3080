"""Transformer trunk shared by the structured-latent decoders (TRELLIS ``SparseTransformerBase``).

Input linear -> absolute position embedding of the 64^3 voxel coordinates -> plain pre-norm
transformer blocks (self-attention + MLP, no conditioning). With ``attn_mode="swin"`` block ``i``
attends within 8^3 windows shifted by ``4 * (i % 2)`` voxels; ``"full"`` attends over each whole
batch element.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from amodal3r.modules.attention import MultiHeadAttention, varlen_self_attention
from amodal3r.modules.blocks import (
    FeedForwardNet,
    LayerNorm32,
    absolute_position_embedding,
    convert_linear_and_conv,
)
from amodal3r.modules.sparse import SparseLinear, SparseTensor
from amodal3r.modules.window_attention import (
    cached_window_partition,
    windowed_self_attention,
)

AttnMode = Literal["full", "shift_window", "shift_sequence", "shift_order", "swin"]


class SparseSelfAttention(MultiHeadAttention):
    """Sparse self-attention over whole batch elements (``window_size=None``) or shifted windows."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        window_size: int | None = None,
        shift_window: int = 0,
        qkv_bias: bool = True,
        qk_rms_norm: bool = False,
    ):
        super().__init__(channels, num_heads, type="self", qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm)
        self.window_size, self.shift_window = window_size, shift_window

    def forward(self, x: SparseTensor) -> SparseTensor:
        qkv = self.to_qkv(x.feats).reshape(-1, 3, self.num_heads, self.head_dim)
        if self.qk_rms_norm:
            q, k, v = qkv.unbind(dim=1)
            qkv = torch.stack([*self._norm_qk(q, k), v], dim=1)
        if self.window_size is None:
            h = varlen_self_attention(qkv, x.layout)
        else:
            h = windowed_self_attention(qkv, cached_window_partition(x, self.window_size, self.shift_window))
        return x.replace(self.to_out(h.reshape(-1, self.channels)))


class SparseTransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; norms non-affine, eps 1e-6."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        window_size: int | None = None,
        shift_window: int = 0,
        qk_rms_norm: bool = False,
        qkv_bias: bool = True,
        ln_affine: bool = False,
    ):
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=ln_affine, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=ln_affine, eps=1e-6)
        self.attn = SparseSelfAttention(channels, num_heads, window_size, shift_window, qkv_bias, qk_rms_norm)
        self.mlp = FeedForwardNet(channels, mlp_ratio)

    def forward(self, x: SparseTensor) -> SparseTensor:
        x = x + self.attn(x.replace(self.norm1(x.feats)))
        return x + self.mlp(x.replace(self.norm2(x.feats)))


def block_windows(attn_mode: AttnMode, num_blocks: int, window_size: int | None) -> list[tuple[int | None, int]]:
    """``(window_size, shift)`` of each block; ``window_size`` None means full attention."""
    if attn_mode == "full":
        return [(None, 0)] * num_blocks
    if attn_mode == "swin":
        if not window_size:
            raise ValueError("attn_mode 'swin' needs a window_size")
        return [(window_size, window_size // 2 * (i % 2)) for i in range(num_blocks)]
    raise ValueError(f"attn_mode {attn_mode!r} is not supported: the official decoders use 'swin' (or 'full')")


class SparseTransformerBase(nn.Module):
    """Input layer, position embedding and transformer blocks; subclasses add the output head."""

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        num_blocks: int,
        num_heads: int | None = None,
        num_head_channels: int | None = 64,
        mlp_ratio: float = 4.0,
        attn_mode: AttnMode = "full",
        window_size: int | None = None,
        pe_mode: Literal["ape", "rope"] = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        qk_rms_norm: bool = False,
    ):
        super().__init__()
        if pe_mode != "ape":
            raise ValueError(f"pe_mode {pe_mode!r} is not supported: the official decoders use 'ape'")
        self.in_channels, self.model_channels, self.num_blocks = in_channels, model_channels, num_blocks
        self.num_heads = num_heads or model_channels // num_head_channels
        self.attn_mode, self.window_size, self.pe_mode = attn_mode, window_size, pe_mode
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.input_layer = SparseLinear(in_channels, model_channels)
        self.blocks = nn.ModuleList(
            [
                SparseTransformerBlock(
                    model_channels, self.num_heads, mlp_ratio, window, shift, qk_rms_norm=qk_rms_norm
                )
                for window, shift in block_windows(attn_mode, num_blocks, window_size)
            ]
        )

    def torso(self) -> list[nn.Module]:
        """The parts whose linear and conv weights run in the torso dtype."""
        return [self.blocks]

    def set_torso_dtype(self, dtype: torch.dtype) -> None:
        """Run the torso in ``dtype``; input/output layers, norms and buffers stay float32."""
        self.dtype = dtype
        for part in self.torso():
            convert_linear_and_conv(part, dtype)

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.input_layer(x)
        h = h.replace(h.feats + absolute_position_embedding(x.coords[:, 1:], self.model_channels).to(h.dtype))
        h = h.type(self.dtype)
        for block in self.blocks:
            h = block(h)
        return h

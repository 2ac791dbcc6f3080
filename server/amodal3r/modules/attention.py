"""Multi-head attention over dense token sequences and variable-length sparse voxel sequences.

Everything runs through ``torch.nn.functional.scaled_dot_product_attention`` by default, long fp32
sequences on the CPU through :func:`amodal3r.modules.matmul.attention`. The
mask-weighted cross-attention of Amodal3R (paper Eq. 3) is SDPA with an additive key bias
``log(w + 1e-6)``. xformers or flash-attn serve CUDA tensors when installed and chosen with
``AMODAL3R_ATTN_BACKEND``; they are never required.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from amodal3r.api.environment import ATTN_BACKEND

from .matmul import attention
from .sparse import SparseTensor

WEIGHT_EPS = 1e-6
Backend = Literal["sdpa", "xformers", "flash_attn"]


def attention_backend() -> Backend:
    name = os.environ.get(ATTN_BACKEND, "sdpa")
    if name not in ("sdpa", "xformers", "flash_attn"):
        raise ValueError(f"{ATTN_BACKEND}={name!r}: choose sdpa, xformers or flash_attn")
    return name  # type: ignore[return-value]


def scaled_dot_product(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention on ``[B, L, H, D]`` tensors; ``bias`` is added to the logits (broadcast to B,H,Lq,Lk)."""
    backend = attention_backend()
    if backend != "sdpa" and q.is_cuda:
        if backend == "xformers":
            import xformers.ops as xops

            if bias is not None:
                bias = bias.to(q.dtype).expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
            return xops.memory_efficient_attention(q, k, v, attn_bias=bias)
        if bias is None:
            from flash_attn import flash_attn_func

            return flash_attn_func(q, k, v)
    return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias).transpose(1, 2)


def visibility_bias(weights: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Key bias ``[B, 1, 1, prefix + P]`` of the mask-weighted attention: weight 1 on the CLS and
    register tokens, the visibility ratio on each patch token."""
    ones = torch.ones(weights.shape[0], num_prefix, dtype=weights.dtype, device=weights.device)
    w = torch.cat([ones, weights], dim=1)
    return torch.log(w + WEIGHT_EPS)[:, None, None, :]


def jagged_by_default(t: torch.Tensor) -> bool:
    """Sequences of different lengths go through one jagged call on CUDA (flash or memory-efficient
    kernels, no padding); on the CPU the per-sequence calls and padded window buckets are faster."""
    return t.is_cuda


def jagged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Softmax attention within each sequence ``offsets[i]:offsets[i + 1]`` of packed ``q, k, v
    [T, H, D]`` in one call, with neither padding nor mask: flash-attn's varlen kernel when chosen
    (``AMODAL3R_ATTN_BACKEND=flash_attn``) on CUDA, else SDPA on nested jagged tensors."""
    if attention_backend() == "flash_attn" and q.is_cuda:
        from flash_attn import flash_attn_varlen_func

        cu = offsets.to(torch.int32)
        longest = int((offsets[1:] - offsets[:-1]).max())
        return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest)
    nested = [torch.nested.nested_tensor_from_jagged(t.contiguous(), offsets).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*nested).transpose(1, 2).values()


def layout_offsets(layout: list[slice], device: torch.device) -> torch.Tensor:
    return torch.tensor([0] + [s.stop for s in layout], dtype=torch.long, device=device)


def varlen_self_attention(qkv: torch.Tensor, layout: list[slice], jagged: bool | None = None) -> torch.Tensor:
    """Self-attention within each row range of packed ``qkv [T, 3, H, D]``; returns ``[T, H, D]``.
    ``jagged`` (default: :func:`jagged_by_default`) runs unequal lengths as one jagged call."""
    lengths = {s.stop - s.start for s in layout}
    if len(lengths) == 1:
        q, k, v = qkv.reshape(len(layout), lengths.pop(), *qkv.shape[1:]).unbind(dim=2)
        return scaled_dot_product(q, k, v).flatten(0, 1)
    if jagged_by_default(qkv) if jagged is None else jagged:
        return jagged_attention(*qkv.unbind(dim=1), layout_offsets(layout, qkv.device))
    out = torch.empty_like(qkv[:, 0])
    for rows in layout:
        q, k, v = qkv[rows].unsqueeze(0).unbind(dim=2)
        out[rows] = scaled_dot_product(q, k, v)[0]
    return out


def varlen_cross_attention(
    q: torch.Tensor, layout: list[slice], k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Packed queries ``[T, H, D]`` of each batch element attend to that element's own context
    ``k, v [B, L, H, D]`` only (the reference mixes contexts across a batch; we must not)."""
    lengths = {s.stop - s.start for s in layout}
    if len(lengths) == 1:
        qb = q.reshape(len(layout), lengths.pop(), *q.shape[1:])
        return scaled_dot_product(qb, k, v, bias).flatten(0, 1)
    out = torch.empty_like(q)
    for b, rows in enumerate(layout):
        bias_b = None if bias is None else bias[b : b + 1]
        out[rows] = scaled_dot_product(q[rows].unsqueeze(0), k[b : b + 1], v[b : b + 1], bias_b)[0]
    return out


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS norm of queries or keys: ``normalize(x) * gamma * sqrt(head_dim)`` in float32."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).to(x.dtype)


Tokens = torch.Tensor | SparseTensor


def distinct_ratios(ratios: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of ``ratios [L]`` and their log counts (float32)."""
    values, counts = torch.unique(ratios.float(), return_counts=True)
    return values, counts.float().log()


def _padded(per_element: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[E, U]`` values and log counts, padded with log 0 = -inf so that padding gets no weight."""
    width = max(len(v) for v, _ in per_element)
    values = per_element[0][0].new_zeros(len(per_element), width)
    log_counts = torch.full_like(values, float("-inf"))
    for i, (v, c) in enumerate(per_element):
        values[i, : len(v)], log_counts[i, : len(v)] = v, c
    return values, log_counts


def ratio_attention(
    attn: MultiHeadAttention,
    feats: torch.Tensor,
    layout: list[slice] | None,
    per_element: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Cross-attention to a context whose rows are ``ratio * ones`` (Amodal3R's occlusion tokens).

    Then every key and value is affine in its ratio, ``k_i = r_i a_k + b_k`` and likewise for
    values, so the output is ``E_p[r] a_v + b_v`` with ``p_i`` the softmax of ``r_i (q . a_k)``.
    The expectation runs over the distinct ratios weighted by their counts (``per_element``, from
    :func:`distinct_ratios`): exact, and about ten times cheaper than attending to 1369 tokens.
    ``feats`` is dense ``[E, L, C]`` or packed ``[T, C]`` with ``layout``; returns ``to_out`` of it.
    """
    if attn.is_self or attn.qk_rms_norm:
        raise ValueError("ratio_attention needs a cross-attention without q/k RMS norm")
    lead = feats.shape[:-1]
    slope = attn.to_kv.weight.sum(dim=1).view(2, attn.num_heads, attn.head_dim)
    offset = attn.to_kv.bias.view(2, attn.num_heads, attn.head_dim)
    q = attn.to_q(feats).reshape(*lead, attn.num_heads, attn.head_dim)
    score = (q * slope[0]).sum(-1) / attn.head_dim**0.5  # [..., H]
    if all(e is per_element[0] for e in per_element):
        values, log_counts = per_element[0]  # [U], broadcast over every token
    else:
        values, log_counts = _padded(per_element)  # [E, U]
        if layout is None:
            values, log_counts = values[:, None], log_counts[:, None]
        else:
            lengths = torch.tensor([s.stop - s.start for s in layout], device=feats.device)
            element = torch.repeat_interleave(torch.arange(len(layout), device=feats.device), lengths)
            values, log_counts = values[element], log_counts[element]
    weights = torch.softmax(score.unsqueeze(-1) * values.unsqueeze(-2) + log_counts.unsqueeze(-2), dim=-1)
    expected = (weights * values.unsqueeze(-2)).sum(-1)  # [..., H]
    h = expected.unsqueeze(-1) * slope[1] + offset[1]
    return attn.to_out(h.reshape(*lead, attn.channels).to(feats.dtype))


class MultiHeadAttention(nn.Module):
    """Self or cross attention on dense ``[B, L, C]`` tokens or on a :class:`SparseTensor`.

    Cross-attention takes a dense context ``[B, L, C_ctx]`` and an optional key bias (see
    :func:`visibility_bias`). Parameter names follow the official checkpoints.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        ctx_channels: int | None = None,
        type: Literal["self", "cross"] = "self",
        qkv_bias: bool = True,
        qk_rms_norm: bool = False,
    ):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} is not divisible by num_heads {num_heads}")
        self.channels, self.num_heads, self.head_dim = channels, num_heads, channels // num_heads
        self.is_self = type == "self"
        self.qk_rms_norm = qk_rms_norm
        if self.is_self:
            self.to_qkv = nn.Linear(channels, channels * 3, bias=qkv_bias)
        else:
            self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
            self.to_kv = nn.Linear(ctx_channels or channels, channels * 2, bias=qkv_bias)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def _norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qk_rms_norm:
            return self.q_rms_norm(q), self.k_rms_norm(k)
        return q, k

    def forward(self, x: Tokens, context: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> Tokens:
        feats = x.feats if isinstance(x, SparseTensor) else x
        lead = feats.shape[:-1]
        if self.is_self:
            qkv = self.to_qkv(feats).reshape(*lead, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.unbind(dim=-3)
            q, k = self._norm_qk(q, k)
            if isinstance(x, SparseTensor):
                h = varlen_self_attention(torch.stack([q, k, v], dim=1), x.layout)
            else:
                h = scaled_dot_product(q, k, v)
        else:
            q = self.to_q(feats).reshape(*lead, self.num_heads, self.head_dim)
            kv = self.to_kv(context).reshape(*context.shape[:2], 2, self.num_heads, self.head_dim)
            k, v = kv.unbind(dim=2)
            q, k = self._norm_qk(q, k)
            if isinstance(x, SparseTensor):
                h = varlen_cross_attention(q, x.layout, k, v, bias)
            else:
                h = scaled_dot_product(q, k, v, bias)
        out = self.to_out(h.reshape(*lead, self.channels))
        return x.replace(out) if isinstance(x, SparseTensor) else out

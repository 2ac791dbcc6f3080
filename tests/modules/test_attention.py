"""Attention paths against straightforward formulations."""

from __future__ import annotations

import math

import torch

from amodal3r.modules.attention import (
    MultiHeadAttention,
    distinct_ratios,
    ratio_attention,
    varlen_self_attention,
    visibility_bias,
)
from amodal3r.modules.condition import prepare_condition
from amodal3r.modules.condition_tokens import NUM_PREFIX_TOKENS
from amodal3r.modules.sparse import SparseTensor


def test_visibility_weighted_attention_is_the_papers_softmax() -> None:
    """Eq. 3: softmax(q k / sqrt(d) + log(w + 1e-6)) v with weight 1 on the class and register tokens."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4, ctx_channels=16, type="cross")
    x, ctx = torch.randn(2, 7, 32), torch.randn(2, NUM_PREFIX_TOKENS + 9, 16)
    vis = torch.tensor([[0.0, 1.0, 0.5, 0.25, 1.0, 0.0, 0.75, 1.0, 1 / 196]] * 2)
    out = attn(x, ctx, visibility_bias(vis, NUM_PREFIX_TOKENS))
    q = attn.to_q(x).view(2, 7, 4, 8).transpose(1, 2)
    k, v = attn.to_kv(ctx).view(2, -1, 2, 4, 8).unbind(2)
    w = torch.cat([torch.ones(2, NUM_PREFIX_TOKENS), vis], dim=1)
    logits = q @ k.transpose(1, 2).transpose(-1, -2) / math.sqrt(8) + torch.log(w + 1e-6)[:, None, None]
    expected = attn.to_out((logits.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(2, 7, 32))
    assert torch.allclose(out, expected, atol=1e-6)


def test_ratio_context_closed_form_equals_full_attention() -> None:
    torch.manual_seed(1)
    attn = MultiHeadAttention(32, 4, ctx_channels=24, type="cross")
    ratios = (torch.rand(2, 50) * 196).round() / 196
    ratios[1] = 0.0  # the unconditional row: all zeros
    per_element = [distinct_ratios(r) for r in ratios]
    context = ratios[..., None].expand(-1, -1, 24)
    x = torch.randn(2, 11, 32)
    assert torch.allclose(ratio_attention(attn, x, None, per_element), attn(x, context), atol=1e-5)
    coords = torch.tensor([[0, 1, 1, 1], [0, 2, 1, 1], [1, 0, 0, 0]], dtype=torch.int32)
    sparse = SparseTensor(torch.randn(3, 32), coords)
    closed = ratio_attention(attn, sparse.feats, sparse.layout, per_element)
    assert torch.allclose(closed, attn(sparse, context).feats, atol=1e-5)


def test_prepared_condition_detects_repeated_occlusion_rows() -> None:
    tokens = torch.randn(1, NUM_PREFIX_TOKENS + 1369, 8)
    ratios = (torch.rand(1, 2 * 1369, 1) * 4).round() / 4
    repeated = prepare_condition(torch.cat([tokens, ratios.expand(-1, -1, 8)], dim=1), True, torch.float32)
    values, log_counts = repeated.ratios[0]
    assert torch.equal(values, torch.unique(ratios[0, 1369:, 0]))
    assert torch.allclose(log_counts.exp().sum(), torch.tensor(1369.0))
    general = torch.cat([tokens, ratios.expand(-1, -1, 8).clone()], dim=1)
    general[0, -1, 3] += 1
    assert prepare_condition(general, True, torch.float32).ratios is None


def test_jagged_self_attention_equals_per_sequence_attention() -> None:
    """The GPU path for sequences of different lengths (one call, no padding), run on the CPU."""
    torch.manual_seed(2)
    layout = [slice(0, 7), slice(7, 30), slice(30, 33)]
    qkv = torch.randn(33, 3, 4, 16)
    loop = varlen_self_attention(qkv, layout, jagged=False)
    jagged = varlen_self_attention(qkv, layout, jagged=True)
    assert torch.allclose(jagged, loop, atol=1e-6)
    q, k, v = qkv[7:30].unbind(dim=1)
    alone = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / 4, dim=-1)
    assert torch.allclose(loop[7:30], torch.einsum("hqk,khd->qhd", alone, v), atol=1e-6)


def test_cpu_attention_takes_the_fused_kernel_with_the_visibility_bias() -> None:
    """SDPA's choice for the shapes the flow models use on the CPU: the fused flash kernel, also with
    the additive ``[B, 1, 1, L]`` visibility bias (measured fastest against chunked math attention)."""
    from torch.nn.attention import SDPBackend

    q = torch.randn(2, 512, 4, 64).transpose(1, 2)  # [B, H, L, D] view of packed [B, L, H, D] tokens
    k = torch.randn(2, 1374, 4, 64).transpose(1, 2)
    bias = visibility_bias(torch.rand(2, 1369), NUM_PREFIX_TOKENS)
    for dtype in (torch.float32, torch.bfloat16):
        args = (q.to(dtype), k.to(dtype), k.to(dtype), bias.to(dtype))
        assert torch._fused_sdp_choice(*args) == SDPBackend.FLASH_ATTENTION.value

"""fp32 products through oneDNN (``amodal3r.modules.matmul``) against torch's own ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amodal3r.modules.matmul import Linear, attention, linear, route_linears, uses_blocked_attention, uses_onednn
from amodal3r.modules.shortcuts import plain
from amodal3r.modules.sparse import SparseLinear


def _operands(shape: tuple[int, ...], c_in: int, c_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, c_in, generator=generator)
    return x, torch.randn(c_out, c_in, generator=generator) * c_in**-0.5, torch.randn(c_out, generator=generator)


@pytest.mark.parametrize(
    ("shape", "c_in", "c_out"),
    [((300,), 256, 1024), ((2, 77), 64, 192), ((0,), 32, 8), ((1,), 1728, 64)],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_linear_equals_torch_linear(shape: tuple[int, ...], c_in: int, c_out: int, with_bias: bool) -> None:
    x, weight, bias = _operands(shape, c_in, c_out)
    bias = bias if with_bias else None
    with torch.inference_mode():
        assert uses_onednn(x, weight)  # the CPU build of torch carries oneDNN
        fast = linear(x, weight, bias)
        with plain("onednn_matmul"):
            assert not uses_onednn(x, weight)
            expected = linear(x, weight, bias)
    assert fast.shape == expected.shape == (*shape, c_out)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)  # summation order only


def test_strided_operands() -> None:
    """Views as the sparse convolutions pass them: a kernel cell's weight, rows of a wider tensor."""
    x, weight, _ = _operands((40,), 96, 48)
    kernels = torch.randn(48, 27, 96)
    with torch.inference_mode():
        for operand, w in ((x[::2], weight), (x.t().contiguous().t(), weight), (x, kernels[:, 13])):
            assert torch.allclose(linear(operand, w), F.linear(operand, w), rtol=1e-5, atol=1e-5)


def test_other_dtypes_and_gradients_keep_torchs_path() -> None:
    x, weight, bias = _operands((8,), 16, 4)
    weight.requires_grad_(True)
    out = linear(x, weight, bias)  # gradients enabled: oneDNN's kernel has no backward
    out.sum().backward()
    assert weight.grad is not None
    with torch.inference_mode():
        assert not uses_onednn(x.double(), weight.double())
        half = linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16())
    assert half.dtype == torch.bfloat16


def test_route_linears_changes_only_the_class() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4), SparseLinear(4, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 8)
    with torch.inference_mode():
        before = model[:3](x)
        route_linears(model)
        after = model[:3](x)
    assert [type(m) for m in model] == [Linear, nn.GELU, Linear, SparseLinear]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("batch", "heads", "lq", "lk", "bias_shape"),
    [
        (1, 4, 1100, 1100, None),  # self-attention, the last query block short
        (2, 2, 1024, 1374, "key"),  # cross-attention with the visibility bias [B, 1, 1, Lk]
        (1, 2, 1500, 700, "full"),  # a bias per query and key, broadcast over heads
    ],
)
def test_blocked_attention_equals_torch_sdpa(batch: int, heads: int, lq: int, lk: int, bias_shape: str | None) -> None:
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch, heads, n, 32, generator=generator) for n in (lq, lk, lk))
    bias = None
    if bias_shape == "key":
        bias = torch.log(torch.rand(batch, 1, 1, lk, generator=generator) + 1e-6)
    elif bias_shape == "full":
        bias = torch.randn(1, 1, lq, lk, generator=generator)
    with torch.inference_mode():
        assert uses_blocked_attention(q, k)
        fast = attention(q, k, v, bias)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        with plain("onednn_matmul"):
            assert not uses_blocked_attention(q, k)
            assert torch.equal(attention(q, k, v, bias), expected)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=2e-6)


def test_blocked_attention_with_a_scale_and_wider_values() -> None:
    """As SAM's folded attention calls it: scale 1 on pre-scaled queries, values wider than keys."""
    generator = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 2, 1024, 48, generator=generator) for _ in range(2))
    v = torch.randn(1, 2, 1024, 80, generator=generator)
    with torch.inference_mode():
        assert uses_blocked_attention(q, k)
        fast = attention(q, k, v, scale=0.1)
        expected = F.scaled_dot_product_attention(q, k, v, scale=0.1)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=2e-6)


def test_short_sequences_keep_the_fused_kernel() -> None:
    q = torch.randn(8, 2, 512, 16)
    with torch.inference_mode():
        assert not uses_blocked_attention(q, q)  # shifted windows: many short problems
        assert torch.equal(attention(q, q, q), F.scaled_dot_product_attention(q, q, q))

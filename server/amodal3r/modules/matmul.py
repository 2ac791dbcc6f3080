"""Dense fp32 products on the CPU through oneDNN instead of MKL, and attention built from them.

On x86, torch hands fp32 matrix products to MKL, whose kernels run AMD CPUs at their AVX2 rate;
oneDNN, built into the same torch wheel, uses their AVX-512 units. On the 2-core test EPYC a
linear layer ran at about 200 GFLOP/s through MKL and 400-440 through oneDNN; torch's CPU attention
kernel, whose products go through MKL too, at 175, and :func:`attention` at 300. The arithmetic is
the same fp32 arithmetic summed in another order (differences at float rounding). Other dtypes and
devices, and anything that needs gradients, keep torch's own path; ``plain("onednn_matmul")``
turns it off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .shortcuts import SHORTCUTS


def _onednn_linear():
    """oneDNN's linear kernel where this torch build has one (x86 and ARM builds with mkldnn)."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


_ONEDNN_LINEAR = _onednn_linear()
LOGIT_BLOCK = 1 << 21  # logits per query block of :func:`attention` (8 MB: stays in cache)
MIN_ATTENTION = 1 << 20  # smaller (query x key) problems stay with torch's fused kernel


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes oneDNN for these operands: inference only (the kernel has no
    backward) and eager only (``torch.compile`` picks its own kernels for a graph)."""
    return (
        SHORTCUTS.onednn_matmul
        and _ONEDNN_LINEAR is not None
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` over the last dimension of ``x``, like ``F.linear``.

    oneDNN gets contiguous operands: given a strided view (a kernel cell of a convolution weight)
    it falls back to a reference loop a thousand times slower."""
    if uses_onednn(x, weight) and (bias is None or bias.dtype == torch.float32):
        return _ONEDNN_LINEAR(x.contiguous(), weight.contiguous(), bias, "none", [], "")
    return F.linear(x, weight, bias)


def uses_blocked_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`attention` builds this ``[B, H, L, D]`` problem from oneDNN products: large
    sequences only, where the per-block calls cost nothing next to the products."""
    return uses_onednn(q, k) and q.shape[-2] * k.shape[-2] >= MIN_ATTENTION


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention on ``[B, H, L, D]`` tensors, like ``F.scaled_dot_product_attention``;
    ``bias`` is added to the logits, broadcast to ``[B, H, Lq, Lk]``; ``scale`` defaults to D^-0.5."""
    if not uses_blocked_attention(q, k):
        mask = None if bias is None else bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    batch, heads = q.shape[:2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if bias is not None:
        bias = bias.float().reshape((1,) * (4 - bias.dim()) + bias.shape)
        bias = bias.expand(*bias.shape[:3], k.shape[-2])
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    for b in range(batch):
        for h in range(heads):
            head_bias = None if bias is None else bias[b % bias.shape[0], h % bias.shape[1]]
            out[b, h] = _attend(q[b, h] * scale, k[b, h], v[b, h], head_bias)
    return out


def _attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One head, a block of queries at a time: its logits (one oneDNN product; a per-key bias, ``bias``
    of one row, rides in as the product's bias), their softmax in place, the values' product. A
    block's logits stay in cache, which the fused kernel's MKL products cannot beat here."""
    rows = max(64, min(1024, LOGIT_BLOCK // len(keys)))
    keys, values_t = keys.contiguous(), values.t().contiguous()
    key_bias = bias[0].contiguous() if bias is not None and len(bias) == 1 else None
    out = queries.new_empty(len(queries), values.shape[-1])
    for start in range(0, len(queries), rows):
        logits = _ONEDNN_LINEAR(queries[start : start + rows].contiguous(), keys, key_bias, "none", [], "")
        if bias is not None and key_bias is None:
            logits += bias[start : start + rows]
        torch.softmax(logits, -1, out=logits)
        out[start : start + rows] = _ONEDNN_LINEAR(logits, values_t, None, "none", [], "")
    return out


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear`; same parameters, same state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def route_linears(model: nn.Module) -> nn.Module:
    """Make every plain ``nn.Linear`` in ``model`` (ours and timm's) a :class:`Linear`, in place.

    Only the class changes: parameters, buffers and hooks stay as they are."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Linear
    return model

"""Dense fp32 products on the CPU through oneDNN instead of MKL.

On x86, torch hands fp32 matrix products to MKL, whose kernels run AMD CPUs at their AVX2 rate;
oneDNN, built into the same torch wheel, uses their AVX-512 units. On the 2-core test EPYC a
linear layer ran at about 200 GFLOP/s through MKL and 400-440 through oneDNN. It is the same fp32
product summed in another order (differences at float rounding). Other dtypes and devices, and
anything that needs gradients, keep torch's own path; ``plain("onednn_matmul")`` turns it off.
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


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes oneDNN for these operands (it has no backward: inference only)."""
    return (
        SHORTCUTS.onednn_matmul
        and _ONEDNN_LINEAR is not None
        and not torch.is_grad_enabled()
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

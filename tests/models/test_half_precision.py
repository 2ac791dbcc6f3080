"""The GPU dtypes on the CPU: fp16 and bf16 torsos against float32, one forward each.

Documented bound (README): relative to the largest output of the float32 forward, fp16 within 1%
and bf16 within 5% (measured on these tiny random models: fp16 0.1-0.4%, bf16 0.6-2.8%).
Norms, the timestep embedding and the outputs stay float32 as in the reference.
"""

from __future__ import annotations

import pytest
import torch
from conftest import condition_rows, shell_latent, tiny_flow

from amodal3r.modules.sparse import SparseTensor

BOUNDS = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _feats(out: torch.Tensor | SparseTensor) -> torch.Tensor:
    return out.feats if isinstance(out, SparseTensor) else out


def _relative_error(model: torch.nn.Module, run, dtype: torch.dtype) -> float:
    with torch.inference_mode():
        model.set_torso_dtype(torch.float32)
        expected = _feats(run())
        model.set_torso_dtype(dtype)
        actual = _feats(run())
    assert actual.dtype == torch.float32
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("dtype", list(BOUNDS))
@pytest.mark.parametrize("key", ["sparse_structure_flow_model", "slat_flow_model"])
def test_flow_models_in_half_precision(key: str, dtype: torch.dtype) -> None:
    model = tiny_flow(key)
    cond = torch.cat([condition_rows(1), torch.zeros(1, *condition_rows(1).shape[1:])])
    t = torch.tensor([600.0, 600.0])
    x = shell_latent(2) if key == "slat_flow_model" else torch.randn(2, 8, 16, 16, 16)
    assert _relative_error(model, lambda: model(x, t, cond), dtype) <= BOUNDS[dtype]


@pytest.mark.parametrize("dtype", list(BOUNDS))
def test_mesh_decoder_in_half_precision(dtype: torch.dtype) -> None:
    decoder = tiny_flow("slat_decoder_mesh")
    latent = shell_latent(1)
    assert _relative_error(decoder, lambda: decoder.decode(latent), dtype) <= BOUNDS[dtype]

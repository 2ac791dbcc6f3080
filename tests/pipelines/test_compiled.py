"""``--compile``: the compiled structure flow and DINOv2 give the eager results."""

from __future__ import annotations

import torch
from conftest import condition_rows, tiny_flow

from amodal3r.models.image_encoder import DinoV2Config
from amodal3r.pipelines.compiled import compile_parts
from amodal3r.weights.layout import IMAGE_ENCODER
from amodal3r.weights.tiny import random_image_encoder


def test_compiled_structure_flow_and_encoder_match_eager() -> None:
    flow = tiny_flow("sparse_structure_flow_model")
    encoder = random_image_encoder(DinoV2Config.tiny(), torch.Generator().manual_seed(0))
    x, t, cond = torch.randn(2, 8, 16, 16, 16), torch.tensor([300.0, 300.0]), condition_rows(2)
    image = torch.rand(1, 3, 518, 518)
    with torch.inference_mode():
        eager = flow(x, t, cond), encoder(image)
        assert compile_parts("sparse_structure_flow_model", flow) == 2 * len(flow.blocks)
        assert compile_parts(IMAGE_ENCODER, encoder) == len(encoder.vit.blocks)
        compiled = flow(x, t, cond), encoder(image)
    for a, b in zip(compiled, eager, strict=True):
        assert (a - b).abs().max() <= 1e-5 * (1 + b.abs().max())

"""``torch.compile`` for the models with static shapes: the dense structure flow and DINOv2.

Off by default. Measured on a 2-core AMD EPYC CPU (torch 2.14, one thread, medium structure flow
and the full DINOv2-L): compiled and eager forwards took the same CPU time within 3% (both are
matrix products and attention; only the elementwise work fuses), and compiling took 16-22 s.
On a GPU it was not measured here; ``--compile`` turns it on.
"""

from __future__ import annotations

import torch
from torch import nn

from amodal3r.weights.layout import IMAGE_ENCODER


def compile_parts(key: str, model: nn.Module) -> int:
    """Compile the static-shape parts of the pipeline model ``key`` in place; returns how many.
    Each transformer block compiles once (blocks share code; their weights are inputs)."""
    count = 0
    if key == IMAGE_ENCODER:
        for block in model.vit.blocks:
            block.compile(dynamic=False)
            count += 1
    elif key == "sparse_structure_flow_model":
        for block in model.blocks:
            block.attention_branch = torch.compile(block.attention_branch, dynamic=False)
            block.mlp_branch = torch.compile(block.mlp_branch, dynamic=False)
            count += 2
    return count

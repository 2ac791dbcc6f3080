"""Model classes under their official names, as ``{"name": ...}`` in a checkpoint's json selects them."""

from __future__ import annotations

import importlib

from torch import nn

# Official class name -> module of this package that defines it.
MODEL_MODULES: dict[str, str] = {
    "SparseStructureFlowModel": "sparse_structure_flow",
    "SparseStructureFlowModelMaskAsCondWeighted": "sparse_structure_flow",
    "SparseStructureDecoder": "sparse_structure_vae",
    "SLatFlowModel": "structured_latent_flow",
    "ElasticSLatFlowModel": "structured_latent_flow",
    "SLatFlowModelMaskAsCondWeighted": "structured_latent_flow",
    "SLatMeshDecoder": "structured_latent_mesh_decoder",
    "ElasticSLatMeshDecoder": "structured_latent_mesh_decoder",
    "SLatGaussianDecoder": "structured_latent_gaussian_decoder",
    "ElasticSLatGaussianDecoder": "structured_latent_gaussian_decoder",
}


def model_class(name: str) -> type[nn.Module]:
    """The class registered under ``name``; ``KeyError`` lists the known names."""
    if name not in MODEL_MODULES:
        raise KeyError(f"unknown model class {name!r}; known: {', '.join(sorted(MODEL_MODULES))}")
    module = importlib.import_module(f".{MODEL_MODULES[name]}", __name__)
    return getattr(module, name)

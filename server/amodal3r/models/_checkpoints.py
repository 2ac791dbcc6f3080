"""Strict loading of ``NAME.json`` + ``NAME.safetensors`` checkpoints in the official layout.

Every failure is one :class:`CheckpointError` naming the file, the offending keys and what to do.
Nothing is ever unpickled.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from amodal3r.api.errors import CheckpointError

MAX_LISTED_KEYS = 8
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
    module = importlib.import_module(f"amodal3r.models.{MODEL_MODULES[name]}")
    return getattr(module, name)


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f" (+{len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else "")


def read_config(path: Path) -> dict:
    """The ``{"name", "args"}`` json of a checkpoint."""
    if not path.is_file():
        raise CheckpointError(
            f"{path}: file not found. Put the model's json next to its .safetensors "
            "(download the official weights again if it is missing)"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}). Replace it with the original file") from e
    if (
        not isinstance(config, dict)
        or not isinstance(config.get("name"), str)
        or not isinstance(config.get("args"), dict)
    ):
        raise CheckpointError(
            f'{path}: expected {{"name": <class name>, "args": {{...}}}}. Replace it with the original file'
        )
    return config


def read_state_dict(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or corrupt file is a :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found. Download the model weights into this folder")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: unreadable safetensors file ({e}). It is probably truncated or "
            "corrupt: delete it and download it again"
        ) from e


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    problems = [
        f"{label}: {_listed(keys)}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshaped))
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"{path}: does not fit the {type(model).__name__} it should hold; "
            + "; ".join(problems)
            + ". Use the original file of this model (json and weights from the same release)"
        )


def default_torso_dtype(use_fp16: bool, device: torch.device) -> torch.dtype:
    """fp16 checkpoints run in fp16 on accelerators; the CPU computes in fp32, much faster there."""
    return torch.float16 if use_fp16 and device.type in ("cuda", "mps") else torch.float32


def build_model(config: dict, path: Path, device: torch.device | str = "meta") -> nn.Module:
    try:
        cls = model_class(config["name"])
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]}. This file is not an Amodal3R/TRELLIS checkpoint we can run") from e
    try:
        with torch.device(device):
            return cls(**config["args"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot build {config['name']} from its args ({e})") from e


def load_model(
    stem: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """Load ``stem.json`` + ``stem.safetensors`` into the model class the json names, for inference.

    ``dtype`` forces the compute dtype of the model's torso (fp32, fp16 or bf16); by default the
    checkpoint's ``use_fp16`` is honoured on CUDA/MPS and fp32 is used on the CPU.
    """
    stem = Path(stem)
    device = torch.device(device or "cpu")
    config = read_config(stem.with_name(stem.name + ".json"))
    weights = stem.with_name(stem.name + ".safetensors")
    model = build_model(config, stem.with_name(stem.name + ".json"))
    state = read_state_dict(weights)
    check_state_dict(model, state, weights)
    model.load_state_dict(state, strict=True, assign=True)
    return for_inference(model, bool(config["args"].get("use_fp16")), device, dtype)


def for_inference(model: nn.Module, use_fp16: bool, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """``model`` in float32 with its torso in ``dtype`` (default: :func:`default_torso_dtype`), on
    ``device``, in eval mode without gradients: how every pipeline model runs."""
    model.float()
    if hasattr(model, "set_torso_dtype"):
        model.set_torso_dtype(dtype or default_torso_dtype(use_fp16, device))
    return model.to(device).eval().requires_grad_(False)

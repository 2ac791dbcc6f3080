"""Seeded random checkpoints in exactly the official folder layout, for tests, demos and benches.

Three sizes: ``tiny`` (tests), ``medium`` (realistic work on a CPU) and ``full`` (the official
architectures, random weights: what ``bench/e2e.py`` times). The structure decoder's output bias is
calibrated so that random latents occupy a few percent of the 64^3 grid, as real objects do;
everything else is random like the golden cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from amodal3r.models import build_model
from amodal3r.models.image_encoder import DinoV2Config, DinoV2Encoder
from amodal3r.weights.layout import (
    IMAGE_ENCODER_CONFIG,
    IMAGE_ENCODER_FILES,
    OFFICIAL_MODELS,
    PIPELINE_FILE,
)

OCCUPANCY = 0.03
INSIDE = 0.05
TINY_COND_CHANNELS = DinoV2Config.tiny().embed_dim


@dataclass(frozen=True)
class Size:
    """Widths and depths of one random model family; ``medium`` times realistic work on a CPU."""

    flow_channels: int
    flow_blocks: int
    io_channels: int
    structure_decoder: tuple[int, ...]
    mesh_channels: int
    gaussian_channels: int
    decoder_blocks: int
    decoder_heads: int
    gaussians_per_voxel: int
    full_size_encoder: bool
    flow_heads: int = 4
    io_res_blocks: int = 1
    structure_decoder_res_blocks: int = 1


SIZES = {
    "tiny": Size(64, 2, 32, (32, 16, 8), 256, 64, 2, 4, 8, False),
    "medium": Size(256, 4, 128, (128, 32, 16), 512, 512, 4, 8, 32, True),
    # The official checkpoints' architectures (TRELLIS-image-large / Amodal3R).
    "full": Size(1024, 24, 128, (512, 128, 32), 768, 768, 12, 12, 32, True, 16, 2, 2),
}


def tiny_configs(cond_channels: int, size: Size) -> dict[str, tuple[str, dict]]:
    """Pipeline key -> (checkpoint stem relative to the folder, ``{"name", "args"}``)."""
    flow = dict(
        model_channels=size.flow_channels,
        cond_channels=cond_channels,
        num_blocks=size.flow_blocks,
        num_heads=size.flow_heads,
        mlp_ratio=4,
        pe_mode="ape",
        qk_rms_norm=True,
        use_fp16=True,
    )
    decoder = dict(
        resolution=64,
        latent_channels=8,
        num_blocks=size.decoder_blocks,
        num_heads=size.decoder_heads,
        mlp_ratio=4,
        attn_mode="swin",
        window_size=8,
        use_fp16=True,
    )
    return {
        "sparse_structure_flow_model": (
            OFFICIAL_MODELS["sparse_structure_flow_model"],
            {
                "name": "SparseStructureFlowModelMaskAsCondWeighted",
                "args": dict(resolution=16, in_channels=8, out_channels=8, patch_size=1, **flow),
            },
        ),
        "sparse_structure_decoder": (
            OFFICIAL_MODELS["sparse_structure_decoder"],
            {
                "name": "SparseStructureDecoder",
                "args": dict(
                    out_channels=1,
                    latent_channels=8,
                    num_res_blocks=size.structure_decoder_res_blocks,
                    num_res_blocks_middle=size.structure_decoder_res_blocks,
                    channels=list(size.structure_decoder),
                    use_fp16=True,
                ),
            },
        ),
        "slat_flow_model": (
            OFFICIAL_MODELS["slat_flow_model"],
            {
                "name": "SLatFlowModelMaskAsCondWeighted",
                "args": dict(
                    resolution=64,
                    in_channels=8,
                    out_channels=8,
                    patch_size=2,
                    num_io_res_blocks=size.io_res_blocks,
                    io_block_channels=[size.io_channels],
                    **flow,
                ),
            },
        ),
        # The mesh decoder needs model_channels >= 256: its subdivision blocks group-normalise
        # model_channels / 8 channels in 32 groups.
        "slat_decoder_mesh": (
            OFFICIAL_MODELS["slat_decoder_mesh"],
            {
                "name": "SLatMeshDecoder",
                "args": dict(decoder, model_channels=size.mesh_channels, representation_config={"use_color": True}),
            },
        ),
        "slat_decoder_gs": (
            OFFICIAL_MODELS["slat_decoder_gs"],
            {
                "name": "SLatGaussianDecoder",
                "args": dict(
                    decoder,
                    model_channels=size.gaussian_channels,
                    representation_config={
                        "lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1},
                        "perturb_offset": True,
                        "voxel_size": 1.5,
                        "num_gaussians": size.gaussians_per_voxel,
                        "2d_filter_kernel_size": 0.1,
                        "3d_filter_kernel_size": 9e-4,
                        "scaling_bias": 4e-3,
                        "opacity_bias": 0.1,
                        "scaling_activation": "softplus",
                    },
                ),
            },
        ),
    }


def randomize(model: nn.Module, generator: torch.Generator) -> None:
    """Weights ``0.02 randn``; norm scales and RMS gammas ``1 + 0.1 randn`` (nothing is zero)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            is_scale = name.endswith("gamma") or (name.endswith("weight") and p.dim() == 1)
            p.copy_(1 + 0.1 * noise if is_scale else 0.02 * noise)


def calibrate_occupancy(
    decoder: nn.Module, latent_shape: tuple[int, ...], generator: torch.Generator, occupancy: float = OCCUPANCY
) -> None:
    """Shift the final bias so that about ``occupancy`` of the voxels of random latents are occupied."""
    decoder.set_torso_dtype(torch.float32)
    with torch.no_grad():
        logits = decoder(torch.randn(2, *latent_shape, generator=generator))
        decoder.out_layer[-1].bias -= torch.quantile(logits.flatten()[::7], 1 - occupancy)


def calibrate_surface(decoder: nn.Module, generator: torch.Generator) -> None:
    """Shift the corner-sdf biases so that about :data:`INSIDE` of the corners are inside: random
    weights otherwise put a surface through nearly every cube, a mesh of pure noise."""
    from amodal3r.modules.sparse import SparseTensor

    coords = torch.argwhere(torch.rand(1, 24, 24, 24, generator=generator) < 0.3).int()
    latent = SparseTensor(torch.randn(coords.shape[0], 8, generator=generator), coords + torch.tensor([0, 20, 20, 20]))
    decoder.set_torso_dtype(torch.float32)
    with torch.no_grad():
        sdf = decoder.decode(latent).feats[:, :8]
        decoder.out_layer.bias[:8] -= torch.quantile(sdf.flatten()[::5], INSIDE)


def save_checkpoint(model: nn.Module, config: dict, stem: Path) -> None:
    """Write ``stem.json`` and ``stem.safetensors`` as the official checkpoints are laid out."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(stem.with_name(stem.name + ".safetensors")))


def encoder_config(size: str) -> DinoV2Config:
    return DinoV2Config.vitl14_reg4() if SIZES[size].full_size_encoder else DinoV2Config.tiny()


def random_model(key: str, config: dict, generator: torch.Generator, occupancy: float = OCCUPANCY) -> nn.Module:
    """One pipeline model built from its ``{"name", "args"}`` with random (calibrated) weights, on
    the CPU, its torso in the dtype the config's ``use_fp16`` asks for: as a checkpoint stores it."""
    model = build_model(config, Path(key), device="cpu")
    randomize(model, generator)
    if key == "sparse_structure_decoder":
        calibrate_occupancy(model, (8, 16, 16, 16), generator, occupancy)
        model.set_torso_dtype(torch.float16)
    if key == "slat_decoder_mesh":
        calibrate_surface(model, generator)
        model.set_torso_dtype(torch.float16)
    return model


def random_image_encoder(config: DinoV2Config, generator: torch.Generator) -> DinoV2Encoder:
    encoder = DinoV2Encoder(config, init_weights=False)
    randomize(encoder, generator)
    return encoder.eval().requires_grad_(False)


def write_tiny_weights(out_dir: str | Path, seed: int = 0, size: str = "tiny", occupancy: float = OCCUPANCY) -> Path:
    """A complete model folder (``pipeline.json`` + checkpoints) of seeded random models; a lower
    ``occupancy`` (share of the 64^3 grid a random structure fills) makes every later stage cheaper."""
    out_dir = Path(out_dir)
    generator = torch.Generator().manual_seed(seed)
    encoder = encoder_config(size)
    models = {}
    for key, (rel, config) in tiny_configs(encoder.embed_dim, SIZES[size]).items():
        save_checkpoint(random_model(key, config, generator, occupancy), config, out_dir / rel)
        models[key] = rel
    (out_dir / PIPELINE_FILE).write_text(json.dumps(pipeline_config(models, generator), indent=2))
    write_random_image_encoder(out_dir, generator, encoder)
    return out_dir


def pipeline_config(models: dict[str, str], generator: torch.Generator) -> dict:
    """``pipeline.json`` of a random model folder: the official samplers, a random normalisation."""
    sampler = {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5}}
    return {
        "name": "Amodal3RImageTo3DPipeline",
        "args": {
            "models": models,
            "sparse_structure_sampler": {
                **sampler,
                "params": {"steps": 25, "cfg_strength": 7.5, "cfg_interval": [0.5, 1.0], "rescale_t": 3.0},
            },
            "slat_sampler": {
                **sampler,
                "params": {"steps": 25, "cfg_strength": 3.0, "cfg_interval": [0.5, 1.0], "rescale_t": 3.0},
            },
            "slat_normalization": {
                "mean": (0.1 * torch.randn(8, generator=generator)).tolist(),
                "std": (1 + 0.1 * torch.rand(8, generator=generator)).tolist(),
            },
            "image_cond_model": "dinov2_vitl14_reg",
            "tiny_random_weights": True,
        },
    }


def write_random_image_encoder(out_dir: Path, generator: torch.Generator, config: DinoV2Config) -> None:
    """A random DINOv2 (hub layout, like ``dinov2_vitl14_reg4_pretrain.pth``) with its architecture."""
    encoder = random_image_encoder(config, generator)
    (out_dir / IMAGE_ENCODER_CONFIG).write_text(json.dumps({"name": "dinov2_vitl14_reg", "args": config.to_dict()}))
    state = {k: v.contiguous() for k, v in encoder.hub_state_dict().items()}
    save_file(state, str(out_dir / IMAGE_ENCODER_FILES[0]))

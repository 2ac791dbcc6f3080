"""The Amodal3R pipeline over a ``pipeline.json`` model folder: thin glue over models and sampler.

Conditioning tokens -> structure flow -> occupancy decoder -> voxel coordinates -> structured-latent
flow on them -> de-normalised structured latent. Models load lazily, the first time a run needs them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from amodal3r.models._checkpoints import CheckpointError, load_model
from .samplers import MultiViewMode, ProgressFn, SamplerSettings, sample
from amodal3r.modules.sparse import SparseTensor

REQUIRED_MODELS = ("sparse_structure_flow_model", "sparse_structure_decoder", "slat_flow_model")
DECODERS = {"mesh": "slat_decoder_mesh", "gaussian": "slat_decoder_gs"}
IMAGE_ENCODER = "image_cond_model"
# DINOv2 weights are not in the Amodal3R folder: the reference fetches them through torch.hub.
IMAGE_ENCODER_FILES = ("dinov2_vitl14_reg4_pretrain.safetensors", "dinov2_vitl14_reg4_pretrain.pth")
IMAGE_ENCODER_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth"
IMAGE_ENCODER_CONFIG = "image_encoder.json"  # optional architecture override (tiny test models)


class PipelineError(RuntimeError):
    """A run that cannot produce a result, with what to do about it."""


def pick_device(name: str | None = None) -> torch.device:
    """``auto`` (or None) prefers CUDA, then Apple's MPS, then the CPU."""
    if name not in (None, "auto"):
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class PipelineConfig:
    models: dict[str, str]
    structure_sampler: SamplerSettings
    slat_sampler: SamplerSettings
    slat_mean: list[float]
    slat_std: list[float]
    image_cond_model: str
    tiny_random_weights: bool = False

    @classmethod
    def read(cls, folder: Path) -> "PipelineConfig":
        path = folder / "pipeline.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: not found. The model folder must hold pipeline.json and its "
                                  "checkpoints (the layout of Hugging Face Sm0kyWu/Amodal3R)")
        try:
            args = json.loads(path.read_text())["args"]
            models = dict(args["models"])
            config = cls(
                models=models,
                structure_sampler=SamplerSettings.from_config(**_sampler_entry(args["sparse_structure_sampler"])),
                slat_sampler=SamplerSettings.from_config(**_sampler_entry(args["slat_sampler"])),
                slat_mean=list(args["slat_normalization"]["mean"]),
                slat_std=list(args["slat_normalization"]["std"]),
                image_cond_model=str(args.get("image_cond_model", "dinov2_vitl14_reg")),
                tiny_random_weights=bool(args.get("tiny_random_weights", False)),
            )
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: malformed ({type(e).__name__}: {e}). Replace it with the original file") from e
        missing = [m for m in REQUIRED_MODELS if m not in models]
        if missing:
            raise CheckpointError(f"{path}: the models map lacks {', '.join(missing)}")
        for key, rel in models.items():
            for suffix in (".json", ".safetensors"):
                if not (folder / (rel + suffix)).is_file():
                    raise CheckpointError(f"{path}: model {key!r} is {rel}, but {folder / (rel + suffix)} is missing. "
                                          "Download the complete model folder")
        return config


def _sampler_entry(entry: dict) -> dict:
    return {"name": entry["name"], "args": entry.get("args", {}), "params": entry.get("params", {})}


class Amodal3RPipeline:
    def __init__(self, folder: Path, config: PipelineConfig, device: torch.device, dtype: torch.dtype | None):
        self.folder, self.config, self.device, self.dtype = folder, config, device, dtype
        self._models: dict[str, nn.Module] = {}

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> "Amodal3RPipeline":
        """Read ``pipeline.json`` and check its files exist; the models load on first use."""
        folder = Path(folder)
        return cls(folder, PipelineConfig.read(folder), pick_device(device) if not isinstance(device, torch.device)
                   else device, dtype)

    def image_encoder_path(self) -> Path:
        """The DINOv2 checkpoint: in the model folder, else in torch.hub's checkpoint cache."""
        places = [self.folder, Path(torch.hub.get_dir()) / "checkpoints"]
        for place in places:
            for name in IMAGE_ENCODER_FILES:
                if (place / name).is_file():
                    return place / name
        raise CheckpointError(f"DINOv2 weights not found: put {IMAGE_ENCODER_FILES[1]} ({IMAGE_ENCODER_URL}) "
                              f"into {places[0]} or {places[1]}")

    def image_encoder(self) -> nn.Module:
        if IMAGE_ENCODER not in self._models:
            from amodal3r.models.image_encoder import DinoV2Config, DinoV2Encoder

            config_path = self.folder / IMAGE_ENCODER_CONFIG
            config = DinoV2Config.from_dict(json.loads(config_path.read_text())["args"]) \
                if config_path.is_file() else DinoV2Config.vitl14_reg4()
            self._models[IMAGE_ENCODER] = DinoV2Encoder.from_checkpoint(self.image_encoder_path(), config,
                                                                       device=self.device)
        return self._models[IMAGE_ENCODER]

    def model(self, key: str) -> nn.Module:
        if key not in self._models:
            if key not in self.config.models:
                raise CheckpointError(f"{self.folder / 'pipeline.json'}: no model {key!r} in its models map")
            self._models[key] = load_model(self.folder / self.config.models[key], self.device, self.dtype)
        return self._models[key]

    @property
    def loaded_models(self) -> list[str]:
        return sorted(self._models)

    def unload(self) -> None:
        self._models.clear()

    @torch.inference_mode()
    def sample_structure(self, cond: torch.Tensor, generator: torch.Generator, variants: int = 1,
                         multiview: MultiViewMode = "stochastic", progress: ProgressFn | None = None,
                         cancelled: Callable[[], bool] | None = None, **overrides: object) -> torch.Tensor:
        """Occupied voxels ``[N, 4]`` (batch = variant, x, y, z) of the 64^3 structure."""
        flow = self.model("sparse_structure_flow_model")
        res = flow.resolution
        noise = torch.randn(variants, flow.in_channels, res, res, res, generator=generator).to(self.device)
        settings = self.config.structure_sampler.override(**overrides)
        latent = sample(flow, noise, cond, torch.zeros_like(cond[:1]), settings, multiview, progress, cancelled,
                        stage="structure")
        logits = self.model("sparse_structure_decoder")(latent)
        coords = torch.argwhere(logits > 0)[:, [0, 2, 3, 4]].int()
        empty = [v for v in range(variants) if not (coords[:, 0] == v).any()]
        if empty:
            raise PipelineError(f"the structure stage produced no occupied voxels (variant {empty[0]}). "
                                "Check the masks mark the target, or try another seed or more steps")
        return coords

    @torch.inference_mode()
    def sample_slat(self, cond: torch.Tensor, coords: torch.Tensor, generator: torch.Generator,
                    multiview: MultiViewMode = "stochastic", progress: ProgressFn | None = None,
                    cancelled: Callable[[], bool] | None = None, **overrides: object) -> SparseTensor:
        """The structured latent on ``coords``, de-normalised with the pipeline's mean and std."""
        flow = self.model("slat_flow_model")
        noise = torch.randn(coords.shape[0], flow.in_channels, generator=generator).to(self.device)
        settings = self.config.slat_sampler.override(**overrides)
        x = SparseTensor(noise, coords.to(self.device))
        slat = sample(flow, x, cond, torch.zeros_like(cond[:1]), settings, multiview, progress, cancelled,
                      stage="slat")
        std = torch.tensor(self.config.slat_std, device=self.device)[None]
        mean = torch.tensor(self.config.slat_mean, device=self.device)[None]
        return slat.replace(slat.feats * std + mean)

    def run(self, cond: torch.Tensor, seed: int = 0, variants: int = 1, multiview: MultiViewMode = "stochastic",
            structure_params: dict | None = None, slat_params: dict | None = None,
            progress: ProgressFn | None = None, cancelled: Callable[[], bool] | None = None) -> SparseTensor:
        """Conditioning ``[views, 4112, C]`` to the structured latent of each variant.

        Noise comes from a CPU generator seeded with ``seed`` (structure noise first, then the
        latent noise), so a seed gives the same result on every device up to float rounding.
        """
        if variants < 1:
            raise ValueError(f"variants must be at least 1, got {variants}")
        generator = torch.Generator().manual_seed(seed)
        cond = cond.to(self.device)
        coords = self.sample_structure(cond, generator, variants, multiview, progress, cancelled,
                                       **(structure_params or {}))
        return self.sample_slat(cond, coords, generator, multiview, progress, cancelled, **(slat_params or {}))

    @torch.inference_mode()
    def decode(self, slat: SparseTensor, formats: tuple[str, ...] = ("mesh", "gaussian")) -> dict[str, list]:
        """Decode each variant into the requested formats; only their decoders are loaded."""
        unknown = [f for f in formats if f not in DECODERS]
        if unknown:
            raise ValueError(f"unknown output format(s) {unknown}; choose from {sorted(DECODERS)}")
        return {f: self.model(DECODERS[f])(slat) for f in formats}

"""The Amodal3R pipeline over a ``pipeline.json`` model folder: thin glue over models and sampler.

Views (pictures with masks) -> image tokens with patch visibility and occlusion -> structure flow
-> occupancy decoder -> voxel coordinates -> structured-latent flow on them -> decoders. Models
load lazily, the first time a run needs them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from amodal3r.api.errors import Cancelled, CheckpointError, PipelineError
from amodal3r.api.protocol import MULTIVIEW_MODES
from amodal3r.io.inputs import View
from amodal3r.models import load_model
from amodal3r.modules.matmul import route_linears
from amodal3r.modules.sparse import SparseTensor
from amodal3r.representations.gaussians import Gaussians
from amodal3r.representations.mesh import Mesh
from amodal3r.weights.layout import (
    CHECKPOINT_FOLDER,
    DECODER_MODELS,
    DOWNLOAD_BASE,
    HF_REPO,
    IMAGE_ENCODER,
    IMAGE_ENCODER_CONFIG,
    IMAGE_ENCODER_FILES,
    IMAGE_ENCODER_SOURCE,
    PIPELINE_FILE,
    REQUIRED_MODELS,
    checkpoint_files,
    image_encoder_places,
)

from .compiled import compile_parts
from .conditioning import assemble_cond, crop_square, image_to_tensor, preprocess_view
from .devices import pick_device, release_freed_memory
from .samplers import ProgressFn, SamplerSettings, StepTime, sample, synchronize

Cancel = Callable[[], bool]


@dataclass(frozen=True)
class StageSettings:
    """One flow stage's sampler overrides; None keeps the value of ``pipeline.json``."""

    steps: int | None = None
    cfg_strength: float | None = None

    def apply(self, defaults: SamplerSettings) -> SamplerSettings:
        return defaults.override(steps=self.steps, cfg_strength=self.cfg_strength)


@dataclass(frozen=True)
class RunSettings:
    seed: int = 0
    variants: int = 1
    multiview: str = "stochastic"  # one of MULTIVIEW_MODES
    structure: StageSettings = StageSettings()
    slat: StageSettings = StageSettings()
    formats: tuple[str, ...] = ("mesh", "gaussian")  # keys of DECODER_MODELS

    def __post_init__(self) -> None:
        if self.variants < 1:
            raise ValueError(f"variants must be at least 1, got {self.variants}")
        if self.multiview not in MULTIVIEW_MODES:
            raise ValueError(f"multiview must be one of {', '.join(MULTIVIEW_MODES)}, got {self.multiview!r}")
        unknown = [f for f in self.formats if f not in DECODER_MODELS]
        if unknown:
            raise ValueError(f"unknown output format(s) {unknown}; choose from {sorted(DECODER_MODELS)}")


@dataclass
class Reconstruction:
    """What a run returns: one mesh and one set of Gaussians per variant (a list stays empty
    when its format was not asked for)."""

    meshes: list[Mesh]
    gaussians: list[Gaussians]
    views: list[str]  # in the order they conditioned the model
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (see StageClock)
    steps: dict[str, list[StepTime]] = field(default_factory=dict)  # per flow stage, each sampler step


class StageClock:
    """Seconds per stage of a run (encode, structure, occupancy, slat, decode_FORMAT) and per
    sampler step. Models load lazily inside the stages; their loading is counted apart as ``load``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.steps: dict[str, list[StepTime]] = {}
        self.load_seconds = 0.0
        self._mark, self._loading = time.perf_counter(), 0.0

    def timings(self) -> dict[str, float]:
        """Seconds per stage in run order, then ``load`` when models were loaded."""
        return {**self.seconds, "load": self.load_seconds} if self.load_seconds else dict(self.seconds)

    def start(self) -> None:
        """A stage method begins: what happened since the last lap belongs to no stage."""
        self._mark, self._loading = time.perf_counter(), 0.0

    def loaded(self, seconds: float) -> None:
        self.load_seconds += seconds
        self._loading += seconds

    def lap(self, stage: str, device: torch.device) -> None:
        """Close ``stage``: the time since the last lap, less any loading in between."""
        synchronize(device)
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._mark - self._loading
        self._mark, self._loading = now, 0.0

    def step_list(self, stage: str) -> list[StepTime]:
        return self.steps.setdefault(stage, [])


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
    def read(cls, folder: Path) -> PipelineConfig:
        path = folder / PIPELINE_FILE
        if not path.is_file():
            raise CheckpointError(
                f"{path}: not found. The model folder must hold {PIPELINE_FILE} and its "
                f"checkpoints (the layout of Hugging Face {HF_REPO})"
            )
        try:
            config = cls._parse(json.loads(path.read_text())["args"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{path}: malformed ({type(e).__name__}: {e}). Replace it with the original file"
            ) from e
        config._check_files(folder, path)
        return config

    @classmethod
    def _parse(cls, args: dict) -> PipelineConfig:
        return cls(
            models=dict(args["models"]),
            structure_sampler=SamplerSettings.from_config(**_sampler_entry(args["sparse_structure_sampler"])),
            slat_sampler=SamplerSettings.from_config(**_sampler_entry(args["slat_sampler"])),
            slat_mean=list(args["slat_normalization"]["mean"]),
            slat_std=list(args["slat_normalization"]["std"]),
            image_cond_model=str(args.get("image_cond_model", "dinov2_vitl14_reg")),
            tiny_random_weights=bool(args.get("tiny_random_weights", False)),
        )

    def _check_files(self, folder: Path, path: Path) -> None:
        missing = [m for m in REQUIRED_MODELS if m not in self.models]
        if missing:
            raise CheckpointError(f"{path}: the models map lacks {', '.join(missing)}")
        for key, stem in self.models.items():
            for file in checkpoint_files(folder, stem):
                if not file.is_file():
                    raise CheckpointError(
                        f"{path}: model {key!r} is {stem}, but {file} is missing. "
                        f"Download the complete model folder ({CHECKPOINT_FOLDER}/ included)"
                    )


def _sampler_entry(entry: dict) -> dict:
    return {"name": entry["name"], "args": entry.get("args", {}), "params": entry.get("params", {})}


def order_views(views: list[View]) -> list[View]:
    """Most visible target first: the reference's multi-view convention."""
    return sorted(views, key=lambda v: v.visible_fraction, reverse=True)


class Amodal3RPipeline:
    """The whole reconstruction. With ``low_vram`` each model holds the device only while its
    stage runs: on an accelerator it waits in CPU memory in between, on the CPU it is freed and
    read again when next needed (the least memory, at the price of reloading). With ``compile``
    the static-shape models run through ``torch.compile`` (see amodal3r.pipelines.compiled)."""

    def __init__(
        self,
        folder: Path,
        config: PipelineConfig,
        device: torch.device,
        dtype: torch.dtype | None,
        low_vram: bool = False,
        compile: bool = False,
    ):
        self.folder, self.config, self.device, self.dtype = folder, config, device, dtype
        self.low_vram, self.compile = low_vram, compile
        self._models: dict[str, nn.Module] = {}
        self._parked: dict[str, nn.Module] = {}  # low_vram: models waiting in CPU memory
        self.clock = StageClock()

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        low_vram: bool = False,
        compile: bool = False,
    ) -> Amodal3RPipeline:
        """Read ``pipeline.json`` and check its files exist; the models load on first use."""
        folder = Path(folder)
        return cls(folder, PipelineConfig.read(folder), pick_device(device), dtype, low_vram, compile)

    @torch.inference_mode()
    def __call__(
        self,
        views: list[View],
        settings: RunSettings = RunSettings(),
        progress: ProgressFn | None = None,
        cancelled: Cancel | None = None,
    ) -> Reconstruction:
        """Views (several of one object: paper Sec. 3.4) to a decoded mesh and Gaussians per variant."""
        if not views:
            raise ValueError("no views given: pass at least one image with its masks")
        self.clock = StageClock()
        # 1. Most visible view first; crop, preprocess and encode each view once.
        ordered = order_views(views)
        cond = self.encode(ordered)
        # 2. Both flow stages from one seeded generator: structure, then the latent on its voxels.
        slat = self.sample_latent(cond, settings, progress, cancelled)
        # 3. Decode each variant into the formats asked for.
        decoded = self.decode(slat, settings.formats, cancelled)
        return Reconstruction(
            decoded.get("mesh", []),
            decoded.get("gaussian", []),
            [v.name for v in ordered],
            self.clock.timings(),
            {stage: list(steps) for stage, steps in self.clock.steps.items()},
        )

    def image_encoder_path(self) -> Path:
        """The DINOv2 checkpoint: in the model folder, else in torch.hub's checkpoint cache."""
        places = image_encoder_places(self.folder)
        for place in places:
            for name in IMAGE_ENCODER_FILES:
                if (place / name).is_file():
                    return place / name
        raise CheckpointError(
            f"DINOv2 weights not found: put {IMAGE_ENCODER_FILES[1]} "
            f"({DOWNLOAD_BASE}/{IMAGE_ENCODER_SOURCE}) into {places[0]} or {places[1]}"
        )

    def image_encoder(self) -> nn.Module:
        return self.model(IMAGE_ENCODER)

    def load(self, key: str) -> nn.Module:
        """Read one model (a ``pipeline.json`` key, or the image encoder) onto ``self.device``.
        The benchmark overrides this with random weights built in memory."""
        if key == IMAGE_ENCODER:
            from amodal3r.models.image_encoder import DinoV2Config, DinoV2Encoder

            config_path = self.folder / IMAGE_ENCODER_CONFIG
            config = (
                DinoV2Config.from_dict(json.loads(config_path.read_text())["args"])
                if config_path.is_file()
                else DinoV2Config.vitl14_reg4()
            )
            return DinoV2Encoder.from_checkpoint(self.image_encoder_path(), config, device=self.device)
        if key not in self.config.models:
            raise CheckpointError(f"{self.folder / PIPELINE_FILE}: no model {key!r} in its models map")
        return load_model(self.folder / self.config.models[key], self.device, self.dtype)

    def model(self, key: str) -> nn.Module:
        """The model on the device: loaded on first use, or brought back from CPU memory."""
        if key not in self._models:
            start = time.perf_counter()
            parked = self._parked.pop(key, None)
            if parked is None:
                parked = route_linears(self.load(key))
                if self.compile:
                    compile_parts(key, parked)
            self._models[key] = parked.to(self.device)
            self.clock.loaded(time.perf_counter() - start)
        return self._models[key]

    @contextmanager
    def using(self, key: str) -> Iterator[nn.Module]:
        """The model for one stage; with ``low_vram`` it leaves the device when the stage ends."""
        model = self.model(key)
        try:
            yield model
        finally:
            if self.low_vram:
                self._park(key)

    def _park(self, key: str) -> None:
        model = self._models.pop(key)
        if self.device.type != "cpu":
            self._parked[key] = model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @property
    def loaded_models(self) -> list[str]:
        return sorted(self._models)

    def unload(self) -> None:
        """Drop every model and give their memory back (also what :func:`keep_freed_memory` keeps)."""
        self._models.clear()
        self._parked.clear()
        release_freed_memory()

    @torch.inference_mode()
    def encode(self, views: list[View]) -> torch.Tensor:
        """Condition rows ``[views, 4112, C]``: image tokens, visibility and occlusion patch ratios.

        Each view is cropped square around its target and occluders (the model expects
        object-centred images, photos are not) and preprocessed as the reference does.
        """
        self.clock.start()
        rows = []
        with self.using(IMAGE_ENCODER) as encoder:
            for view in views:
                crop = crop_square(view.image, view.target, view.occluder)
                pre = preprocess_view(crop.image, crop.target, crop.occluder)
                tokens = encoder(image_to_tensor(pre.image_518)[None].to(self.device))
                vis = torch.from_numpy(pre.vis_ratio)[None].to(tokens.device)
                occ = torch.from_numpy(pre.occ_ratio)[None].to(tokens.device)
                rows.append(assemble_cond(tokens, vis, occ))
        cond = torch.cat(rows)
        self.clock.lap("encode", self.device)
        return cond

    @torch.inference_mode()
    def sample_latent(
        self,
        cond: torch.Tensor,
        settings: RunSettings = RunSettings(),
        progress: ProgressFn | None = None,
        cancelled: Cancel | None = None,
    ) -> SparseTensor:
        """Conditioning ``[views, 4112, C]`` to the structured latent of each variant.

        Noise comes from a CPU generator seeded with ``settings.seed`` (structure noise first, then
        the latent noise), so a seed gives the same result on every device up to float rounding.
        """
        self.clock.start()
        generator = torch.Generator().manual_seed(settings.seed)
        cond = cond.to(self.device)
        coords = self.sample_structure(cond, generator, settings, progress, cancelled)
        return self.sample_slat(cond, coords, generator, settings, progress, cancelled)

    @torch.inference_mode()
    def decode(
        self, slat: SparseTensor, formats: tuple[str, ...] = ("mesh", "gaussian"), cancelled: Cancel | None = None
    ) -> dict[str, list]:
        """Each variant in each format (keys of ``DECODER_MODELS``); only their decoders load."""
        unknown = [f for f in formats if f not in DECODER_MODELS]
        if unknown:
            raise ValueError(f"unknown output format(s) {unknown}; choose from {sorted(DECODER_MODELS)}")
        self.clock.start()
        decoded = {}
        for f in formats:
            if cancelled is not None and cancelled():
                raise Cancelled(f"cancelled before the {f} decoder")
            with self.using(DECODER_MODELS[f]) as decoder:
                decoded[f] = decoder(slat)
            self.clock.lap(f"decode_{f}", self.device)
        return decoded

    def _flow_stage(
        self,
        stage: str,
        flow: nn.Module,
        noise: torch.Tensor | SparseTensor,
        cond: torch.Tensor,
        sampler: SamplerSettings,
        settings: RunSettings,
        progress: ProgressFn | None,
        cancelled: Cancel | None,
        lap: bool = True,
    ) -> torch.Tensor | SparseTensor:
        """One flow stage from ``noise``, guided by the all-zero condition, timed per step."""
        steps = self.clock.step_list(stage)
        negative = torch.zeros_like(cond[:1])
        out = sample(flow, noise, cond, negative, sampler, settings.multiview, progress, cancelled, stage, steps)
        if lap:
            self.clock.lap(stage, self.device)
        return out

    @torch.inference_mode()
    def sample_structure(
        self,
        cond: torch.Tensor,
        generator: torch.Generator,
        settings: RunSettings,
        progress: ProgressFn | None = None,
        cancelled: Cancel | None = None,
    ) -> torch.Tensor:
        """Occupied voxels ``[N, 4]`` (batch = variant, x, y, z) of the 64^3 structure."""
        with self.using("sparse_structure_flow_model") as flow:
            res = flow.resolution
            shape = (settings.variants, flow.in_channels, res, res, res)
            noise = torch.randn(*shape, generator=generator).to(self.device)
            sampler = settings.structure.apply(self.config.structure_sampler)
            latent = self._flow_stage("structure", flow, noise, cond, sampler, settings, progress, cancelled)
        with self.using("sparse_structure_decoder") as decoder:
            logits = decoder(latent)
        coords = torch.argwhere(logits > 0)[:, [0, 2, 3, 4]].int()
        self.clock.lap("occupancy", self.device)
        empty = [v for v in range(settings.variants) if not (coords[:, 0] == v).any()]
        if empty:
            raise PipelineError(
                f"the structure stage produced no occupied voxels (variant {empty[0]}). "
                "Check the masks mark the target, or try another seed or more steps"
            )
        return coords

    @torch.inference_mode()
    def sample_slat(
        self,
        cond: torch.Tensor,
        coords: torch.Tensor,
        generator: torch.Generator,
        settings: RunSettings,
        progress: ProgressFn | None = None,
        cancelled: Cancel | None = None,
    ) -> SparseTensor:
        """The structured latent on ``coords``, de-normalised with the pipeline's mean and std."""
        with self.using("slat_flow_model") as flow:
            noise = torch.randn(coords.shape[0], flow.in_channels, generator=generator).to(self.device)
            sampler = settings.slat.apply(self.config.slat_sampler)
            x = SparseTensor(noise, coords.to(self.device))
            slat = self._flow_stage("slat", flow, x, cond, sampler, settings, progress, cancelled, lap=False)
        std = torch.tensor(self.config.slat_std, device=self.device)[None]
        mean = torch.tensor(self.config.slat_mean, device=self.device)[None]
        slat = slat.replace(slat.feats * std + mean)
        self.clock.lap("slat", self.device)
        return slat

"""The whole reconstruction: views (images with masks) to decoded meshes and Gaussians.

Each view is cropped square around its target and occluders (the model expects object-centred
images, photos are not), preprocessed as the reference does, and encoded once; both flow stages
share the tokens. Several views condition one object (paper Sec. 3.4), most visible first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .conditioning import assemble_cond, crop_square, image_to_tensor, preprocess_view
from amodal3r.io.inputs import View
from .amodal3r import Amodal3RPipeline
from .samplers import MultiViewMode, ProgressFn


@dataclass
class RunSettings:
    seed: int = 0
    variants: int = 1
    multiview: MultiViewMode = "stochastic"
    structure: dict = field(default_factory=dict)  # sampler overrides: steps, cfg_strength, ...
    slat: dict = field(default_factory=dict)
    formats: tuple[str, ...] = ("mesh", "gaussian")


@dataclass
class Reconstruction:
    meshes: list  # one per variant, or empty
    gaussians: list
    views: list[str]  # in the order they conditioned the model
    timings: dict[str, float]


def order_views(views: list[View]) -> list[View]:
    """Most visible target first: the reference's multi-view convention."""
    return sorted(views, key=lambda v: v.visible_fraction, reverse=True)


@torch.inference_mode()
def encode_views(pipeline: Amodal3RPipeline, views: list[View]) -> torch.Tensor:
    """Condition rows ``[views, 4112, C]``: image tokens, visibility and occlusion patch ratios."""
    encoder = pipeline.image_encoder()
    rows = []
    for view in views:
        crop = crop_square(view.image, view.target, view.occluder)
        pre = preprocess_view(crop.image, crop.target, crop.occluder)
        tokens = encoder(image_to_tensor(pre.image_518)[None].to(pipeline.device))
        vis = torch.from_numpy(pre.vis_ratio)[None].to(tokens.device)
        occ = torch.from_numpy(pre.occ_ratio)[None].to(tokens.device)
        rows.append(assemble_cond(tokens, vis, occ))
    return torch.cat(rows)


def reconstruct(pipeline: Amodal3RPipeline, views: list[View], settings: RunSettings,
                progress: ProgressFn | None = None, cancelled: Callable[[], bool] | None = None) -> Reconstruction:
    if not views:
        raise ValueError("no views given: pass at least one image with its masks")
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    ordered = order_views(views)
    cond = encode_views(pipeline, ordered)
    lap("encode")
    slat = pipeline.run(cond, settings.seed, settings.variants, settings.multiview, settings.structure,
                        settings.slat, progress, cancelled)
    lap("sample")
    decoded = pipeline.decode(slat, settings.formats)
    lap("decode")
    return Reconstruction(decoded.get("mesh", []), decoded.get("gaussian", []), [v.name for v in ordered], timings)

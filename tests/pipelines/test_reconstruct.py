"""Views to decoded meshes and Gaussians with tiny weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from amodal3r.io.inputs import View, validate_view
from amodal3r.pipelines.amodal3r import Amodal3RPipeline, RunSettings, StageSettings, order_views

FAST = RunSettings(structure=StageSettings(steps=2), slat=StageSettings(steps=1))


def synthetic_view(name: str, visible_rows: int, seed: int = 0) -> View:
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((120, 160, 3)) * 255).astype(np.uint8))
    target = np.zeros((120, 160), bool)
    target[30 : 30 + visible_rows, 40:100] = True
    occluder = np.zeros((120, 160), bool)
    occluder[20:100, 90:130] = True
    return validate_view(View(image, target, occluder, name, []), name)


def test_views_are_ordered_most_visible_first() -> None:
    views = [synthetic_view("small", 10), synthetic_view("large", 60), synthetic_view("medium", 30)]
    assert [v.name for v in order_views(views)] == ["large", "medium", "small"]


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Amodal3RPipeline:
    return Amodal3RPipeline.from_pretrained(tiny_model_dir, device="cpu")


def test_single_view_to_mesh_and_gaussians(pipeline: Amodal3RPipeline) -> None:
    result = pipeline([synthetic_view("photo", 50)], FAST)
    assert len(result.meshes) == 1 and result.meshes[0].success
    assert len(result.gaussians) == 1 and result.gaussians[0].get_xyz.shape[0] > 0
    stages = {"encode", "structure", "occupancy", "slat", "decode_mesh", "decode_gaussian"}
    assert set(result.timings) == stages | {"load"} and all(v >= 0 for v in result.timings.values())
    assert [s.passes for s in result.steps["structure"]] == [2, 2] and len(result.steps["slat"]) == 1
    assert "image_cond_model" in pipeline.loaded_models


def test_three_views_two_variants(pipeline: Amodal3RPipeline) -> None:
    views = [synthetic_view(f"v{i}", 20 + 15 * i, seed=i) for i in range(3)]
    one_step = StageSettings(steps=1)
    settings = RunSettings(variants=2, multiview="multidiffusion", structure=one_step, slat=one_step, formats=("mesh",))
    result = pipeline(views, settings)
    assert result.views == ["v2", "v1", "v0"]
    assert len(result.meshes) == 2 and result.gaussians == []

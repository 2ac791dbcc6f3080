"""The pipeline end to end on tiny random weights in the official folder layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from amodal3r.api.errors import Cancelled
from amodal3r.cli import main
from amodal3r.pipelines.amodal3r import Amodal3RPipeline, RunSettings, StageSettings
from amodal3r.weights.tiny import TINY_COND_CHANNELS

FAST = StageSettings(steps=2)


def fast(**changes) -> RunSettings:
    return RunSettings(**{"structure": FAST, "slat": FAST, "formats": (), **changes})


def random_cond(views: int = 1, seed: int = 0) -> torch.Tensor:
    """Condition rows shaped like real ones: tokens, then visibility and occlusion ratios per patch."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.nn.functional.layer_norm(
        torch.randn(views, 1374, TINY_COND_CHANNELS, generator=g), (TINY_COND_CHANNELS,)
    )
    vis = (torch.rand(views, 1369, 1, generator=g) * 196).round() / 196
    occ = (1 - vis) * (torch.rand(views, 1369, 1, generator=g) > 0.5)
    return torch.cat([tokens, vis.expand(-1, -1, TINY_COND_CHANNELS), occ.expand(-1, -1, TINY_COND_CHANNELS)], dim=1)


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Amodal3RPipeline:
    return Amodal3RPipeline.from_pretrained(tiny_model_dir, device="cpu")


def test_models_load_lazily(tiny_model_dir: Path) -> None:
    p = Amodal3RPipeline.from_pretrained(tiny_model_dir, device="cpu")
    assert p.loaded_models == []
    p.sample_structure(random_cond(), torch.Generator().manual_seed(0), fast())
    assert p.loaded_models == ["sparse_structure_decoder", "sparse_structure_flow_model"]


def test_run_is_deterministic_and_denormalised(pipeline: Amodal3RPipeline) -> None:
    progress: list[tuple[str, int, int]] = []
    a = pipeline.sample_latent(random_cond(), fast(seed=3), progress=lambda *e: progress.append(e))
    b = pipeline.sample_latent(random_cond(), fast(seed=3))
    assert torch.equal(a.coords, b.coords) and torch.equal(a.feats, b.feats)
    assert progress == [("structure", 1, 2), ("structure", 2, 2), ("slat", 1, 2), ("slat", 2, 2)]
    assert 100 < a.feats.shape[0] < 64**3 // 4 and a.coords[:, 1:].max() < 64
    assert a.feats.shape[1] == 8 and torch.isfinite(a.feats).all()
    c = pipeline.sample_latent(random_cond(), fast(seed=4))
    assert not torch.equal(a.coords, c.coords)


def test_variants_and_multiview(pipeline: Amodal3RPipeline) -> None:
    for mode in ("stochastic", "multidiffusion"):
        slat = pipeline.sample_latent(
            random_cond(views=3), fast(seed=1, variants=2, multiview=mode, slat=StageSettings(steps=1))
        )
        assert slat.batch_size == 2 and all(s.stop > s.start for s in slat.layout)


def test_bfloat16_is_close_to_float32(tiny_model_dir: Path) -> None:
    cond = random_cond()
    flow32 = Amodal3RPipeline.from_pretrained(tiny_model_dir, device="cpu").model("sparse_structure_flow_model")
    flow16 = Amodal3RPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.bfloat16).model(
        "sparse_structure_flow_model"
    )
    x, t = torch.randn(1, 8, 16, 16, 16), torch.tensor([500.0])
    with torch.inference_mode():
        v32, v16 = flow32(x, t, cond), flow16(x, t, cond)
    assert v16.dtype == torch.float32
    assert (v32 - v16).abs().max() < 0.05 * v32.abs().max()


def test_cancel_between_steps(pipeline: Amodal3RPipeline) -> None:
    with pytest.raises(Cancelled):
        pipeline.sample_latent(random_cond(), fast(structure=StageSettings(steps=5)), cancelled=lambda: True)


def test_tiny_weights_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["tiny-weights", str(tmp_path / "w"), "--seed", "5"]) == 0
    assert "RANDOM" in capsys.readouterr().out
    config = json.loads((tmp_path / "w" / "pipeline.json").read_text())["args"]
    for rel in config["models"].values():
        assert (tmp_path / "w" / f"{rel}.json").is_file() and (tmp_path / "w" / f"{rel}.safetensors").is_file()
    assert Amodal3RPipeline.from_pretrained(tmp_path / "w").config.structure_sampler.steps == 25

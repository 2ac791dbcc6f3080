"""The Euler sampler's guidance interval, multi-view modes, batching, progress and cancel."""

from __future__ import annotations

import pytest
import torch

from amodal3r.modules.sparse import SparseTensor
from amodal3r.pipelines.samplers import Cancelled, SamplerSettings, sample, time_pairs


class ToyFlow:
    """A velocity that depends on x, t and the condition, recording each batched call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float]] = []

    def __call__(self, x, t: torch.Tensor, cond: torch.Tensor):
        self.calls.append((cond.shape[0], float(t[0])))
        feats = x.feats if isinstance(x, SparseTensor) else x
        rows = x.row_batch if isinstance(x, SparseTensor) else torch.arange(feats.shape[0])
        scale = 1 + cond.mean(dim=(1, 2))[rows].view(-1, *[1] * (feats.dim() - 1))
        out = torch.sin(feats) * scale + float(t[0]) / 1000
        return x.replace(out) if isinstance(x, SparseTensor) else out


def reference_loop(
    x: torch.Tensor, conds: torch.Tensor, neg: torch.Tensor, s: SamplerSettings, mode: str
) -> torch.Tensor:
    """The sampler written out step by step, one model call per condition."""
    model = ToyFlow()
    for i, (t, t_prev) in enumerate(time_pairs(s.steps, s.rescale_t)):
        tt = torch.full((x.shape[0],), 1000 * t)
        views = range(conds.shape[0]) if mode == "multidiffusion" else [i % conds.shape[0]]
        per_row = [conds[j : j + 1].expand(x.shape[0], -1, -1) for j in views]
        v = sum(model(x, tt, c) for c in per_row) / len(views)
        if s.cfg_interval[0] <= t <= s.cfg_interval[1] and s.cfg_strength > 0:
            v = (1 + s.cfg_strength) * v - s.cfg_strength * model(x, tt, neg.expand(x.shape[0], -1, -1))
        x = x - (t - t_prev) * v
    return x


def conds(n: int) -> torch.Tensor:
    return torch.arange(1.0, n + 1)[:, None, None].expand(n, 3, 2) / 10


@pytest.mark.parametrize("mode", ["stochastic", "multidiffusion"])
@pytest.mark.parametrize("views", [1, 3])
def test_matches_step_by_step_reference(mode: str, views: int) -> None:
    s = SamplerSettings(steps=6, cfg_strength=3.0, cfg_interval=(0.5, 0.95), rescale_t=3.0)
    noise = torch.randn(2, 4, 3)
    neg = torch.zeros(1, 3, 2)
    out = sample(ToyFlow(), noise, conds(views), neg, s, multiview=mode)
    assert torch.allclose(out, reference_loop(noise, conds(views), neg, s, mode), atol=1e-6)


def test_guided_pair_is_one_batched_call_and_unguided_steps_skip_the_negative() -> None:
    s = SamplerSettings(steps=4, cfg_strength=7.5, cfg_interval=(0.5, 0.95), rescale_t=3.0)
    model = ToyFlow()
    sample(model, torch.randn(1, 8), conds(1), torch.zeros(1, 3, 2), s)
    # t = 1.0 is outside the interval: conditional only; 0.9, 0.75, 0.5 are guided: cond + neg in one batch.
    assert model.calls == [(1, 1000.0), (2, 900.0), (2, 750.0), (2, 500.0)]


def test_multidiffusion_batches_all_views_and_the_negative() -> None:
    model = ToyFlow()
    sample(
        model,
        torch.randn(2, 8),
        conds(3),
        torch.zeros(1, 3, 2),
        SamplerSettings(steps=2, cfg_strength=1.0),
        multiview="multidiffusion",
    )
    assert [n for n, _ in model.calls] == [8, 8]  # (3 views + negative) x 2 variants


def test_sparse_latents_sample_like_dense_ones() -> None:
    coords = torch.tensor([[0, 1, 2, 3], [0, 4, 4, 4], [1, 0, 0, 0]], dtype=torch.int32)
    feats = torch.randn(3, 5)
    s = SamplerSettings(steps=3, cfg_strength=2.0, cfg_interval=(0.0, 1.0))
    out = sample(ToyFlow(), SparseTensor(feats, coords), conds(1), torch.zeros(1, 3, 2), s)
    dense = reference_loop(feats, conds(1), torch.zeros(1, 3, 2), s, "stochastic")
    assert torch.equal(out.coords, coords)
    assert torch.allclose(out.feats, dense, atol=1e-6)


def test_progress_and_cancel() -> None:
    seen: list[tuple[str, int, int]] = []
    sample(
        ToyFlow(),
        torch.randn(1, 4),
        conds(1),
        torch.zeros(1, 3, 2),
        SamplerSettings(steps=3),
        progress=lambda *a: seen.append(a),
        stage="structure",
    )
    assert seen == [("structure", 1, 3), ("structure", 2, 3), ("structure", 3, 3)]
    with pytest.raises(Cancelled, match="cancelled at step 2 of 5"):
        sample(
            ToyFlow(),
            torch.randn(1, 4),
            conds(1),
            torch.zeros(1, 3, 2),
            SamplerSettings(steps=5),
            progress=lambda *a: seen.append(a),
            cancelled=lambda: len(seen) >= 5,
        )


def test_settings_from_pipeline_config_and_overrides() -> None:
    s = SamplerSettings.from_config(
        "FlowEulerGuidanceIntervalSampler",
        {"sigma_min": 1e-5},
        {"steps": 25, "cfg_strength": 7.5, "cfg_interval": [0.5, 1.0], "rescale_t": 3.0},
    )
    assert s == SamplerSettings(25, 7.5, (0.5, 1.0), 3.0, 1e-5)
    assert s.override(steps=12, cfg_strength=None).steps == 12
    with pytest.raises(ValueError, match="unknown sampler setting"):
        s.override(stepz=3)
    with pytest.raises(ValueError, match="unknown sampler 'DDIM'"):
        SamplerSettings.from_config("DDIM", {}, {})
    with pytest.raises(ValueError, match="steps must be at least 1"):
        s.override(steps=0)

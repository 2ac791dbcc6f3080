"""Each exact shortcut against the plain computation it replaces (``amodal3r.modules.shortcuts``)."""

from __future__ import annotations

import pytest
import torch
from conftest import WIDTH, condition_rows, shell_latent, tiny_flow

from amodal3r.modules.attention import MultiHeadAttention
from amodal3r.modules.condition import IMAGE, OCCLUSION, Condition, cross_attend, prepare_condition
from amodal3r.modules.shortcuts import SHORTCUTS, plain
from amodal3r.modules.sparse import SparseDownsample, SparseTensor, SparseUpsample
from amodal3r.pipelines.samplers import SamplerSettings, sample


def test_uniform_row_cross_attention_is_the_value_projection() -> None:
    """All-equal tokens (the unconditional row): every query's output is ``to_out(v)``, whatever the bias."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4, ctx_channels=WIDTH, type="cross")
    cond = torch.cat([condition_rows(1), torch.zeros(1, *condition_rows(1).shape[1:])])
    rows = prepare_condition(cond, True, torch.float32)
    assert rows.uniform == {IMAGE: [False, True], OCCLUSION: [False, True]}
    x = torch.randn(2, 40, 32)
    with torch.inference_mode():
        fast = cross_attend(attn, x, Condition.per_element(rows), IMAGE)
        plain_out = attn(x, rows.tokens[IMAGE], rows.visibility_bias)
        exact = attn.double()(x.double(), rows.tokens[IMAGE].double(), rows.visibility_bias.double())
    # The plain fp32 softmax sums 1374 weights (rounding ~1e-5 relative); the shortcut is the exact value.
    assert (fast - exact).abs().max() <= 1e-6 * exact.abs().max()
    assert (plain_out - exact).abs().max() <= 3e-5 * exact.abs().max()
    assert rows.cache  # keys/values and the constant are kept for the next step
    with plain("uniform_condition"):
        assert prepare_condition(cond, True, torch.float32).uniform[IMAGE] == [False, False]


@pytest.mark.parametrize("key", ["sparse_structure_flow_model", "slat_flow_model"])
def test_shared_latent_guided_forward_equals_the_plain_batch(key: str) -> None:
    """One latent, two conditions (a view and the negative): the shared, cached forward equals the
    plain forward of the repeated latent on the concatenated conditions."""
    model = tiny_flow(key)
    conds = torch.cat([condition_rows(2), torch.zeros(1, *condition_rows(1).shape[1:])])
    if key == "slat_flow_model":
        x, repeated = shell_latent(2), shell_latent(2).repeat_batch(2)
        t = torch.tensor([600.0, 600.0])
    else:
        x = torch.randn(2, 8, 16, 16, 16, generator=torch.Generator().manual_seed(0))
        repeated, t = x.repeat(2, 1, 1, 1, 1), torch.tensor([600.0, 600.0])
    with torch.inference_mode():
        rows = model.prepare_condition(conds)
        shared = model(x, t, Condition(rows, [1, 2], group_size=2))
        with plain():
            expected = model(repeated, t.repeat(2), conds[[1, 1, 2, 2]])
    shared = shared.feats if isinstance(shared, SparseTensor) else shared
    expected = expected.feats if isinstance(expected, SparseTensor) else expected
    err = (shared - expected).abs().max().item()
    assert err <= 1e-5 * (1 + expected.abs().max().item()), err


def test_sampler_with_and_without_shortcuts() -> None:
    """A guided run, two views by multidiffusion: every shortcut on against every one off."""
    model = tiny_flow("sparse_structure_flow_model")
    cond = condition_rows(2, seed=3)
    settings = SamplerSettings(steps=3, cfg_strength=7.5, cfg_interval=(0.5, 1.0), rescale_t=3.0)
    noise = torch.randn(1, 8, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        fast = sample(model, noise, cond, torch.zeros_like(cond[:1]), settings, multiview="multidiffusion")
        with plain():
            slow = sample(model, noise, cond, torch.zeros_like(cond[:1]), settings, multiview="multidiffusion")
    assert (fast - slow).abs().max() <= 1e-5 * (1 + slow.abs().max())


def test_condition_cache_computes_keys_once_per_run(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_flow("sparse_structure_flow_model")
    calls = []
    to_kv = model.blocks[0].cross_attn.to_kv
    monkeypatch.setattr(to_kv, "forward", lambda x, f=to_kv.forward: calls.append(x.shape) or f(x))
    cond = condition_rows(1)
    settings = SamplerSettings(steps=4, cfg_strength=3.0)
    noise = torch.randn(1, 8, 16, 16, 16)
    with torch.inference_mode():
        cached = sample(model, noise, cond, torch.zeros_like(cond), settings)
        assert len(calls) == 2  # the view's keys and values once, the negative's constant once
        with plain("condition_cache"):
            uncached = sample(model, noise, cond, torch.zeros_like(cond), settings)
    assert len(calls) == 2 + 2 * 4
    assert torch.equal(cached, uncached)


def test_repeated_coarse_voxels_upsample_onto_the_repeated_fine_ones() -> None:
    x = shell_latent(2)
    coarse = SparseDownsample(2)(x)
    up = SparseUpsample(2)(coarse.repeat_batch(3))
    expected = SparseUpsample(2)(SparseDownsample(2)(x.repeat_batch(3)))
    assert torch.equal(up.coords, expected.coords) and torch.equal(up.feats, expected.feats)
    assert [s.stop - s.start for s in up.layout] == [s.stop - s.start for s in expected.layout]
    assert x.repeat_batch(3).cache is x.repeat_batch(3).cache  # one set of neighbour maps per run


def test_plain_restores_the_switches() -> None:
    with plain("shared_prefix"):
        assert not SHORTCUTS.shared_prefix and SHORTCUTS.condition_cache
    assert SHORTCUTS.shared_prefix
    with pytest.raises(ValueError, match="unknown shortcut"):
        with plain("warp_drive"):
            pass


def test_scatter_free_sparse_conv_is_bitwise_the_scatter_add() -> None:
    from amodal3r.models.structured_latent_mesh_decoder import conv_after_subdivide
    from amodal3r.modules.sparse import SparseConv3d

    torch.manual_seed(0)
    x = shell_latent(2)
    x = x.replace(torch.randn(x.feats.shape[0], 96))  # wider than GATHER_MAX_CHANNELS: per-cell products
    conv = SparseConv3d(96, 48)
    with torch.inference_mode():
        fast, fast_sub = conv(x).feats, conv_after_subdivide(x, conv).feats
        with plain("scatter_free"):
            slow, slow_sub = conv(x).feats, conv_after_subdivide(x, conv).feats
    assert torch.equal(fast, slow) and torch.equal(fast_sub, slow_sub)


def test_subdivided_neighbour_index_equals_the_searched_one() -> None:
    from amodal3r.models.structured_latent_mesh_decoder import subdivide
    from amodal3r.modules.sparse import build_neighbour_index

    x = shell_latent(2)
    children = subdivide(x)  # the index is derived from the parents'
    grandchildren = subdivide(children)
    for fine in (children, grandchildren):
        assert torch.equal(fine.cache[("neighbour_index", 3)], build_neighbour_index(fine.coords, 3))
    with plain("subdivided_neighbours"):
        assert ("neighbour_index", 3) not in subdivide(shell_latent(1)).cache


def test_scatter_free_pooling_equals_the_scatter_add() -> None:
    x = shell_latent(2).replace(torch.randn(shell_latent(2).feats.shape[0], 16))
    with torch.inference_mode():
        fast = SparseDownsample(2)(x)
        with plain("scatter_free"):
            slow = SparseDownsample(2)(x)
    assert torch.equal(fast.coords, slow.coords)
    assert torch.allclose(fast.feats, slow.feats, rtol=1e-6, atol=1e-6)  # summation order may differ

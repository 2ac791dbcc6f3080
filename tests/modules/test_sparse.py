"""Sparse tensors, submanifold convolution and resampling against dense references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amodal3r.modules.sparse import SparseConv3d, SparseDownsample, SparseTensor, SparseUpsample


def random_voxels(batch: int = 2, res: int = 12, fill: float = 0.3, channels: int = 5, seed: int = 0) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    occupied = torch.rand(batch, res, res, res, generator=g) < fill
    coords = torch.argwhere(occupied).int()
    return SparseTensor(torch.randn(coords.shape[0], channels, generator=g), coords, batch)


def dense_reference_conv(x: SparseTensor, conv: SparseConv3d, res: int) -> torch.Tensor:
    """Zero-padded dense conv3d with the same kernel, read back at the occupied sites."""
    grid = torch.zeros(x.batch_size, x.feats.shape[1], res, res, res)
    b, i, j, k = x.coords.long().unbind(1)
    grid[b, :, i, j, k] = x.feats
    weight = conv.conv.weight.permute(0, 4, 1, 2, 3)
    out = F.conv3d(grid, weight, conv.conv.bias, padding=1)
    return out[b, :, i, j, k]


@pytest.mark.parametrize("channels", [5, 80])  # gathered (narrow) and scattered (wide) formulations
def test_submanifold_conv_matches_dense_conv(channels: int) -> None:
    x = random_voxels(channels=channels)
    conv = SparseConv3d(channels, 7)
    torch.nn.init.normal_(conv.conv.bias)
    with torch.no_grad():
        out = conv(x)
    assert torch.allclose(out.feats, dense_reference_conv(x, conv, 12), atol=1e-5)


def test_neighbour_index_built_once_per_coordinate_set() -> None:
    x = random_voxels()
    conv1, conv2 = SparseConv3d(5, 5), SparseConv3d(5, 5)
    with torch.no_grad():
        h = conv1(x)
        index = x.cache[("neighbour_index", 3)]
        conv2(h)
        conv2(x.replace(torch.randn_like(x.feats)))
    assert x.cache[("neighbour_index", 3)] is index
    n = x.feats.shape[0]
    assert torch.equal(index[:, 13], torch.arange(n))  # the centre cell reads the voxel itself
    # Symmetry: if b is a's neighbour at offset d, a is b's at -d (cell 26 - k).
    a, k = torch.nonzero(index < n, as_tuple=True)
    assert torch.equal(index[index[a, k], 26 - k], a)


def test_neighbour_pairs_agree_with_the_index() -> None:
    from amodal3r.modules.sparse.conv import neighbour_index, neighbour_map

    x = random_voxels()
    index = neighbour_index(x, 3)
    for k, (out_rows, in_rows) in enumerate(neighbour_map(x, 3)):
        assert torch.equal(index[out_rows, k], in_rows)
        assert (index[:, k] < len(index)).sum() == len(out_rows)


def test_spconv_backend_agrees_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("spconv.pytorch", reason="spconv is the optional accelerator backend")
    x = random_voxels(channels=16)
    conv = SparseConv3d(16, 8)
    torch.nn.init.normal_(conv.conv.bias)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ours = conv(x).feats
            monkeypatch.setenv("AMODAL3R_SPARSE_CONV", "spconv")
            monkeypatch.setenv("AMODAL3R_SPCONV_ON_CPU", "1")
            theirs = conv(x).feats
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_spconv_never_serves_cpu_tensors_on_several_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from amodal3r.modules.sparse.conv import use_spconv

    monkeypatch.setenv("AMODAL3R_SPARSE_CONV", "spconv")
    monkeypatch.setenv("AMODAL3R_SPCONV_ON_CPU", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert not use_spconv(random_voxels())
    finally:
        torch.set_num_threads(threads)


def test_downsample_pools_like_the_reference_and_upsample_restores_rows() -> None:
    coords = torch.tensor([[0, 3, 3, 3], [0, 0, 0, 0], [0, 1, 1, 1], [1, 0, 0, 1], [0, 2, 2, 2]], dtype=torch.int32)
    feats = torch.tensor([[1.0], [2.0], [4.0], [8.0], [16.0]])
    x = SparseTensor(feats, coords, 2)
    down = SparseDownsample(2)(x)
    # Coarse voxels in (batch, x, y, z) order; each is the sum of its children over (children + 1).
    assert down.coords.tolist() == [[0, 0, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]]
    assert torch.allclose(down.feats.flatten(), torch.tensor([(2 + 4) / 3, (1 + 16) / 3, 8 / 2]))
    assert [(s.start, s.stop) for s in down.layout] == [(0, 2), (2, 3)]
    up = SparseUpsample(2)(down.replace(torch.tensor([[10.0], [20.0], [30.0]])))
    assert torch.equal(up.coords, coords)
    assert up.feats.flatten().tolist() == [20.0, 10.0, 10.0, 30.0, 20.0]
    assert up.cache is x.cache


def test_upsample_without_downsample_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="preceding SparseDownsample"):
        SparseUpsample(2)(random_voxels())


def test_cat_shifts_batches_and_per_batch_broadcast() -> None:
    a, b = random_voxels(batch=1, seed=1), random_voxels(batch=2, seed=2)
    both = SparseTensor.cat([a, b])
    assert both.batch_size == 3
    assert torch.equal(both.coords[len(a.feats) :, 0], b.coords[:, 0] + 1)
    scale = torch.arange(3.0)[:, None].expand(3, 5)
    scaled = both * scale
    for i, rows in enumerate(both.layout):
        assert torch.equal(scaled.feats[rows], both.feats[rows] * i)


def test_bad_coordinates_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"coords must be \[N, 4\]"):
        SparseTensor(torch.zeros(3, 2), torch.zeros(3, 3, dtype=torch.int32))

"""Structured-latent decoders against the reference's golden outputs, plus windowed attention and PLY export.

Golden data: see ``conftest.golden_dir`` and the golden README, sections 4-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, golden_case
from safetensors.torch import load_file
from torch import nn

from amodal3r.models import model_class
from amodal3r.models._checkpoints import load_model
from amodal3r.models.structured_latent_mesh_decoder import conv_after_subdivide, subdivide
from amodal3r.modules import window_attention
from amodal3r.modules.sparse import SparseConv3d, SparseTensor
from amodal3r.modules.window_attention import window_keys, window_partition, windowed_self_attention
from amodal3r.representations.gaussians import Y_UP_TO_Z_UP, Gaussians

GAUSSIAN_FIELDS = (
    "_xyz",
    "_features_dc",
    "_scaling",
    "_rotation",
    "_opacity",
    "get_xyz",
    "get_scaling",
    "get_rotation",
    "get_opacity",
    "get_features",
)


@pytest.fixture(autouse=True)
def single_thread():
    """The cases are tiny: extra threads only add contention (seconds on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_tight(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The agreed bound ``1e-4 * (1 + max|expected|)``, then a tighter one that wrong variants would miss."""
    try:
        assert_close(actual, expected, rel=1e-4)
        assert_close(actual, expected, rel=1e-5)  # we reach ~3e-7
    except AssertionError as e:
        raise AssertionError(f"{name}: {e}") from None


def load_case(case: str):
    folder = golden_case(case)
    model = load_model(folder / "model", device="cpu", dtype=torch.float32)
    io = load_file(folder / "io.safetensors")
    return model, io, SparseTensor(io["feats"], io["coords"])


@pytest.mark.parametrize("case", ["slat_dec_mesh", "slat_dec_gs"])
def test_golden_decoder(case: str) -> None:
    model, io, x = load_case(case)
    with torch.no_grad():
        out = model.decode(x)
    if case == "slat_dec_mesh":
        # Row 64*i + 8*a + b: child b of child a of input row i.
        assert torch.equal(out.coords, io["dec_coords"])
        assert_tight("dec_feats", out.feats, io["dec_feats"])
        return
    (gaussians,) = model.to_representation(out)
    assert_tight("offset_perturbation", model.offset_perturbation, io["offset_perturbation"])
    for name in GAUSSIAN_FIELDS:
        assert_tight(name, getattr(gaussians, name), io[name])


def test_golden_offset_perturbation_built_from_config() -> None:
    """The buffer the constructor computes (not just the one loaded) matches the reference's."""
    folder = golden_case("slat_dec_gs")
    config = json.loads((folder / "model.json").read_text())
    model = model_class(config["name"])(**config["args"])
    stored = load_file(folder / "model.safetensors")["offset_perturbation"]
    assert torch.allclose(model.offset_perturbation, stored, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ["slat_dec_mesh", "slat_dec_gs"])
def test_golden_decoder_fp16_torso(case: str) -> None:
    """``set_torso_dtype(float16)``: only torso linear/conv weights change dtype; output stays close."""
    model, io, x = load_case(case)
    model.set_torso_dtype(torch.float16)
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        in_torso = name.startswith(("blocks.", "upsample."))
        weighted = isinstance(module, nn.Linear) or name.endswith(".conv")
        want = torch.float16 if in_torso and weighted else torch.float32
        assert all(p.dtype == want for p in params), f"{name}: {[p.dtype for p in params]} != {want}"
    assert all(b.dtype == torch.float32 for b in model.buffers())
    with torch.no_grad():
        out = model.decode(x)
    assert out.dtype == torch.float32
    if case == "slat_dec_mesh":
        actual, expected = out.feats, io["dec_feats"]
    else:
        actual, expected = model.to_representation(out)[0]._scaling, io["_scaling"]
    assert (actual - expected).abs().max().item() < 1e-2 * (1 + expected.abs().max().item())


@pytest.mark.parametrize("case", ["slat_dec_mesh", "slat_dec_gs"])
def test_full_size_manifest(case: str) -> None:
    """The official full-size config gives exactly the official keys, shapes and (fp16) dtypes."""
    manifest = json.loads((golden_case("manifests") / f"{case}.json").read_text())
    with torch.device("meta"):
        model = model_class(manifest["name"])(**manifest["args"])
    state = {k: ([*v.shape], str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    expected = {k: ([*shape], dtype) for k, (shape, dtype) in manifest["state_dict"].items()}
    assert sorted(set(expected) - set(state)) == [] and sorted(set(state) - set(expected)) == []
    assert {k: v for k, v in state.items() if v != expected[k]} == {}
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["num_elements"]


# ---- windowed attention ----------------------------------------------------------------------


def random_voxels(batch: int, count: int, extent: int, seed: int) -> torch.Tensor:
    """Unique random voxels per batch element, rows grouped by batch and sorted."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for b in range(batch):
        flat = torch.randperm(extent**3, generator=g)[:count].sort().values
        xyz = torch.stack([flat // extent**2, flat // extent % extent, flat % extent], dim=1)
        parts.append(torch.cat([torch.full((count, 1), b), xyz], dim=1))
    return torch.cat(parts).int()


def naive_windowed_attention(q, k, v, coords, window_size, shift):
    """One float64 softmax attention per window, by an explicit loop."""
    keys = window_keys(coords, window_size, shift)
    out = torch.empty_like(q, dtype=torch.float64)
    for key in keys.unique():
        rows = (keys == key).nonzero().squeeze(1)
        qw, kw, vw = (t[rows].double().transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        weights = torch.softmax(qw @ kw.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        out[rows] = (weights @ vw).transpose(0, 1)
    return out


@pytest.mark.parametrize("shift", [0, 4])
@pytest.mark.parametrize("max_logits", [window_attention.MAX_LOGITS_PER_CALL, 2000])
def test_windowed_attention_matches_per_window_loop(shift: int, max_logits: int, monkeypatch) -> None:
    monkeypatch.setattr(window_attention, "MAX_LOGITS_PER_CALL", max_logits)  # 2000: a few windows per call
    coords = random_voxels(batch=2, count=600, extent=24, seed=shift)
    heads, dim = 3, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(coords.shape[0], heads, dim, generator=g) for _ in range(3))
    partition = window_partition(coords, 8, shift)
    expected = naive_windowed_attention(q, k, v, coords, 8, shift)
    assert partition.num_windows == window_keys(coords, 8, shift).unique().numel()
    assert any(b.key_bias is not None for b in partition.buckets)  # padding is exercised
    out = windowed_self_attention(torch.stack([q, k, v], dim=1), partition, jagged=False)
    assert (out.double() - expected).abs().max().item() < 1e-5
    # The GPU path: every window in one jagged call, no padding (here on the CPU).
    jagged = windowed_self_attention(torch.stack([q, k, v], dim=1), partition, jagged=True)
    assert (jagged.double() - expected).abs().max().item() < 1e-5


def test_one_window_per_element_equals_full_attention() -> None:
    """``swin`` with a window covering the grid takes the windowed path and must equal ``full``."""
    rep = {
        "lr": dict.fromkeys(("_xyz", "_features_dc", "_opacity", "_scaling", "_rotation"), 1.0),
        "perturb_offset": True,
        "voxel_size": 1.5,
        "num_gaussians": 4,
        "3d_filter_kernel_size": 9e-4,
        "scaling_bias": 4e-3,
        "opacity_bias": 0.1,
        "scaling_activation": "softplus",
    }
    args = {
        "resolution": 16,
        "model_channels": 32,
        "latent_channels": 8,
        "num_blocks": 2,
        "num_heads": 2,
        "window_size": 16,
        "qk_rms_norm": True,
        "representation_config": rep,
    }
    torch.manual_seed(0)
    full = model_class("SLatGaussianDecoder")(attn_mode="full", **args).eval()
    swin = model_class("SLatGaussianDecoder")(attn_mode="swin", **args).eval()
    swin.load_state_dict(full.state_dict())
    coords = random_voxels(batch=2, count=200, extent=8, seed=9)  # shifted by 8: still one window
    x = SparseTensor(torch.randn(coords.shape[0], 8), coords)
    with torch.no_grad():
        assert (swin.decode(x).feats - full.decode(x).feats).abs().max().item() < 1e-5


def test_window_partition_groups_each_window_once() -> None:
    coords = random_voxels(batch=2, count=300, extent=20, seed=3)
    partition = window_partition(coords, 8, 4)
    slot_rows = torch.cat([b.rows.reshape(-1) for b in partition.buckets])
    assert slot_rows.numel() == partition.num_slots
    assert torch.equal(slot_rows[partition.unpad], torch.arange(coords.shape[0]))  # each row has one real slot
    assert partition.unpad.unique().numel() == coords.shape[0]
    for bucket in partition.buckets:
        for window_rows in bucket.rows:
            cells = coords[window_rows].long()
            assert (cells[:, 0] == cells[0, 0]).all()
            assert ((cells[:, 1:] + 4) // 8 == (cells[0, 1:] + 4) // 8).all()


# ---- subdivision ------------------------------------------------------------------------------


def test_conv_after_subdivide_equals_conv_of_subdivided() -> None:
    coords = random_voxels(batch=2, count=150, extent=7, seed=5)  # dense enough to have all neighbours, touches 0
    x = SparseTensor(torch.randn(coords.shape[0], 6, generator=torch.Generator().manual_seed(2)), coords)
    conv = SparseConv3d(6, 5, 3)
    with torch.no_grad():
        expected = conv(subdivide(x))
        actual = conv_after_subdivide(x, conv)
    assert torch.equal(actual.coords, expected.coords) and actual.layout == expected.layout
    assert (actual.feats - expected.feats).abs().max().item() < 1e-5
    sub = subdivide(x)
    assert torch.equal(sub.coords[8 * 3 + 5, 1:], 2 * coords[3, 1:] + torch.tensor([1, 0, 1], dtype=torch.int32))


# ---- Gaussian PLY export ---------------------------------------------------------------------


def read_binary_ply(path: Path) -> tuple[list[str], np.ndarray]:
    """Property names and the float32 vertex table of a binary little-endian PLY (float properties only)."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[0] == "ply" and header[1] == "format binary_little_endian 1.0"
    count = int(next(line for line in header if line.startswith("element vertex")).split()[-1])
    names = []
    for line in header:
        if line.startswith("property"):
            _, kind, name = line.split()
            assert kind == "float"
            names.append(name)
    table = np.frombuffer(data[end:], dtype="<f4")
    assert table.size == count * len(names)
    return names, table.reshape(count, len(names))


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    w, x, y, z = F.normalize(q, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*q.shape[:-1], 3, 3)


def random_gaussians(n: int = 50) -> Gaussians:
    g = torch.Generator().manual_seed(7)
    return Gaussians(
        _xyz=torch.rand(n, 3, generator=g),
        _features_dc=torch.randn(n, 1, 3, generator=g),
        _scaling=torch.randn(n, 3, generator=g),
        _rotation=torch.randn(n, 4, generator=g),
        _opacity=torch.randn(n, 1, generator=g) * 3,
        min_kernel_size=0.0009,
        scaling_bias=0.004,
        opacity_bias=0.1,
        scaling_activation="softplus",
    )


EXPECTED_PLY_PROPERTIES = [
    "x",
    "y",
    "z",
    "nx",
    "ny",
    "nz",
    "f_dc_0",
    "f_dc_1",
    "f_dc_2",
    "opacity",
    "scale_0",
    "scale_1",
    "scale_2",
    "rot_0",
    "rot_1",
    "rot_2",
    "rot_3",
]


def test_save_ply_round_trip(tmp_path: Path) -> None:
    gaussians = random_gaussians()
    path = tmp_path / "splat.ply"
    gaussians.save_ply(path)
    names, table = read_binary_ply(path)
    assert names == EXPECTED_PLY_PROPERTIES
    col = {name: torch.from_numpy(table[:, i].copy()).double() for i, name in enumerate(names)}
    turn = torch.tensor(Y_UP_TO_Z_UP, dtype=torch.float64)

    xyz = torch.stack([col["x"], col["y"], col["z"]], dim=1)
    assert torch.allclose(xyz, gaussians.get_xyz.double() @ turn.T, atol=1e-6)
    assert torch.allclose(xyz[:, 1], -gaussians.get_xyz[:, 2].double(), atol=1e-6)  # y-up -> z-up
    assert all((col[n] == 0).all() for n in ("nx", "ny", "nz"))
    f_dc = torch.stack([col[f"f_dc_{i}"] for i in range(3)], dim=1)
    assert torch.allclose(f_dc, gaussians._features_dc[:, 0].double(), atol=1e-6)
    assert torch.allclose(torch.sigmoid(col["opacity"]), gaussians.get_opacity[:, 0].double(), atol=1e-6)
    scale = torch.stack([col[f"scale_{i}"] for i in range(3)], dim=1)
    assert torch.allclose(scale.exp(), gaussians.get_scaling.double(), rtol=1e-5)

    rot = torch.stack([col[f"rot_{i}"] for i in range(4)], dim=1)
    assert torch.allclose(rot.norm(dim=1), torch.ones(len(gaussians), dtype=torch.float64), atol=1e-6)
    assert (rot.gather(1, rot.abs().argmax(dim=1, keepdim=True)) > 0).all()
    expected_rot = turn @ quaternion_to_matrix(gaussians.get_rotation.double())
    assert torch.allclose(quaternion_to_matrix(rot), expected_rot, atol=1e-5)


def test_save_ply_without_transform_writes_raw_frame(tmp_path: Path) -> None:
    gaussians = random_gaussians(8)
    gaussians.save_ply(tmp_path / "raw.ply", transform=None)
    names, table = read_binary_ply(tmp_path / "raw.ply")
    assert names == EXPECTED_PLY_PROPERTIES
    assert np.allclose(table[:, 0:3], gaussians.get_xyz.numpy(), atol=1e-7)
    rotation = (gaussians._rotation + torch.tensor([1.0, 0, 0, 0])).numpy()
    assert np.allclose(table[:, 13:17], rotation, atol=1e-7)

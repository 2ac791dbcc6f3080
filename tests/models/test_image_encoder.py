"""Tests for amodal3r.models.image_encoder (DINOv2 ViT-L/14 reg4 through timm)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import golden_case, golden_dir
from PIL import Image

from amodal3r.models.image_encoder import (
    DinoV2Config,
    DinoV2Encoder,
    from_hub_state_dict,
    load_hub_checkpoint,
)


def _tol(expected: torch.Tensor) -> float:
    return 1e-4 * (1.0 + expected.abs().max().item())


@pytest.fixture(scope="module")
def golden_encoder():
    d = golden_case("dinov2")
    config = DinoV2Config.from_json(d / "config.json")
    return DinoV2Encoder.from_checkpoint(d / "dinov2_hub_format.safetensors", config)


@pytest.mark.parametrize("case", ["dinov2"])
def test_golden_dinov2(case, golden_encoder):
    from safetensors.torch import load_file

    d = golden_case(case)
    io = load_file(str(d / "io.safetensors"))
    model = golden_encoder
    with torch.no_grad():
        x_prenorm = model.forward_prenorm(io["image"])
        tokens = torch.nn.functional.layer_norm(x_prenorm, x_prenorm.shape[-1:], eps=1e-5)
    assert x_prenorm.shape == io["x_prenorm"].shape == (1, 1374, model.config.embed_dim)
    err_pre = (x_prenorm - io["x_prenorm"]).abs().max().item()
    err_tok = (tokens - io["tokens"]).abs().max().item()
    assert err_pre <= _tol(io["x_prenorm"]), err_pre
    assert err_tok <= _tol(io["tokens"]), err_tok
    # observed ~4e-7 / ~7e-7 (float32 rounding of the matmuls); a real layout or
    # architecture slip gives >1e-3, so keep a much tighter guard as well
    assert err_pre <= 1e-5 and err_tok <= 1e-5, (err_pre, err_tok)


def test_golden_dinov2_from_pixels(golden_encoder):
    """Full path from [0,1] pixels: the case's picture resized with LANCZOS and ImageNet-normalised;
    forward() must do that normalisation itself."""
    from safetensors.torch import load_file

    d = golden_case("dinov2")
    source = json.loads((d / "config.json").read_text()).get("source_image")
    if source is None:
        pytest.skip("this golden dinov2 case does not name its source picture (config.json: source_image)")
    io = load_file(str(d / "io.safetensors"))
    model = golden_encoder
    png = golden_dir() / source
    img = Image.open(png).convert("RGB").resize((518, 518), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(img).astype(np.float32) / 255).permute(2, 0, 1)[None]
    assert torch.equal(model.normalize(pixels), io["image"])
    with torch.no_grad():
        tok2, pre2 = model(pixels, return_prenorm=True)
    assert (tok2 - io["tokens"]).abs().max().item() <= _tol(io["tokens"])
    assert (pre2 - io["x_prenorm"]).abs().max().item() <= _tol(io["x_prenorm"])


@pytest.mark.parametrize("case", ["dinov2"])
def test_golden_dinov2_checkpoint_loaders(case, golden_encoder, tmp_path):
    """The .pth (torch.save of the hub dict) and timm-safetensors paths load the same weights."""
    from safetensors.torch import save_file

    d = golden_case(case)
    hub_sd = load_hub_checkpoint(d / "dinov2_hub_format.safetensors")
    pth = tmp_path / "dinov2_vitl14_reg4_pretrain.pth"
    torch.save(hub_sd, pth)
    timm_file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in from_hub_state_dict(hub_sd).items()}, str(timm_file))

    expected = golden_encoder.vit.state_dict()
    for model in (
        DinoV2Encoder.from_checkpoint(pth, golden_encoder.config),
        DinoV2Encoder.from_checkpoint(timm_file, golden_encoder.config),
    ):
        assert not model.training
        got = model.vit.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        assert torch.equal(model.pixel_std.flatten(), torch.tensor([0.229, 0.224, 0.225]))


def test_hub_conversion_round_trip():
    g = torch.Generator().manual_seed(0)
    model = DinoV2Encoder(DinoV2Config.tiny())
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    hub = model.hub_state_dict()
    assert "mask_token" in hub and "register_tokens" in hub and "reg_token" not in hub
    assert hub["pos_embed"].shape == (1, 1370, 64)
    back = from_hub_state_dict(hub)
    own = model.vit.state_dict()
    assert back.keys() == own.keys()
    assert all(torch.equal(back[k], own[k]) for k in own)


def test_conversion_folds_class_position():
    c = 8
    hub = {
        "cls_token": torch.full((1, 1, c), 1.0),
        "pos_embed": torch.arange(1370 * c, dtype=torch.float32).reshape(1, 1370, c),
        "register_tokens": torch.zeros(1, 4, c),
        "mask_token": torch.zeros(1, c),
        "blocks.0.mlp.w12.weight": torch.zeros(2, c),
    }
    out = from_hub_state_dict(hub)
    assert "mask_token" not in out and "register_tokens" not in out
    assert torch.equal(out["cls_token"], 1.0 + hub["pos_embed"][:, :1])
    assert torch.equal(out["pos_embed"], hub["pos_embed"][:, 1:])
    assert "blocks.0.mlp.fc1.weight" in out
    assert "pos_embed" in hub and "mask_token" in hub  # input untouched


@pytest.mark.parametrize("case", ["manifests"])
def test_golden_dinov2_manifest_keys(case):
    """Full-size ViT-L/14 reg4 built on the meta device covers the hub checkpoint's keys."""
    d = golden_case(case)
    manifest = json.loads((d / "dinov2_vitl14_reg4.json").read_text())
    manifest = manifest.get("state_dict", manifest)
    expected = {k: tuple(v[0]) for k, v in manifest.items()}

    model = DinoV2Encoder(DinoV2Config.vitl14_reg4(), device="meta")
    assert model.vit.pos_embed.is_meta
    hub = model.hub_state_dict()
    assert {k: tuple(v.shape) for k, v in hub.items()} == expected

    # and the other way: the manifest converted to timm layout loads strictly
    fake = {k: torch.empty(s, device="meta") for k, s in expected.items()}
    converted = from_hub_state_dict(fake)
    own = model.vit.state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in own.items()}
    model.load_timm_state_dict(from_hub_state_dict(fake), source="manifest", assign=True)


def test_strict_load_error_names_file_and_keys():
    model = DinoV2Encoder(DinoV2Config.tiny(), device="meta")
    hub = model.hub_state_dict()
    del hub["blocks.1.mlp.fc2.bias"]
    hub["blocks.7.extra.weight"] = torch.empty(3, device="meta")
    hub["norm.weight"] = torch.empty(65, device="meta")
    with pytest.raises(ValueError) as info:
        model.load_timm_state_dict(from_hub_state_dict(hub), source="/models/wrong.pth")
    msg = str(info.value)
    assert "/models/wrong.pth" in msg
    assert "missing keys: blocks.1.mlp.fc2.bias" in msg
    assert "unexpected keys: blocks.7.extra.weight" in msg
    assert "wrong shapes: norm.weight (65,) != (64,)" in msg


def test_load_hub_checkpoint_rejects_non_state_dict(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="bad.pth.*plain state dict"):
        load_hub_checkpoint(path)


def test_forward_shapes_and_bad_input():
    model = DinoV2Encoder(DinoV2Config.tiny()).eval()
    with torch.no_grad():
        tokens, pre = model(torch.rand(2, 3, 518, 518), return_prenorm=True)
    assert tokens.shape == pre.shape == (2, 1374, 64)
    # non-affine layer norm: zero mean, unit variance per token
    assert tokens.mean(-1).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 518, 518\]"):
        model(torch.rand(1, 3, 224, 224))

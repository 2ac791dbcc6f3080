"""Tests for amodal3r.pipelines.conditioning: grey mask format, preprocessing, patch ratios, cond."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import golden_case
from PIL import Image

from amodal3r.api import masks as M
from amodal3r.modules import condition_tokens as T
from amodal3r.pipelines import conditioning as C

# --------------------------------------------------------------------------- golden


@pytest.mark.parametrize("case", ["mask_preproc"])
def test_golden_mask_preproc(case):
    from safetensors.numpy import load_file

    d = golden_case(case)
    io = load_file(str(d / "io.safetensors"))
    image = Image.open(d / "input.png")
    grey = Image.open(d / "input_mask.png").convert("L")

    view = C.preprocess_grey(image, grey)

    np.testing.assert_array_equal(view.mask_combined, io["mask_combined_u8"] == 1)
    np.testing.assert_array_equal(view.mask_occ, io["mask_occ_u8"] == 1)
    assert view.vis_ratio.dtype == np.float32 and view.vis_ratio.shape == (T.NUM_PATCHES,)
    assert view.occ_ratio.dtype == np.float32 and view.occ_ratio.shape == (T.NUM_PATCHES,)
    np.testing.assert_array_equal(view.vis_ratio, io["vis_ratio"])
    np.testing.assert_array_equal(view.occ_ratio, io["occ_ratio"])
    assert view.image_518.dtype == np.uint8 and view.image_518.shape == (518, 518, 3)
    diff = np.abs(view.image_518.astype(np.int16) - io["image_u8"].astype(np.int16))
    assert diff.max() <= 1, f"image differs by up to {diff.max()}/255"
    # PIL's LANCZOS is deterministic: expect bitwise equality
    np.testing.assert_array_equal(view.image_518, io["image_u8"])

    # The boolean-mask entry point gives the same result from the decoded masks.
    target, occluder = M.grey_to_masks(grey)
    view2 = C.preprocess_view(image, target, occluder)
    np.testing.assert_array_equal(view2.image_518, view.image_518)
    np.testing.assert_array_equal(view2.vis_ratio, view.vis_ratio)
    np.testing.assert_array_equal(view2.occ_ratio, view.occ_ratio)

    # the float image fed to the encoder is exactly u8 / 255, CHW
    t = C.image_to_tensor(view.image_518)
    assert t.shape == (3, 518, 518) and t.dtype == torch.float32
    assert torch.equal(t, torch.from_numpy(io["image_u8"]).permute(2, 0, 1).float() / 255)


# --------------------------------------------------------------------------- grey format


def test_grey_round_trip():
    rng = np.random.default_rng(0)
    target = rng.random((23, 31)) < 0.4
    occluder = (rng.random((23, 31)) < 0.3) & ~target
    grey = M.masks_to_grey(target, occluder)
    assert grey.dtype == np.uint8
    assert set(np.unique(grey)) <= {0, 188, 255}
    assert (grey[target] == M.GREY_TARGET).all()
    assert (grey[occluder] == M.GREY_OCCLUDER).all()
    assert (grey[~target & ~occluder] == M.GREY_BACKGROUND).all()
    t2, o2 = M.grey_to_masks(grey)
    np.testing.assert_array_equal(t2, target)
    np.testing.assert_array_equal(o2, occluder)
    np.testing.assert_array_equal(M.masks_to_grey(t2, o2), grey)
    # PIL input works too
    t3, o3 = M.grey_to_masks(Image.fromarray(grey))
    np.testing.assert_array_equal(t3, target)
    np.testing.assert_array_equal(o3, occluder)


def test_grey_thresholds_and_overlap():
    grey = np.array([[0, 126, 127, 188, 230, 231, 255]], dtype=np.uint8)
    t, o = M.grey_to_masks(grey)
    np.testing.assert_array_equal(o, [[1, 1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(t, [[0, 0, 1, 1, 1, 0, 0]])
    # occluder wins where both are set; missing occluder means none
    both = np.ones((2, 2), bool)
    assert (M.masks_to_grey(both, both) == 0).all()
    assert (M.masks_to_grey(both) == 188).all()


def test_dilate_cross():
    m = np.zeros((5, 5), bool)
    m[2, 2] = True
    expected = np.zeros((5, 5), bool)
    expected[2, 1:4] = True
    expected[1:4, 2] = True
    np.testing.assert_array_equal(C.dilate_cross(m), expected)
    corner = np.zeros((3, 3), bool)
    corner[0, 0] = True
    np.testing.assert_array_equal(C.dilate_cross(corner), [[1, 1, 0], [1, 0, 0], [0, 0, 0]])


def test_patch_ratios_simple():
    # 518x518 input: nearest resize is the identity, ratios are plain patch means
    m = np.zeros((518, 518), bool)
    m[:14, :14] = True  # patch 0 full
    m[14:21, 14:28] = True  # patch (1,1) half
    m[0, 14] = True  # patch (0,1) one pixel
    r = C.patch_ratios(m)
    assert r.shape == (1369,) and r.dtype == np.float32
    assert r[0] == 1.0
    assert r[37 * 1 + 1] == np.float32(0.5)
    assert r[1] == np.float32(1) / np.float32(196)
    assert r.sum() == pytest.approx(1 + 0.5 + 1 / 196)


# --------------------------------------------------------------------------- preprocess_view


def _toy_view(h=40, w=50):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    target = np.zeros((h, w), bool)
    target[10:30, 10:35] = True
    occluder = np.zeros((h, w), bool)
    occluder[15:25, 30:45] = True
    return image, target, occluder


def test_preprocess_view_semantics():
    image, target, occluder = _toy_view()
    view = C.preprocess_view(image, target, occluder)
    occ_d = C.dilate_cross(occluder)
    np.testing.assert_array_equal(view.mask_occ, occ_d)
    np.testing.assert_array_equal(view.mask_combined, occ_d | ~target)
    assert view.image_518.shape == (518, 518, 3)
    assert np.all((view.vis_ratio >= 0) & (view.vis_ratio <= 1))
    assert view.vis_ratio.max() == 1.0 and view.occ_ratio.max() == 1.0
    # no occluder: occ_ratio all zero
    v2 = C.preprocess_view(image, target, None)
    assert not v2.occ_ratio.any()
    # RGBA input is handled as its RGB channels
    rgba = image.convert("RGBA")
    np.testing.assert_array_equal(C.preprocess_view(rgba, target, occluder).image_518, view.image_518)


def test_preprocess_view_empty_target():
    image, target, occluder = _toy_view()
    with pytest.raises(ValueError, match="target mask is empty"):
        C.preprocess_view(image, np.zeros_like(target), occluder)
    # grey path: everything background
    with pytest.raises(ValueError, match="target mask is empty"):
        C.preprocess_grey(image, np.full(target.shape, 255, np.uint8))


def test_preprocess_view_size_mismatch():
    image, target, occluder = _toy_view()
    with pytest.raises(ValueError, match=r"target mask has shape .*resize"):
        C.preprocess_view(image, target[:, :-1], occluder)
    with pytest.raises(ValueError, match=r"occluder mask has shape"):
        C.preprocess_view(image, target, occluder[:-1])
    with pytest.raises(ValueError, match=r"does not match image size .*nearest"):
        C.preprocess_grey(image, M.masks_to_grey(target)[:-2])
    with pytest.raises(ValueError, match=r"2-D array"):
        C.preprocess_view(image, np.stack([target] * 3, -1), occluder)


# --------------------------------------------------------------------------- cond


def test_assemble_cond_layout():
    b, c = 2, 16
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(b, T.NUM_IMAGE_TOKENS, c, generator=g)
    vis = torch.rand(b, T.NUM_PATCHES, generator=g)
    occ = torch.rand(b, T.NUM_PATCHES, generator=g)
    cond = C.assemble_cond(tokens, vis, occ)
    assert cond.shape == (b, T.NUM_COND_TOKENS, c) == (b, 4112, c)
    ref = torch.cat([tokens, vis[..., None].repeat(1, 1, c), occ[..., None].repeat(1, 1, c)], dim=1)
    assert torch.equal(cond, ref)
    assert torch.equal(cond[:, 1374:2743, 0], vis)
    assert torch.equal(cond[:, 2743:4112, c - 1], occ)
    assert T.PATCH_GRID == 37 and T.NUM_IMAGE_TOKENS == 1374


@pytest.mark.parametrize("case", ["cond"])
def test_golden_cond(case):
    """The golden `cond/` case: assembling as specified reproduces the stored checksum."""
    import json

    from safetensors.torch import load_file

    d = golden_case(case)

    data = load_file(str(d / "cond.safetensors"))
    cond = C.assemble_cond(data["tokens_i8"].float() / 32, data["vis_ratio"], data["occ_ratio"])
    meta = json.loads((d / "cond.json").read_text())
    assert list(cond.shape) == meta["cond_shape"] and cond.shape[1] == T.NUM_COND_TOKENS
    assert cond.double().sum().item() == pytest.approx(meta["cond_sum_f64"], rel=1e-12)


def test_assemble_cond_bad_shapes():
    tokens = torch.zeros(1, T.NUM_IMAGE_TOKENS, 8)
    ok = torch.zeros(1, T.NUM_PATCHES)
    with pytest.raises(ValueError, match="tokens must be"):
        C.assemble_cond(tokens[:, :-1], ok, ok)
    with pytest.raises(ValueError, match="vis_ratio must be"):
        C.assemble_cond(tokens, torch.zeros(2, T.NUM_PATCHES), ok)
    with pytest.raises(ValueError, match="occ_ratio must be"):
        C.assemble_cond(tokens, ok, torch.zeros(T.NUM_PATCHES))


# --------------------------------------------------------------------------- crop


def test_crop_square():
    image, target, occluder = _toy_view(h=40, w=50)
    crop = C.crop_square(image, target, occluder, margin=0.1)
    left, top, side = crop.box
    # union bbox: rows 10..29, cols 10..44 -> 35 wide -> side round(35 * 1.2) = 42
    assert side == 42
    assert crop.image.size == (side, side)
    assert crop.target.shape == crop.occluder.shape == (side, side)
    assert crop.target.sum() == target.sum() and crop.occluder.sum() == occluder.sum()
    # content is the same pixels at the shifted location
    src = np.asarray(image)
    out = np.asarray(crop.image)
    ys, xs = np.nonzero(target)
    np.testing.assert_array_equal(out[ys - top, xs - left], src[ys, xs])
    # the crop feeds straight into preprocessing
    view = C.preprocess_view(crop.image, crop.target, crop.occluder)
    assert view.image_518.shape == (518, 518, 3)


def test_crop_square_pads_outside():
    image = Image.new("RGB", (20, 10), (200, 100, 50))
    target = np.zeros((10, 20), bool)
    target[0:10, 0:4] = True  # touches top, bottom and left borders
    crop = C.crop_square(image, target, None, margin=0.5)
    left, top, side = crop.box
    assert side == 20 and left < 0 and top < 0
    out = np.asarray(crop.image)
    assert (out[:-top] == 0).all()  # padded rows above the image are black
    assert crop.target.sum() == target.sum()
    assert crop.occluder is None
    with pytest.raises(ValueError, match="target mask is empty"):
        C.crop_square(image, np.zeros_like(target))

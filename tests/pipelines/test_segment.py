"""Click-to-mask on a random SAM ViT-B in the official checkpoint format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from amodal3r.api.errors import CheckpointError, InputError
from amodal3r.pipelines.segment import Segmenter, attention_with_folded_bias, load_sam, write_random_sam

HEIGHT, WIDTH = 48, 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_sam(tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth", kind="vit_b", seed=3)


@pytest.fixture(scope="module")
def segmenter(checkpoint: Path) -> Segmenter:
    """Keeps one embedding: encoding takes ~20 s on two cores, so the tests encode as little as they can."""
    return Segmenter("vit_b", checkpoint, cached_images=1)  # "auto": the CPU here


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> SamPredictor:
    """segment-anything's own predictor, set on ``picture(0)``: the answers to match."""
    predictor = SamPredictor(load_sam("vit_b", checkpoint, "cpu"))
    with torch.inference_mode():
        predictor.set_image(picture(0))
    return predictor


def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def test_the_checkpoint_loads_exactly(checkpoint: Path) -> None:
    saved = torch.load(checkpoint, weights_only=True)
    model = load_sam("vit_b", checkpoint, "cpu")
    loaded = model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_bad_checkpoints_are_named(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_sam("vit_b", tmp_path / "missing.pth", "cpu")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="download it again"):
        load_sam("vit_b", tmp_path / "junk.pth", "cpu")
    partial = dict(list(torch.load(checkpoint, weights_only=True).items())[:10])
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="does not fit the SAM vit_b"):
        load_sam("vit_b", tmp_path / "partial.pth", "cpu")
    with pytest.raises(InputError, match="vit_h, vit_l, vit_b"):
        Segmenter("vit_x", checkpoint)


@pytest.mark.parametrize("size", [(64, 64), (14, 14), (9, 12)])
def test_folded_bias_attention_matches_segment_anything(size: tuple[int, int]) -> None:
    """Global (64x64) and windowed (14x14) blocks, and a non-square grid, with a non-zero bias."""
    from segment_anything.modeling.image_encoder import Attention

    torch.manual_seed(0)
    height, width = size
    module = Attention(96, num_heads=3, use_rel_pos=True, input_size=size).eval()
    with torch.no_grad():
        module.rel_pos_h.normal_(0, 0.5)
        module.rel_pos_w.normal_(0, 0.5)
        x = torch.randn(2, height, width, 96)
        expected = Attention.forward(module, x)
        torch.testing.assert_close(attention_with_folded_bias(module, x), expected, rtol=1e-5, atol=1e-5)
        module.use_rel_pos = False
        torch.testing.assert_close(
            attention_with_folded_bias(module, x), Attention.forward(module, x), rtol=1e-5, atol=1e-5
        )


def test_cached_embedding_gives_the_same_mask_as_a_fresh_model(segmenter: Segmenter, reference: SamPredictor) -> None:
    """The decoder-only path, with our SDPA attention in the encoder, answers as segment-anything's own
    predictor does."""
    image = picture(0)
    clicks, labels = [(20.0, 30.0), (50.0, 10.0)], [1, 0]
    first = segmenter.segment(image, clicks[:1], labels[:1], image_key="a")
    second = segmenter.segment(image, clicks, labels, image_key="a")
    assert not first.embedding_cached and second.embedding_cached
    assert second.seconds < first.seconds
    assert first.mask.shape == second.mask.shape == (HEIGHT, WIDTH) and second.mask.dtype == bool

    with torch.inference_mode():
        masks, scores, _ = reference.predict(np.asarray(clicks, np.float32), np.asarray(labels), multimask_output=False)
    np.testing.assert_array_equal(second.mask, masks[0])
    assert second.score == pytest.approx(float(scores[0]), abs=1e-5)


def test_a_single_click_picks_the_best_of_three_masks(segmenter: Segmenter, reference: SamPredictor) -> None:
    result = segmenter.segment(picture(0), [(10.0, 5.0)], [1], image_key="a")
    with torch.inference_mode():
        masks, scores, _ = reference.predict(np.asarray([[10.0, 5.0]], np.float32), np.asarray([1]))
    assert len(scores) == 3
    assert result.score == pytest.approx(float(scores.max()), abs=1e-5)
    np.testing.assert_array_equal(result.mask, masks[int(np.argmax(scores))])


def test_old_embeddings_are_dropped(segmenter: Segmenter) -> None:
    """Only the most recent images stay; a box alone is a valid prompt."""
    box = (4.0, 4.0, 40.0, 30.0)
    segmenter.segment(picture(0), [(1.0, 1.0)], [1], image_key="a")
    assert not segmenter.segment(picture(1), [], [], box=box, image_key="b").embedding_cached
    assert segmenter.cached_images == ["b"]
    assert segmenter.segment(picture(1), [], [], box=box, image_key="b").embedding_cached


@pytest.mark.parametrize(
    ("rgb", "points", "labels", "box", "message"),
    [
        (np.zeros((HEIGHT, WIDTH), np.uint8), [(1.0, 1.0)], [1], None, "8-bit RGB"),
        (np.zeros((HEIGHT, WIDTH, 3), np.uint8), [], [], None, "at least one click"),
        (np.zeros((HEIGHT, WIDTH, 3), np.uint8), [(1.0, 1.0)], [], None, "one label per click"),
        (np.zeros((HEIGHT, WIDTH, 3), np.uint8), [(WIDTH + 1.0, 1.0)], [1], None, "outside the 64x48 image"),
        (np.zeros((HEIGHT, WIDTH, 3), np.uint8), [], [], (10.0, 10.0, 5.0, 20.0), "is empty"),
        (np.zeros((HEIGHT, WIDTH, 3), np.uint8), [], [], (100.0, 100.0, 120.0, 120.0), "outside"),
    ],
)
def test_bad_prompts_are_named_before_any_work(rgb, points, labels, box, message, checkpoint: Path) -> None:
    fresh = Segmenter("vit_b", checkpoint)
    with pytest.raises(InputError, match=message):
        fresh.segment(rgb, points, labels, box)
    assert not fresh.loaded

"""Click-to-mask with Segment Anything: one model per kind, image embeddings cached per image.

The image encoder is the expensive part (seconds on a CPU); the prompt encoder and mask decoder
take milliseconds. So the embedding of each recent image is kept, and every further click on the
same image only runs the decoder.
"""

from __future__ import annotations

import threading
import time
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from amodal3r.api.errors import CheckpointError, InputError
from amodal3r.api.protocol import SAM_KINDS
from amodal3r.modules.matmul import attention, route_linears

from .devices import pick_device

CACHED_IMAGES = 4


@dataclass
class SegmentResult:
    mask: np.ndarray  # bool, H x W of the image
    score: float  # the model's own estimate of the mask's IoU
    embedding_cached: bool
    seconds: float


@dataclass
class _Embedding:
    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def build_sam(kind: str):
    """An untrained model of one of the official architectures."""
    from segment_anything import sam_model_registry

    if kind not in SAM_KINDS:
        raise InputError(f"unknown SAM model {kind!r}: use one of {', '.join(SAM_KINDS)}")
    return sam_model_registry[kind](checkpoint=None)


def load_sam(kind: str, checkpoint: Path, device: str = "auto"):
    """The official ``sam_vit_*.pth`` files are plain state dicts; load them without running pickled code."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"SAM checkpoint {checkpoint} does not exist: download it or fix the path")
    model = build_sam(kind)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{checkpoint} is not a readable SAM checkpoint ({error}): download it again") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise CheckpointError(
            f"{checkpoint.name} does not fit the SAM {kind} architecture: "
            f"is it the checkpoint of another kind ({', '.join(SAM_KINDS)})?"
        ) from None
    return model.to(pick_device(device)).eval()


def attention_with_folded_bias(self, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's image-encoder attention through SDPA, for any ``Attention`` module as ``self``.

    The original adds a decomposed relative-position bias to the full attention matrix: 4096 x 4096
    per head in the global blocks, about 0.8 GB for ViT-B. The bias of query q and key (row r,
    column c) is ``rel_h[q, r] + rel_w[q, c]``, which is the dot product of ``[rel_h[q] | rel_w[q]]``
    with the one-hot code of (r, c). Appending those channels to q and k gives the same scores, so
    SDPA never materialises the matrix.
    """
    from segment_anything.modeling.image_encoder import get_rel_pos

    batch, height, width, _ = x.shape
    heads, tokens = self.num_heads, height * width
    q, k, v = self.qkv(x).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    scale = None
    if self.use_rel_pos:
        grid = q.reshape(batch, heads, height, width, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, get_rel_pos(height, height, self.rel_pos_h))
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, get_rel_pos(width, width, self.rel_pos_w))
        index = torch.arange(tokens, device=x.device)
        codes = torch.cat([F.one_hot(index // width, height), F.one_hot(index % width, width)], -1).to(q.dtype)
        q = torch.cat(
            [q * self.scale, rel_h.reshape(batch, heads, tokens, height), rel_w.reshape(batch, heads, tokens, width)],
            -1,
        )
        k = torch.cat([k, codes.expand(batch, heads, tokens, height + width)], -1)
        scale = 1.0
    # Equal head sizes keep SDPA on its fused kernels (on the CPU, unequal ones fall back to the matrix).
    channels = v.shape[-1]
    out = attention(q, k, F.pad(v, (0, q.shape[-1] - channels)), scale=scale)[..., :channels]
    return self.proj(out.transpose(1, 2).reshape(batch, height, width, -1))


def fold_attention_bias(model) -> None:
    """Route every attention of the SAM image encoder through ``attention_with_folded_bias``."""
    from segment_anything.modeling.image_encoder import Attention

    for module in model.image_encoder.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(attention_with_folded_bias, module)


def write_random_sam(path: Path, kind: str = "vit_b", seed: int = 0) -> Path:
    """A seeded random checkpoint in the official format, for tests and benches."""
    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_sam(kind).state_dict(), path)
    return path


class Segmenter:
    """One SAM model, loaded on first use; calls are serialised because the predictor holds state."""

    def __init__(self, kind: str, checkpoint: Path, device: str = "auto", cached_images: int = CACHED_IMAGES):
        if kind not in SAM_KINDS:
            raise InputError(f"unknown SAM model {kind!r}: use one of {', '.join(SAM_KINDS)}")
        self.kind, self.checkpoint, self.device = kind, Path(checkpoint), device
        self._predictor = None
        self._embeddings: OrderedDict[str, _Embedding] = OrderedDict()
        self._cache_size = max(1, cached_images)
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._predictor is not None

    @property
    def cached_images(self) -> list[str]:
        """Keys of the images whose embeddings are kept, oldest first."""
        return list(self._embeddings)

    def unload(self) -> None:
        with self._lock:
            self._predictor = None
            self._embeddings.clear()

    def segment(
        self,
        rgb: np.ndarray,
        points: list[tuple[float, float]],
        labels: list[int],
        box: tuple[float, float, float, float] | None = None,
        image_key: str | None = None,
    ) -> SegmentResult:
        """The best mask for clicks (label 1 adds, 0 removes) and an optional box, in pixel coordinates."""
        _check_prompt(rgb, points, labels, box)
        start = time.perf_counter()
        with self._lock, torch.inference_mode():
            predictor = self._load()
            cached = self._set_image(predictor, rgb, image_key)
            masks, scores, _ = predictor.predict(
                point_coords=np.asarray(points, np.float32) if points else None,
                point_labels=np.asarray(labels, np.int64) if points else None,
                box=np.asarray(box, np.float32) if box is not None else None,
                multimask_output=len(points) == 1 and box is None,
            )
        best = int(np.argmax(scores))
        return SegmentResult(masks[best].astype(bool), float(scores[best]), cached, time.perf_counter() - start)

    def _load(self):
        if self._predictor is None:
            from segment_anything import SamPredictor

            model = route_linears(load_sam(self.kind, self.checkpoint, self.device))
            fold_attention_bias(model)
            self._predictor = SamPredictor(model)
        return self._predictor

    def _set_image(self, predictor, rgb: np.ndarray, image_key: str | None) -> bool:
        """Restore a kept embedding (True) or encode the image and keep its embedding (False)."""
        kept = self._embeddings.get(image_key) if image_key is not None else None
        if kept is not None:
            self._embeddings.move_to_end(image_key)
            predictor.features, predictor.original_size, predictor.input_size = (
                kept.features,
                kept.original_size,
                kept.input_size,
            )
            predictor.is_image_set = True
            return True
        predictor.set_image(np.ascontiguousarray(rgb, dtype=np.uint8), image_format="RGB")
        if image_key is not None:
            self._embeddings[image_key] = _Embedding(
                predictor.features, tuple(predictor.original_size), tuple(predictor.input_size)
            )
            while len(self._embeddings) > self._cache_size:
                self._embeddings.popitem(last=False)
        return False


def _check_prompt(
    rgb: np.ndarray, points: list[tuple[float, float]], labels: list[int], box: tuple[float, float, float, float] | None
) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InputError(f"the image must be 8-bit RGB, got an array of shape {rgb.shape} and {rgb.dtype}")
    height, width = rgb.shape[:2]
    if not points and box is None:
        raise InputError("give at least one click or a box")
    if len(points) != len(labels):
        raise InputError(f"{len(points)} clicks but {len(labels)} labels: give one label per click")
    for x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            raise InputError(f"click ({x:g}, {y:g}) lies outside the {width}x{height} image")
    if box is not None:
        x0, y0, x1, y1 = box
        if not (x0 < x1 and y0 < y1):
            raise InputError(f"box {list(box)} is empty: give x0 < x1 and y0 < y1")
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise InputError(f"box {list(box)} lies outside the {width}x{height} image")

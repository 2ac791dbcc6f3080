"""A minimal sparse voxel tensor: features on integer coordinates, batch elements contiguous.

Derived tensors (``replace``) share one ``cache`` dict with their parent, so that neighbour maps,
downsample maps and attention layouts are computed once per coordinate set and reused by every
layer and every sampler step that sees the same coordinates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def batch_layout(batch_index: torch.Tensor, batch_size: int) -> list[slice]:
    """Row ranges of each batch element; rows must already be grouped by batch index."""
    counts = torch.bincount(batch_index.long(), minlength=batch_size).tolist()
    layout, start = [], 0
    for count in counts:
        layout.append(slice(start, start + count))
        start += count
    return layout


def repeated_coordinates(
    coords: torch.Tensor, batch_size: int, layout: list[slice], cache: dict, n: int
) -> tuple[torch.Tensor, list[slice], dict]:
    """Coordinates, layout and cache of ``n`` copies of a batch, kept in ``cache``. A coarse set
    (made by a downsampling, whose cache says how to upsample) repeats into one that upsamples onto
    the repeated fine set."""
    key = ("repeat_batch", n)
    if key not in cache:
        rows = coords.shape[0]
        copy = torch.arange(n, device=coords.device, dtype=coords.dtype).repeat_interleave(rows)
        repeated = coords.repeat(n, 1)
        repeated[:, 0] += copy * batch_size
        repeated_layout = [slice(s.start + j * rows, s.stop + j * rows) for j in range(n) for s in layout]
        repeated_cache: dict = {}
        for name, entry in cache.items():
            if isinstance(name, tuple) and name[0] == "upsample":
                fine_coords, fine_layout, fine_to_coarse, fine_cache = entry
                fine = repeated_coordinates(fine_coords, batch_size, fine_layout, fine_cache, n)
                to_coarse = torch.cat([fine_to_coarse + j * rows for j in range(n)])
                repeated_cache[name] = (fine[0], fine[1], to_coarse, fine[2])
        cache[key] = (repeated, repeated_layout, repeated_cache)
    return cache[key]


class SparseTensor:
    """``feats [N, ...]`` on ``coords [N, 4]`` int32 laid out ``(batch, x, y, z)``."""

    def __init__(
        self,
        feats: torch.Tensor,
        coords: torch.Tensor,
        batch_size: int | None = None,
        layout: list[slice] | None = None,
        cache: dict | None = None,
    ):
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise ValueError(f"coords must be [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
        if feats.shape[0] != coords.shape[0]:
            raise ValueError(f"feats has {feats.shape[0]} rows but coords has {coords.shape[0]}")
        self.feats = feats
        self.coords = coords.to(torch.int32).contiguous()
        if batch_size is None:
            batch_size = int(coords[:, 0].max().item()) + 1 if coords.shape[0] else 1
        self.batch_size = batch_size
        self.layout = layout if layout is not None else batch_layout(self.coords[:, 0], batch_size)
        self.cache = cache if cache is not None else {}

    # ---- construction -------------------------------------------------------------------------

    def replace(self, feats: torch.Tensor) -> SparseTensor:
        """Same coordinates (and cache), new features."""
        return SparseTensor(feats, self.coords, self.batch_size, self.layout, self.cache)

    @staticmethod
    def cat(tensors: list[SparseTensor]) -> SparseTensor:
        """Stack batches: the batch indices of later tensors are shifted after earlier ones."""
        coords, offset = [], 0
        for t in tensors:
            c = t.coords.clone()
            c[:, 0] += offset
            coords.append(c)
            offset += t.batch_size
        feats = torch.cat([t.feats for t in tensors])
        return SparseTensor(feats, torch.cat(coords), offset)

    def repeat_batch(self, n: int) -> SparseTensor:
        """``n`` copies of the whole batch, in order (to batch guided and unguided passes). The
        copies' coordinates and cache are kept in this tensor's cache, so that their neighbour maps
        are built once per coordinate set, not once per call."""
        if n == 1:
            return self
        coords, layout, cache = repeated_coordinates(self.coords, self.batch_size, self.layout, self.cache, n)
        feats = self.feats.repeat(n, *[1] * (self.feats.dim() - 1))
        return SparseTensor(feats, coords, self.batch_size * n, layout, cache)

    # ---- tensor-like conveniences --------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def device(self) -> torch.device:
        return self.feats.device

    def to(self, *args: Any, **kwargs: Any) -> SparseTensor:
        feats = self.feats.to(*args, **kwargs)
        coords = self.coords.to(feats.device)
        if coords is self.coords:
            return self.replace(feats)
        return SparseTensor(feats, coords, self.batch_size, self.layout)

    def type(self, dtype: torch.dtype) -> SparseTensor:
        return self.replace(self.feats.type(dtype))

    def float(self) -> SparseTensor:
        return self.replace(self.feats.float())

    @property
    def row_batch(self) -> torch.Tensor:
        """Batch index of every row, as int64 (cached)."""
        key = "row_batch"
        if key not in self.cache:
            self.cache[key] = self.coords[:, 0].long()
        return self.cache[key]

    def broadcast_batch(self, per_batch: torch.Tensor) -> torch.Tensor:
        """Expand a ``[B, C]`` per-batch-element tensor to one row per voxel."""
        if self.batch_size == 1:
            return per_batch[:1].expand(self.feats.shape[0], -1)
        return per_batch.index_select(0, self.row_batch)

    def _elementwise(self, other: SparseTensor | torch.Tensor | int | float, op: Callable) -> SparseTensor:
        """A ``[B, C]`` tensor acts per batch element (adaLN shift/scale), anything else per row."""
        if isinstance(other, SparseTensor):
            other = other.feats
        elif isinstance(other, torch.Tensor) and other.dim() == 2 and other.shape[0] == self.batch_size:
            other = self.broadcast_batch(other)
        return self.replace(op(self.feats, other))

    def __add__(self, other):
        return self._elementwise(other, torch.add)

    __radd__ = __add__

    def __mul__(self, other):
        return self._elementwise(other, torch.mul)

    __rmul__ = __mul__

    def __sub__(self, other):
        return self._elementwise(other, torch.sub)

    def __neg__(self):
        return self.replace(-self.feats)

    def __repr__(self) -> str:
        return (
            f"SparseTensor(rows={self.feats.shape[0]}, feats={tuple(self.feats.shape[1:])}, "
            f"batch={self.batch_size}, dtype={self.dtype}, device={self.device})"
        )

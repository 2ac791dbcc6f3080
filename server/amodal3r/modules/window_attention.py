"""Shifted-window self-attention over sparse voxels (TRELLIS ``attn_mode="swin"``).

A voxel at ``(b, x, y, z)`` belongs to the window ``(b, (x+s)//w, (y+s)//w, (z+s)//w)`` for window
size ``w`` and shift ``s``, and attends to the voxels of its own window only. A surface rarely fills
a window, so window lengths vary. Rather than one attention call per window, windows are grouped
into a few buckets of similar length, padded to the bucket length and run as one batched
attention with the padded keys masked out. Masked keys get exactly zero weight and every window
has at least one real key, so the result is exact: padding changes nothing but the work done.

The partition depends only on the coordinates, so it is computed once per coordinate set and
kept in the :class:`~amodal3r.modules.sparse.SparseTensor` cache for every block and call that shares it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import jagged_attention, jagged_by_default, scaled_dot_product
from .sparse import SparseTensor

# Window lengths are rounded up to 8 steps per power of two: padding adds under 1/8 to any
# window (under ~27% attention work) while the number of buckets stays small (at most ~8 per octave).
STEPS_PER_OCTAVE_LOG2 = 3
# Largest attention-logit tensor (elements) built in one call; bigger buckets are split.
MAX_LOGITS_PER_CALL = 1 << 26


@dataclass
class WindowBucket:
    """Windows padded to one length: ``rows[w, i]`` is the voxel row in slot ``i`` of window ``w``."""

    rows: torch.Tensor  # [W, L] int64; padding slots repeat a real row of the same window
    key_bias: torch.Tensor | None  # [W, 1, 1, L] float32: 0 on real keys, -inf on padding; None if unpadded
    offset: int  # where this bucket's W * L slots start in the padded output buffer


@dataclass
class WindowPartition:
    buckets: list[WindowBucket]
    num_slots: int  # padded slots over all buckets
    unpad: torch.Tensor  # [N] int64: the padded-buffer slot that holds each voxel row's output
    num_windows: int
    order: torch.Tensor  # [N] int64: voxel rows window by window (for the jagged path)
    offsets: torch.Tensor  # [num_windows + 1] int64: where each window starts in ``order``


def padded_length(length: int) -> int:
    """``length`` rounded up to a multiple of ``2 ** (floor(log2(length)) - 3)`` (exact below 16)."""
    granularity = 1 << max(0, length.bit_length() - 1 - STEPS_PER_OCTAVE_LOG2)
    return -(-length // granularity) * granularity


def window_keys(coords: torch.Tensor, window_size: int, shift: int) -> torch.Tensor:
    """One int64 key per voxel, equal for voxels of the same window (batch index included)."""
    cells = (coords[:, 1:].long() + shift).div(window_size, rounding_mode="floor")
    side = int(cells.max().item()) + 1 if cells.numel() else 1
    return ((coords[:, 0].long() * side + cells[:, 0]) * side + cells[:, 1]) * side + cells[:, 2]


def window_partition(coords: torch.Tensor, window_size: int, shift: int = 0) -> WindowPartition:
    """Group the rows of ``coords [N, 4]`` into windows, and the windows into padded buckets."""
    device = coords.device
    keys = window_keys(coords, window_size, shift)
    order = torch.argsort(keys, stable=True)
    _, lengths = torch.unique_consecutive(keys[order], return_counts=True)
    starts = torch.cumsum(lengths, 0) - lengths
    padded = torch.tensor([padded_length(n) for n in lengths.tolist()], dtype=torch.long, device=device)

    buckets, offset = [], 0
    unpad = torch.empty(coords.shape[0], dtype=torch.long, device=device)
    for length in torch.unique(padded).tolist():
        member = (padded == length).nonzero().squeeze(1)
        win_start, win_len = starts[member], lengths[member]
        slot = torch.arange(length, device=device)
        real = slot[None, :] < win_len[:, None]  # [W, L]
        # Padding slots point at the window's first row: any real row of the window would do.
        rows = order[win_start[:, None] + torch.where(real, slot[None, :], 0)]
        key_bias = None
        if not bool(real.all()):
            key_bias = torch.zeros(real.shape, dtype=torch.float32, device=device)
            key_bias = key_bias.masked_fill_(~real, float("-inf"))[:, None, None, :]
        flat_real = real.reshape(-1).nonzero().squeeze(1)
        unpad[rows.reshape(-1)[flat_real]] = offset + flat_real
        buckets.append(WindowBucket(rows, key_bias, offset))
        offset += rows.numel()
    offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=device), torch.cumsum(lengths, 0)])
    return WindowPartition(buckets, offset, unpad, lengths.numel(), order, offsets)


def cached_window_partition(x: SparseTensor, window_size: int, shift: int) -> WindowPartition:
    key = ("window_partition", window_size, shift)
    if key not in x.cache:
        x.cache[key] = window_partition(x.coords, window_size, shift)
    return x.cache[key]


def windowed_self_attention(qkv: torch.Tensor, partition: WindowPartition, jagged: bool | None = None) -> torch.Tensor:
    """Softmax self-attention of packed ``qkv [N, 3, H, D]`` within each window; returns ``[N, H, D]``.
    ``jagged`` (default: on CUDA) runs all windows as one jagged call instead of padded buckets."""
    if jagged_by_default(qkv) if jagged is None else jagged:
        packed = qkv.index_select(0, partition.order)
        out = torch.empty_like(qkv[:, 0])
        out[partition.order] = jagged_attention(*packed.unbind(dim=1), partition.offsets)
        return out
    heads = qkv.shape[2]
    padded_out = qkv.new_empty(partition.num_slots, heads, qkv.shape[3])
    for bucket in partition.buckets:
        num_windows, length = bucket.rows.shape
        per_call = max(1, MAX_LOGITS_PER_CALL // (heads * length * length))
        for lo in range(0, num_windows, per_call):
            hi = min(lo + per_call, num_windows)
            q, k, v = qkv.index_select(0, bucket.rows[lo:hi].reshape(-1)).unflatten(0, (hi - lo, length)).unbind(2)
            bias = None if bucket.key_bias is None else bucket.key_bias[lo:hi].to(qkv.dtype)
            target = padded_out[bucket.offset + lo * length : bucket.offset + hi * length]
            target.unflatten(0, (hi - lo, length)).copy_(scaled_dot_product(q, k, v, bias))
    return padded_out.index_select(0, partition.unpad)

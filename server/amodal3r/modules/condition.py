"""The flow models' condition, prepared once per sampling run, and the cross-attentions to it.

A run evaluates a flow model on the same few conditions at every step: each view's, and the
unconditional all-zero one. :class:`ConditionRows` splits them once into image tokens, visibility
bias and occlusion ratios, and keeps per cross-attention layer what does not depend on the latent:

* the keys and values of each row (computed at the first step, reused by every later one);
* for a row whose tokens are all equal (the unconditional row), the attention's output itself:
  equal keys and equal values make the softmax weights sum to one whatever the query and the
  bias, so every token gets ``to_out(v)``. No query, no attention, once per run.

:class:`Condition` is one forward's batch: which row conditions each group of latents. When the
latent holds one group only (``group_size`` elements) but the condition several groups, the latent
is shared: the layers before the first cross-attention run once, then the tokens are repeated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import (
    MultiHeadAttention,
    Tokens,
    distinct_ratios,
    ratio_attention,
    scaled_dot_product,
    varlen_cross_attention,
    visibility_bias,
)
from .condition_tokens import NUM_COND_TOKENS, NUM_IMAGE_TOKENS, NUM_PATCHES, NUM_PREFIX_TOKENS
from .shortcuts import SHORTCUTS
from .sparse import SparseTensor

IMAGE, OCCLUSION = "image", "occlusion"


@dataclass
class ConditionRows:
    """The distinct conditions of a run, ``n`` rows, split once (see the module docstring)."""

    tokens: dict[str, torch.Tensor]  # part -> [n, L, C] context tokens in the model dtype
    visibility_bias: torch.Tensor | None  # [n, 1, 1, 1374] key bias of the image part (Amodal3R)
    ratios: list[tuple[torch.Tensor, torch.Tensor]] | None  # per row: distinct occlusion ratios, log counts
    uniform: dict[str, list[bool]]  # part -> per row: all tokens equal
    cache: dict = field(default_factory=dict)  # (layer, part, row) -> keys/values or constant output

    @property
    def count(self) -> int:
        return self.tokens[IMAGE].shape[0]


def uniform_rows(tokens: torch.Tensor) -> list[bool]:
    """Per row of ``[n, L, C]``: are all its ``L`` tokens equal? (Never, with the shortcut off.)"""
    if not SHORTCUTS.uniform_condition:
        return [False] * tokens.shape[0]
    return [bool(torch.equal(row, row[:1].expand_as(row))) for row in tokens]


def prepare_condition(cond: torch.Tensor, mask_as_cond: bool, dtype: torch.dtype) -> ConditionRows:
    """Rows ``cond [n, 1374 + 1369 + 1369, C]``: image tokens, visibility ratios (channel 0 is read),
    occlusion ratios (all channels, as ordinary context). Plain TRELLIS models take tokens only."""
    if not mask_as_cond:
        tokens = cond.type(dtype)
        return ConditionRows({IMAGE: tokens}, None, None, {IMAGE: uniform_rows(tokens)})
    if cond.dim() != 3 or cond.shape[1] != NUM_COND_TOKENS:
        raise ValueError(
            f"condition must be [B, {NUM_COND_TOKENS}, C] (tokens, visibility, occlusion), got {tuple(cond.shape)}"
        )
    image = cond[:, :NUM_IMAGE_TOKENS].type(dtype)
    visibility = cond[:, NUM_IMAGE_TOKENS : NUM_IMAGE_TOKENS + NUM_PATCHES, 0].type(dtype)
    occlusion = cond[:, NUM_IMAGE_TOKENS + NUM_PATCHES :]
    ratios = occlusion[..., 0]
    repeated = torch.equal(occlusion, ratios.unsqueeze(-1).expand_as(occlusion))
    return ConditionRows(
        tokens={IMAGE: image, OCCLUSION: occlusion.type(dtype)},
        visibility_bias=visibility_bias(visibility, NUM_PREFIX_TOKENS),
        ratios=[distinct_ratios(r) for r in ratios] if repeated else None,
        uniform={IMAGE: uniform_rows(image), OCCLUSION: uniform_rows(occlusion)},
    )


@dataclass
class Condition:
    """The condition of one forward: groups of ``group_size`` latent batch elements, each group
    conditioned on one row of ``rows``."""

    rows: ConditionRows
    groups: list[int]
    group_size: int = 1

    @classmethod
    def per_element(cls, rows: ConditionRows) -> Condition:
        """Element ``i`` of the batch conditioned on row ``i``: the plain ``model(x, t, cond)`` call."""
        return cls(rows, list(range(rows.count)))

    @property
    def batch(self) -> int:
        return len(self.groups) * self.group_size

    def repeats_for(self, x: Tokens) -> int:
        """How many times the latent's batch must be repeated to match this condition's batch."""
        batch = x.batch_size if isinstance(x, SparseTensor) else x.shape[0]
        if batch == self.batch or (batch == self.group_size and self.batch % batch == 0):
            return self.batch // batch
        raise ValueError(f"latent batch {batch} does not fit a condition of {self.batch} ({self.group_size} shared)")


def repeat_tokens(x: Tokens, times: int) -> Tokens:
    """The whole batch ``times`` over, in order (coordinates and their maps are reused on sparse ones)."""
    if times == 1:
        return x
    return x.repeat_batch(times) if isinstance(x, SparseTensor) else x.repeat(times, *[1] * (x.dim() - 1))


def _group_rows(x: Tokens, cond: Condition) -> list[slice]:
    """Rows of each group: batch rows of dense tokens, voxel rows of sparse ones."""
    size = cond.group_size
    if isinstance(x, SparseTensor):
        return [slice(x.layout[g * size].start, x.layout[(g + 1) * size - 1].stop) for g in range(len(cond.groups))]
    return [slice(g * size, (g + 1) * size) for g in range(len(cond.groups))]


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of consecutive True entries."""
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _keys_values(attn: MultiHeadAttention, rows: ConditionRows, part: str, row: int) -> tuple[torch.Tensor, ...]:
    """``k, v [1, L, H, D]`` of one row for one layer, cached for the run."""
    key = (attn, part, row)
    if key not in rows.cache:
        context = rows.tokens[part][row : row + 1]
        kv = attn.to_kv(context).reshape(1, context.shape[1], 2, attn.num_heads, attn.head_dim)
        k, v = kv.unbind(dim=2)
        if attn.qk_rms_norm:
            k = attn.k_rms_norm(k)
        rows.cache[key] = (k, v)
    return rows.cache[key]


def _constant_output(attn: MultiHeadAttention, rows: ConditionRows, part: str, row: int) -> torch.Tensor:
    """``[C]``: the output of every token attending to a row of equal tokens, ``to_out(v)``."""
    key = (attn, part, row, "constant")
    if key not in rows.cache:
        token = rows.tokens[part][row, :1]
        value = attn.to_kv(token)[:, attn.channels :]
        rows.cache[key] = attn.to_out(value)[0]
    return rows.cache[key]


def _attend(
    attn: MultiHeadAttention,
    feats: torch.Tensor,
    layout: list[slice] | None,
    rows: ConditionRows,
    part: str,
    element_rows: list[int],
) -> torch.Tensor:
    """Cross-attention of ``feats`` (dense ``[E, L, C]`` or packed ``[T, C]`` with ``layout``), element
    ``e`` to condition row ``element_rows[e]``; returns the projected output."""
    lead = feats.shape[:-1]
    if part == OCCLUSION and rows.ratios is not None and not attn.qk_rms_norm:
        per_element = [rows.ratios[r] for r in element_rows]
        return ratio_attention(attn, feats, layout, per_element)
    q = attn.to_q(feats).reshape(*lead, attn.num_heads, attn.head_dim)
    if attn.qk_rms_norm:
        q = attn.q_rms_norm(q)
    distinct = sorted(set(element_rows))
    kv = {r: _keys_values(attn, rows, part, r) for r in distinct}
    if len(distinct) == 1:
        k, v = (t.expand(len(element_rows), *t.shape[1:]) for t in kv[distinct[0]])
    else:
        k, v = (torch.cat([kv[r][i] for r in element_rows]) for i in (0, 1))
    bias = None
    if part == IMAGE and rows.visibility_bias is not None:
        bias = rows.visibility_bias[element_rows]
    h = scaled_dot_product(q, k, v, bias) if layout is None else varlen_cross_attention(q, layout, k, v, bias)
    return attn.to_out(h.reshape(*lead, attn.channels))


def cross_attend(attn: MultiHeadAttention, x: Tokens, cond: Condition, part: str) -> Tokens:
    """``attn`` from the latent tokens ``x`` (``cond.batch`` elements) to one part of each element's
    condition row: ``IMAGE`` (visibility-weighted for Amodal3R) or ``OCCLUSION``."""
    sparse = isinstance(x, SparseTensor)
    feats = x.feats if sparse else x
    out = feats.new_empty(*feats.shape[:-1], attn.channels)
    spans = _group_rows(x, cond)
    uniform = [cond.rows.uniform[part][row] for row in cond.groups]
    for g in (g for g, flag in enumerate(uniform) if flag):
        out[spans[g]] = _constant_output(attn, cond.rows, part, cond.groups[g])
    size = cond.group_size
    for first, stop in _runs([not flag for flag in uniform]):
        rows = slice(spans[first].start, spans[stop - 1].stop)
        layout = None
        if sparse:
            layout = [slice(s.start - rows.start, s.stop - rows.start) for s in x.layout[first * size : stop * size]]
        element_rows = [row for row in cond.groups[first:stop] for _ in range(size)]
        out[rows] = _attend(attn, feats[rows], layout, cond.rows, part, element_rows)
    return x.replace(out) if sparse else out

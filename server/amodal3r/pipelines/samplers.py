"""Euler flow-matching sampler with classifier-free guidance inside a time interval.

Conditional, unconditional and multi-view predictions of one step run as one batched forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from amodal3r.api.errors import Cancelled
from amodal3r.api.protocol import MULTIVIEW_MODES
from amodal3r.modules.condition import Condition, ConditionRows
from amodal3r.modules.shortcuts import SHORTCUTS
from amodal3r.modules.sparse import SparseTensor

Latent = torch.Tensor | SparseTensor
ProgressFn = Callable[[str, int, int], None]
MultiViewMode = str  # one of MULTIVIEW_MODES
SAMPLER_NAMES = ("FlowEulerSampler", "FlowEulerCfgSampler", "FlowEulerGuidanceIntervalSampler")


@dataclass(frozen=True)
class StepTime:
    """Wall time of one sampler step and how many conditions its batched forward evaluated
    (2 for a guided single-view step: the condition and the unconditional pass)."""

    seconds: float
    passes: int


@dataclass(frozen=True)
class SamplerSettings:
    steps: int = 25
    cfg_strength: float = 0.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    rescale_t: float = 1.0
    sigma_min: float = 1e-5

    @classmethod
    def from_config(cls, name: str, args: dict, params: dict) -> SamplerSettings:
        """Settings from a ``pipeline.json`` sampler entry (``name``, ``args``, ``params``)."""
        if name not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {name!r}; supported: {', '.join(SAMPLER_NAMES)}")
        return cls().override(**args, **params)

    def override(self, **changes: object) -> SamplerSettings:
        """A copy with the given non-None settings changed; unknown names are an error."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown sampler setting(s) {sorted(unknown)}; known: {sorted(known)}")
        changes = {k: v for k, v in changes.items() if v is not None}
        if "cfg_interval" in changes:
            changes["cfg_interval"] = tuple(changes["cfg_interval"])  # type: ignore[arg-type]
        settings = replace(self, **changes)  # type: ignore[arg-type]
        if settings.steps < 1:
            raise ValueError(f"steps must be at least 1, got {settings.steps}")
        return settings


def synchronize(device: torch.device) -> None:
    """Wait for queued accelerator work, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_pairs(steps: int, rescale_t: float) -> list[tuple[float, float]]:
    """``(t, t_prev)`` per step: uniform in [1, 0], warped by ``r t / (1 + (r - 1) t)``."""
    seq = [1.0 - i / steps for i in range(steps + 1)]
    seq = [rescale_t * t / (1 + (rescale_t - 1) * t) for t in seq]
    return list(zip(seq[:-1], seq[1:], strict=True))


def _repeat(x: Latent, n: int) -> Latent:
    if isinstance(x, SparseTensor):
        return x.repeat_batch(n)
    return x.repeat(n, *[1] * (x.dim() - 1))


class _BatchedModel:
    """Evaluates ``model`` on ``x`` under several of the condition rows ``conds`` in one forward.

    A flow model (one with ``prepare_condition``) gets the rows prepared once per run and, when the
    ``shared_prefix`` shortcut is on, the latent once for all conditions (amodal3r.modules.condition).
    Any other callable gets the latent repeated and the conditions concatenated."""

    def __init__(self, model: Callable, x: Latent, conds: torch.Tensor):
        self.model, self.conds = model, conds
        self.batch = x.batch_size if isinstance(x, SparseTensor) else x.shape[0]
        self.prepare = getattr(model, "prepare_condition", None)
        self.rows: ConditionRows | None = None

    def _condition(self, rows: list[int]) -> Condition:
        if self.rows is None or not SHORTCUTS.condition_cache:
            self.rows = self.prepare(self.conds)
        return Condition(self.rows, rows, self.batch)

    def __call__(self, x: Latent, t: float, rows: list[int]) -> list[torch.Tensor]:
        """One prediction per condition row in ``rows``, each for the whole batch of latents."""
        k = len(rows)
        if self.prepare is None:
            cond = torch.cat([self.conds[r : r + 1].expand(self.batch, *self.conds.shape[1:]) for r in rows])
        else:
            cond = self._condition(rows)
        shared = self.prepare is not None and SHORTCUTS.shared_prefix
        latent = x if shared else _repeat(x, k)
        t_model = torch.full((self.batch if shared else k * self.batch,), 1000.0 * t, device=self.conds.device)
        out = self.model(latent, t_model, cond)
        feats = out.feats if isinstance(out, SparseTensor) else out
        return list(feats.chunk(k))


def sample(
    model: Callable,
    noise: Latent,
    cond: torch.Tensor,
    neg_cond: torch.Tensor,
    settings: SamplerSettings,
    multiview: MultiViewMode = "stochastic",
    progress: ProgressFn | None = None,
    cancelled: Callable[[], bool] | None = None,
    stage: str = "sampling",
    step_times: list[StepTime] | None = None,
) -> Latent:
    """Integrate the flow from noise (t=1) to data (t=0).

    ``cond`` holds one row per view. With several views, ``stochastic`` uses view ``i % n`` at step
    ``i`` and ``multidiffusion`` averages the predictions of all views. The guided velocity is
    ``(1 + s) v_cond - s v_neg`` for ``t`` inside ``cfg_interval``, else ``v_cond``. Each step's
    wall time is appended to ``step_times`` when given.
    """
    n_views = cond.shape[0]
    if multiview not in MULTIVIEW_MODES:
        raise ValueError(f"multi-view mode must be one of {', '.join(MULTIVIEW_MODES)}, got {multiview!r}")
    batched = _BatchedModel(model, noise, torch.cat([cond, neg_cond[:1]]))
    x = noise
    pairs = time_pairs(settings.steps, settings.rescale_t)
    for i, (t, t_prev) in enumerate(pairs):
        started = time.perf_counter()
        if cancelled is not None and cancelled():
            raise Cancelled(f"{stage} cancelled at step {i} of {len(pairs)}")
        views = list(range(n_views)) if multiview == "multidiffusion" else [i % n_views]
        guided = settings.cfg_strength > 0 and settings.cfg_interval[0] <= t <= settings.cfg_interval[1]
        preds = batched(x, t, views + ([n_views] if guided else []))  # row n_views: the negative
        velocity = torch.stack(preds[: len(views)]).mean(0) if len(views) > 1 else preds[0]
        if guided:
            velocity = (1 + settings.cfg_strength) * velocity - settings.cfg_strength * preds[-1]
        step = (t - t_prev) * velocity
        x = x.replace(x.feats - step) if isinstance(x, SparseTensor) else x - step
        if step_times is not None:
            synchronize(x.device)
            step_times.append(StepTime(time.perf_counter() - started, len(preds)))
        if progress is not None:
            progress(stage, i + 1, len(pairs))
    return x

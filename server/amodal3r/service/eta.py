"""Progress and time left of a running job.

The fraction done follows fixed stage weights. The time left is measured instead: the current
stage goes on at the pace this job has shown in it so far (sampler steps after the first, which
also loads models), and the stages still ahead take what they took per unit of work in earlier
jobs on this device (a running average kept in ``stage_times.json`` in the data folder). Only a
stage never timed on this device falls back to the stage weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from amodal3r.api.files import write_atomically

# Share of the whole job each stage takes, in order: drives the progress fraction. The stages a job
# skips (placing, without place) weigh nothing and the others share their weight.
STAGE_WEIGHTS = {
    "loading": 0.05,
    "encoding": 0.05,
    "structure": 0.35,
    "slat": 0.35,
    "decoding": 0.1,
    "exporting": 0.05,
    "placing": 0.05,
}
STAGES = tuple(STAGE_WEIGHTS)
NEWEST_WEIGHT = 0.5  # share of the latest job in the running average of seconds per unit
log = logging.getLogger(__name__)


def stage_weights(units: Mapping[str, float] | None = None) -> dict[str, float]:
    """Each stage's share of the whole job, summing to 1 over the stages ``units`` gives work to."""
    kept = {name: w for name, w in STAGE_WEIGHTS.items() if units is None or units.get(name, 1.0) > 0}
    total = sum(kept.values())
    return {name: w / total for name, w in kept.items()}


def stage_fraction(stage: str, step: int, total: int, units: Mapping[str, float] | None = None) -> float:
    """Progress over the whole job when ``stage`` is ``step`` of ``total`` done."""
    done = 0.0
    for name, weight in stage_weights(units).items():
        if name == stage:
            return done + weight * (step / total if total else 0.0)
        done += weight
    return done


def job_units(views: int, variants: int, structure_steps: int, slat_steps: int, place: bool) -> dict[str, float]:
    """The work of each stage of one job, in the units its time is averaged over (a stage the job
    skips has none)."""
    return {
        "loading": 1.0,
        "encoding": float(views),
        "structure": float(structure_steps * variants),
        "slat": float(slat_steps * variants),
        "decoding": float(variants),
        "exporting": float(variants),
        "placing": float(variants if place else 0),
    }


class StageTimes:
    """Seconds per unit of work of each stage on one device, averaged over the jobs run there."""

    def __init__(self, path: Path | None, device: str):
        self.path, self.device = path, device
        self.per_unit: dict[str, float] = self._read().get(device, {})

    def _read(self) -> dict[str, dict[str, float]]:
        try:
            data = json.loads(self.path.read_text()) if self.path is not None and self.path.is_file() else {}
        except (OSError, ValueError, RecursionError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {
            device: {s: float(v) for s, v in times.items() if s in STAGE_WEIGHTS and isinstance(v, (int, float))}
            for device, times in data.items()
            if isinstance(times, dict)
        }

    def record(self, stage: str, seconds_per_unit: float) -> None:
        old = self.per_unit.get(stage)
        new = seconds_per_unit if old is None else NEWEST_WEIGHT * seconds_per_unit + (1 - NEWEST_WEIGHT) * old
        self.per_unit[stage] = new

    def save(self) -> None:
        """Best effort: the estimate is worth less than the disk space a full disk has left."""
        if self.path is None:
            return
        data = {**self._read(), self.device: self.per_unit}
        try:
            write_atomically(self.path, json.dumps(data, indent=1).encode())
        except OSError as error:
            log.warning("could not save stage times to %s (%s)", self.path, error)


@dataclass
class _Stage:
    name: str
    started: float
    first_step: int = 0  # the first step reported with its time: the pace is measured after it
    first_step_at: float = 0.0
    step: int = 0
    step_at: float = 0.0


@dataclass
class Estimate:
    """Time left of one job, updated at every progress report."""

    times: StageTimes
    units: dict[str, float] = field(default_factory=dict)  # from job_units, once the step counts are known
    started: float = 0.0
    stage: _Stage | None = None

    def observe(self, stage: str, step: int, total: int, now: float) -> float | None:
        """Seconds left after this report, or None while nothing measured says."""
        if self.stage is None or self.stage.name != stage:
            self._close(now)
            self.stage = _Stage(stage, now)
        current = self.stage
        if total and step >= 1:
            if not current.first_step:
                current.first_step, current.first_step_at = step, now
            current.step, current.step_at = step, now
        return self._left(step, total, now)

    def finish(self, now: float) -> None:
        """The job ended: time its last stage and keep what this job measured."""
        self._close(now)
        self.stage = None
        self.times.save()

    def _pace(self) -> float | None:
        """Seconds per step of the current stage, from the steps after its first."""
        current = self.stage
        if current is None or current.step <= current.first_step:
            return None
        return (current.step_at - current.first_step_at) / (current.step - current.first_step)

    def _close(self, now: float) -> None:
        current = self.stage
        if current is None or not self.units.get(current.name):
            return
        pace = self._pace()
        if pace is not None:
            steps_per_unit = max(current.step, 1) / self.units[current.name]
            self.times.record(current.name, pace * steps_per_unit)
        else:
            self.times.record(current.name, (now - current.started) / self.units[current.name])

    def _left(self, step: int, total: int, now: float) -> float | None:
        current = self.stage
        assert current is not None
        if current.name not in STAGES:
            return None
        pace = self._pace()
        if pace is not None and total:
            parts: list[float | None] = [pace * (total - step)]
        else:
            expected = self._expected(current.name)
            parts = [None if expected is None else max(0.0, expected - (now - current.started))]
        parts += [self._expected(name) for name in STAGES[STAGES.index(current.name) + 1 :]]
        if None in parts:
            return self._by_weights(parts, step, total, now)
        return sum(p for p in parts if p is not None)

    def _expected(self, stage: str) -> float | None:
        per_unit, units = self.times.per_unit.get(stage), self.units.get(stage)
        if units == 0:
            return 0.0  # a stage this job skips takes no time, measured or not
        return None if per_unit is None or units is None else per_unit * units

    def _by_weights(self, parts: list[float | None], step: int, total: int, now: float) -> float | None:
        """Stages never timed here take their stage weight's share of the pace of the job so far."""
        assert self.stage is not None
        weights = stage_weights(self.units)
        fraction = stage_fraction(self.stage.name, step, total, self.units)
        if fraction < 0.1 or now <= self.started:
            return None
        per_weight = (now - self.started) / fraction
        names = STAGES[STAGES.index(self.stage.name) :]
        guesses = [
            p if p is not None else per_weight * weights.get(n, 0.0) * (1 - (step / total if total and i == 0 else 0))
            for i, (n, p) in enumerate(zip(names, parts, strict=True))
        ]
        return sum(guesses)

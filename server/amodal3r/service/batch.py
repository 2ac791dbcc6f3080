"""``amodal3r batch``: many pictures in one run, in this process or spread over Ray actors.

Every item is checked before any model loads. Results go to ``OUT/NAME.glb`` (+ ``.ply``, ``.png``,
and with ``place`` the pose in its photo's camera, ``.pose.json``), each written atomically;
``OUT/summary.csv`` is rewritten as items finish; a rerun skips the items whose outputs all exist.
Where the work runs is an :class:`Executor`: :class:`LocalExecutor` here, ``ray_batch.RayExecutor``
on a Ray cluster.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

from amodal3r.api.camera import POSE_SUFFIX
from amodal3r.api.files import write_atomically
from amodal3r.api.protocol import JobParams
from amodal3r.io.batch_inputs import BatchItem, check_items
from amodal3r.io.camera import photo_camera
from amodal3r.io.inputs import load_view
from amodal3r.io.results import GAUSSIANS_SUFFIX, PREVIEW_SUFFIX, OutputSettings, WrittenVariant, write_results
from amodal3r.pipelines.placement import place_variants

from .worker import OUT_OF_MEMORY, ModelRuntime, run_settings

DONE, FAILED, SKIPPED, PENDING = "done", "failed", "skipped", "pending"
SUMMARY_FILE = "summary.csv"
SUMMARY_COLUMNS = ("name", "status", "seconds", "error")


@dataclass(frozen=True)
class BatchSpec:
    """What every item of a batch shares: the model, where it runs, and the job settings."""

    model: str  # a model folder or Hugging Face id, resolved where the work runs
    params: JobParams
    device: str = "auto"
    dtype: str | None = None


@dataclass
class Outcome:
    status: str  # DONE or FAILED
    seconds: float = 0.0
    error: str = ""
    notices: list[str] = field(default_factory=list)


class Reporter(Protocol):
    """What an executor tells the run: an item finished, time passes, something to say."""

    def finished(self, item: BatchItem, outcome: Outcome) -> None: ...

    def tick(self) -> None: ...

    def say(self, text: str) -> None: ...


class Executor(Protocol):
    def run(self, items: list[BatchItem], report: Reporter) -> None:
        """Reconstruct every item, reporting each one exactly once, from this thread."""


def output_paths(out_dir: Path, name: str, params: JobParams) -> list[Path]:
    """Every file one item writes: the GLB, then the preview, the Gaussians and the pose when asked
    for (an item whose pose could not be fitted lacks it, with a notice, and a rerun tries again)."""
    glb = out_dir / f"{name}.glb"
    extras = [(params.preview, PREVIEW_SUFFIX), (params.gaussians, GAUSSIANS_SUFFIX), (params.place, POSE_SUFFIX)]
    return [glb] + [glb.with_name(name + suffix) for wanted, suffix in extras if wanted]


def reconstruct_item(runtime: ModelRuntime, item: BatchItem, params: JobParams, glb: Path) -> Outcome:
    """One item into ``glb`` (and its siblings); any failure becomes a FAILED outcome with the reason."""
    started = time.perf_counter()
    try:
        views = [load_view(v["image"], v.get("target_mask"), v.get("occluder_mask"), v.get("mask")) for v in item.views]
        camera = photo_camera(item.views[0]["image"], params.placement) if params.place else None
        result = runtime.pipeline()(views, run_settings(params))
        outputs = OutputSettings(
            texture_size=params.texture_size, faces=params.faces, gaussians=params.gaussians, preview=params.preview
        )

        def place(variants: list[WrittenVariant]) -> None:
            place_variants(variants, views[0], camera)

        finish = place if camera is not None else None
        written = write_results(result.meshes[:1], result.gaussians[:1], [glb], outputs, finish=finish)
    except Exception as error:  # noqa: BLE001 - one item's failure must never stop the batch
        text = str(error) or type(error).__name__
        if isinstance(error, MemoryError) or "out of memory" in text.lower():
            runtime.unload()  # the next item starts from a clean device
            text = OUT_OF_MEMORY
        return Outcome(FAILED, time.perf_counter() - started, text)
    notices = [n for view in views for n in view.notices] + [n for w in written for n in w.notices]
    return Outcome(DONE, time.perf_counter() - started, notices=notices)


class LocalExecutor:
    """One pipeline in this process, items one after another."""

    def __init__(self, model_dir: Path, spec: BatchSpec, out_dir: Path):
        import torch

        dtype = getattr(torch, spec.dtype) if spec.dtype else None
        self.runtime = ModelRuntime(model_dir, spec.device, dtype, idle_unload=math.inf)
        self.spec, self.out_dir = spec, out_dir

    def run(self, items: list[BatchItem], report: Reporter) -> None:
        for item in items:
            glb = output_paths(self.out_dir, item.name, self.spec.params)[0]
            report.finished(item, reconstruct_item(self.runtime, item, self.spec.params, glb))


class Summary:
    """``summary.csv``: one row per item (name, status, seconds, error), rewritten atomically."""

    def __init__(self, path: Path, names: list[str]):
        self.path = path
        self.rows: dict[str, list[str]] = {name: [PENDING, "", ""] for name in names}

    def set(self, name: str, status: str, seconds: float | None = None, error: str = "") -> None:
        self.rows[name] = [status, "" if seconds is None else f"{seconds:.2f}", " ".join(error.split())]

    def write(self) -> None:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(SUMMARY_COLUMNS)
        writer.writerows([name, *row] for name, row in self.rows.items())
        write_atomically(self.path, text.getvalue().encode())

    def count(self, status: str) -> int:
        return sum(row[0] == status for row in self.rows.values())


class ProgressBar:
    """One line for the whole batch: items finished, failed, and the time left.

    On a terminal the line is redrawn in place (messages print above it); in a log, one line per
    finished item.
    """

    WIDTH = 24

    def __init__(self, total: int, stream: TextIO | None = None):
        self.total, self.stream = total, stream or sys.stderr
        self.done = self.failed = 0
        self.started = time.monotonic()
        self.live = self.stream.isatty()

    def finished(self, name: str, outcome: Outcome) -> None:
        if outcome.status == DONE:
            self.done += 1
        else:
            self.failed += 1
        what = f"done in {outcome.seconds:.1f} s" if outcome.status == DONE else f"FAILED: {outcome.error}"
        self.message(f"{name}: {what}")

    def message(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\033[K" + text + "\n")
            self.draw()
        else:
            self.stream.write(f"[{self.done + self.failed}/{self.total}] {text} ({self.status()})\n")
        self.stream.flush()

    def draw(self) -> None:
        """Redraw the bar (on a terminal): also called while waiting, so that the ETA moves."""
        if not self.live:
            return
        filled = round(self.WIDTH * (self.done + self.failed) / max(self.total, 1))
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.stream.write(f"\r\033[K[{bar}] {self.done + self.failed}/{self.total} {self.status()}")
        self.stream.flush()

    def status(self) -> str:
        return f"{self.done} done, {self.failed} failed, ETA {format_eta(self.eta())}"

    def eta(self) -> float | None:
        """Seconds left at the pace so far (None before the first item finishes)."""
        finished = self.done + self.failed
        if not finished:
            return None
        return (time.monotonic() - self.started) / finished * (self.total - finished)

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class BatchReport:
    """The :class:`Reporter` of a run: the summary file and the progress bar."""

    summary: Summary
    bar: ProgressBar

    def finished(self, item: BatchItem, outcome: Outcome) -> None:
        self.summary.set(item.name, outcome.status, outcome.seconds, outcome.error)
        self.summary.write()
        for notice in outcome.notices:
            self.bar.message(f"{item.name}: notice: {notice}")
        self.bar.finished(item.name, outcome)

    def tick(self) -> None:
        self.bar.draw()

    def say(self, text: str) -> None:
        self.bar.message(text)


@dataclass
class BatchPlan:
    """What a run will do: every item's fate before any model loads."""

    items: list[BatchItem]  # all, in input order
    todo: list[BatchItem]  # good items without outputs
    skipped: list[BatchItem]  # outputs already there
    bad: list[BatchItem]  # refused by the checks


def plan_batch(items: list[BatchItem], out_dir: Path, params: JobParams) -> BatchPlan:
    """Skip the items whose outputs all exist; check every other one."""
    skipped = [i for i in items if all(p.is_file() for p in output_paths(out_dir, i.name, params))]
    done = {i.name for i in skipped}
    checked = check_items([i for i in items if i.name not in done])
    return BatchPlan(items, [i for i in checked if i.ok], skipped, [i for i in checked if not i.ok])


def run_batch(plan: BatchPlan, out_dir: Path, executor: Executor | None, stream: TextIO) -> int:
    """Run the plan's items, keep ``summary.csv`` current; returns how many items failed (refused ones
    included). ``executor`` may be None when the plan has nothing to run: a rerun starts nothing."""
    summary = Summary(out_dir / SUMMARY_FILE, [i.name for i in plan.items])
    for item in plan.skipped:
        summary.set(item.name, SKIPPED, error="its outputs exist already")
    for item in plan.bad:
        summary.set(item.name, FAILED, error=item.error)
    summary.write()
    for item in plan.bad:
        print(f"{item.name}: not run: {item.error}", file=stream)
    print(
        f"{len(plan.items)} item(s): {len(plan.todo)} to run, {len(plan.skipped)} already done, "
        f"{len(plan.bad)} refused",
        file=stream,
        flush=True,
    )
    if plan.todo:
        if executor is None:
            raise ValueError("the plan has items to run but no executor was given")
        report = BatchReport(summary, ProgressBar(len(plan.todo), stream))
        try:
            executor.run(plan.todo, report)
        finally:
            report.bar.close()
    return summary.count(FAILED)

"""One worker runs reconstruction jobs in submission order on the server's device.

Models load on the first job and stay warm; after ``idle_unload`` seconds without work they are
dropped to give the memory back. Progress comes from the sampler's callback; a cancel request is
seen by the sampler before its next step.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import torch

from amodal3r.api.errors import Cancelled, InputError
from amodal3r.api.protocol import (
    CANCELLED,
    DONE,
    FAILED,
    RUNNING,
    JobParams,
    result_name,
)
from amodal3r.io.inputs import View, load_view
from amodal3r.io.results import OutputSettings, write_results
from amodal3r.pipelines.amodal3r import Amodal3RPipeline, RunSettings, StageSettings
from amodal3r.weights.layout import RANDOM_WEIGHTS_NOTICE

from .job_store import JobStore

# Share of the whole job each stage takes, in order: drives the progress fraction and the ETA.
STAGE_WEIGHTS = {"loading": 0.05, "encoding": 0.05, "structure": 0.35, "slat": 0.35, "decoding": 0.1, "exporting": 0.1}
PERSIST_EVERY = 1.0  # seconds between progress writes to job.json (state changes are written at once)
OUT_OF_MEMORY = (
    "the device ran out of memory. Try fewer variants, a smaller texture or face count, "
    "close other GPU programs, or start the server with --device cpu"
)


def stage_fraction(stage: str, step: int, total: int) -> float:
    """Progress over the whole job when ``stage`` is ``step`` of ``total`` done."""
    done = 0.0
    for name, weight in STAGE_WEIGHTS.items():
        if name == stage:
            return done + weight * (step / total if total else 0.0)
        done += weight
    return done


class ModelRuntime:
    """The pipeline (and SAM) of one model folder on one device, loaded lazily."""

    def __init__(
        self, model_dir: Path, device: str = "auto", dtype: torch.dtype | None = None, idle_unload: float = 900.0
    ):
        self.model_dir = Path(model_dir)
        self.device_name, self.dtype, self.idle_unload = device, dtype, idle_unload
        self._pipeline: Amodal3RPipeline | None = None
        self._lock = threading.RLock()
        self.last_used = time.monotonic()

    def pipeline(self) -> Amodal3RPipeline:
        with self._lock:
            self.last_used = time.monotonic()
            if self._pipeline is None:
                self._pipeline = Amodal3RPipeline.from_pretrained(self.model_dir, self.device_name, self.dtype)
            return self._pipeline

    @property
    def loaded_models(self) -> list[str]:
        return self._pipeline.loaded_models if self._pipeline is not None else []

    @property
    def device(self) -> str:
        return str(self._pipeline.device) if self._pipeline is not None else self.device_name

    def unload(self) -> None:
        with self._lock:
            if self._pipeline is not None:
                self._pipeline.unload()
            self._pipeline = None
            _free_device_memory()

    def unload_if_idle(self, busy: bool) -> bool:
        if busy or self._pipeline is None or time.monotonic() - self.last_used < self.idle_unload:
            return False
        self.unload()
        return True


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class JobProgress:
    """Turns the pipeline's (stage, step, total) calls into job status updates with an ETA."""

    def __init__(self, store: JobStore, job_id: str, started: float):
        self.store, self.job_id, self.started = store, job_id, started
        self.last_persist = 0.0

    def __call__(self, stage: str, step: int = 0, total: int = 0) -> None:
        now = time.time()
        fraction = stage_fraction(stage, step, total)
        elapsed = now - self.started
        eta = elapsed * (1 - fraction) / fraction if fraction >= 0.1 else None
        persist = now - self.last_persist >= PERSIST_EVERY or step == total
        if persist:
            self.last_persist = now
        self.store.update(
            self.job_id,
            persist=persist,
            stage=stage,
            step=step,
            total=total,
            progress=round(fraction, 4),
            elapsed=round(elapsed, 2),
            eta=None if eta is None else round(eta, 1),
        )
        if stage == "slat" and step == total:
            self("decoding")


class Worker:
    def __init__(self, store: JobStore, runtime: ModelRuntime):
        self.store, self.runtime = store, runtime
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self.current: str | None = None
        self._thread = threading.Thread(target=self._loop, name="amodal3r-worker", daemon=True)

    def start(self, pending: list[str]) -> None:
        for job_id in pending:
            self._queue.put(job_id)
        self._thread.start()
        threading.Thread(target=self._unload_when_idle, name="amodal3r-idle", daemon=True).start()

    def stop(self) -> None:
        self._queue.put(None)

    def submit(self, job_id: str) -> None:
        self._queue.put(job_id)

    @property
    def queue_length(self) -> int:
        return self._queue.qsize()

    def cancel(self, job_id: str) -> None:
        """Queued jobs end at once; the running one at its next sampler step."""
        with self._lock:
            status = self.store.get(job_id)
            if status is None or status.final:
                return
            self._cancelled.add(job_id)
            if status.state != RUNNING:
                self.store.update(job_id, state=CANCELLED, stage=CANCELLED, finished=time.time(), eta=None)

    def is_cancelled(self, job_id: str) -> bool:
        """Asked by the sampler before each step; a subclass may look elsewhere (the Ray replicas' marker files)."""
        return job_id in self._cancelled

    def _loop(self) -> None:
        while (job_id := self._queue.get()) is not None:
            with self._lock:
                status = self.store.get(job_id)
                if status is None or status.final:
                    continue
                self.current = job_id
                started = time.time()
                self.store.update(job_id, state=RUNNING, started=started, stage="loading")
            try:
                self._run(job_id, started)
            finally:
                self.current = None
                self.runtime.last_used = time.monotonic()

    def _run(self, job_id: str, started: float) -> None:
        status = self.store.get(job_id)
        assert status is not None
        progress = JobProgress(self.store, job_id, started)
        try:
            results, notices = self._reconstruct(job_id, JobParams(**status.params), progress)
        except Cancelled:
            self._finish(job_id, started, CANCELLED, stage=CANCELLED)
        except (torch.OutOfMemoryError, MemoryError):
            self.runtime.unload()
            self._finish(job_id, started, FAILED, error=OUT_OF_MEMORY)
        except Exception as error:  # noqa: BLE001 - a failed job must never stop the worker
            self._finish(job_id, started, FAILED, error=_explain(error))
        else:
            self._finish(job_id, started, DONE, stage=DONE, results=results, notices=notices, progress=1.0)
        finally:
            self._cancelled.discard(job_id)

    def _finish(self, job_id: str, started: float, state: str, **changes: object) -> None:
        now = time.time()
        self.store.update(job_id, state=state, finished=now, elapsed=round(now - started, 2), eta=None, **changes)

    def _reconstruct(self, job_id: str, params: JobParams, progress: JobProgress) -> tuple[list[str], list[str]]:
        views = load_job_views(self.store, job_id)
        progress("loading")
        pipeline = self.runtime.pipeline()
        progress("encoding")

        def cancelled() -> bool:
            return self.is_cancelled(job_id)

        result = pipeline(views, run_settings(params), progress, cancelled)
        notices = [notice for view in views for notice in view.notices]
        if pipeline.config.tiny_random_weights:
            notices.append(RANDOM_WEIGHTS_NOTICE)
        folder = self.store.folder(job_id) / "results"
        glbs = [folder / result_name(variant, ".glb") for variant in range(len(result.meshes))]
        outputs = OutputSettings(
            texture_size=params.texture_size, faces=params.faces, gaussians=params.gaussians, preview=params.preview
        )
        written = write_results(
            result.meshes,
            result.gaussians,
            glbs,
            outputs,
            before_variant=lambda index, count: progress("exporting", index, count),
            cancelled=cancelled,
        )
        notices += [notice for variant in written for notice in variant.report.notices]
        return [path.name for variant in written for path in variant.files], notices

    def _unload_when_idle(self) -> None:
        while True:
            time.sleep(min(5.0, max(self.runtime.idle_unload / 4, 0.05)))
            self.runtime.unload_if_idle(busy=self.current is not None or self.queue_length > 0)


def load_job_views(store: JobStore, job_id: str) -> list[View]:
    """The stored uploads as views; errors name the upload field and the user's file name."""
    status = store.get(job_id)
    assert status is not None
    views = []
    for index, paths in enumerate(store.input_paths(job_id)):
        try:
            views.append(
                load_view(paths["image"], paths.get("target_mask"), paths.get("occluder_mask"), paths.get("mask"))
            )
        except InputError as error:
            raise InputError(_named(str(error), paths, status.views[index], index)) from None
        views[-1].name = Path(status.views[index]).stem or f"view{index}"
    return views


def _named(message: str, paths: dict[str, Path], image_name: str, index: int) -> str:
    """Replace the server's storage paths in a message by the upload field names."""
    for kind, path in paths.items():
        label = f"view {index} {kind.replace('_', ' ')}" + (f" ({image_name})" if kind == "image" else "")
        message = message.replace(str(path), label).replace(path.name, label)
    return message


def run_settings(params: JobParams) -> RunSettings:
    """A job's parameters as the pipeline's run settings."""
    return RunSettings(
        seed=params.seed,
        variants=params.variants,
        multiview=params.multiview,
        structure=StageSettings(params.structure_steps, params.structure_cfg),
        slat=StageSettings(params.slat_steps, params.slat_cfg),
        formats=("mesh", "gaussian") if params.gaussians else ("mesh",),
    )


def _explain(error: Exception) -> str:
    text = str(error) or type(error).__name__
    if "out of memory" in text.lower():
        return OUT_OF_MEMORY
    return text

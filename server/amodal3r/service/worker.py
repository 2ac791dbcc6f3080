"""One worker runs reconstruction jobs in submission order on the server's device.

Models load on the first job and stay warm; after ``idle_unload`` seconds without work they are
dropped to give the memory back. Progress comes from the sampler's callback; a cancel request is
seen by the sampler before its next step. The worker thread outlives every failure, the job
store's own included: a job whose final state cannot be written (a full disk) is failed in memory
and answered from there, and the next job runs.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from amodal3r.api.camera import Intrinsics
from amodal3r.api.errors import Cancelled, StorageError
from amodal3r.api.protocol import (
    CANCELLED,
    DONE,
    FAILED,
    RUNNING,
    JobParams,
    result_name,
)
from amodal3r.io.inputs import View
from amodal3r.io.results import OutputSettings, WrittenVariant, write_results
from amodal3r.pipelines.amodal3r import Amodal3RPipeline, RunSettings, StageSettings
from amodal3r.pipelines.placement import place_variants
from amodal3r.weights.layout import RANDOM_WEIGHTS_NOTICE

from .eta import Estimate, StageTimes, job_units, stage_fraction
from .job_store import JobStore, storage_error

PERSIST_EVERY = 1.0  # seconds between progress writes to job.json (state changes are written at once)
STAGE_TIMES_FILE = "stage_times.json"  # in the data folder: seconds per unit of each stage, per device
OUT_OF_MEMORY = (
    "the device ran out of memory. Try fewer variants, a smaller texture or face count, "
    "close other GPU programs, or start the server with --device cpu"
)
log = logging.getLogger(__name__)


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

    def __init__(self, store: JobStore, job_id: str, started: float, estimate: Estimate, clock=time.time):
        self.store, self.job_id, self.started, self.estimate, self.clock = store, job_id, started, estimate, clock
        self.estimate.started = started
        self.last_persist = 0.0

    def __call__(self, stage: str, step: int = 0, total: int = 0) -> None:
        now = self.clock()
        eta = self.estimate.observe(stage, step, total, now)
        persist = now - self.last_persist >= PERSIST_EVERY or step == total
        if persist:
            self.last_persist = now
        self.store.update(
            self.job_id,
            persist=persist,
            stage=stage,
            step=step,
            total=total,
            progress=round(stage_fraction(stage, step, total, self.estimate.units), 4),
            elapsed=round(now - self.started, 2),
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
    def alive(self) -> bool:
        """Whether the worker thread runs: ``/v1/health`` answers 503 when it does not."""
        return self._thread.is_alive()

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
            try:
                self._take(job_id)
            except Exception:  # noqa: BLE001 - a bug in one job must never stop the worker
                log.exception("job %s: unexpected failure in the worker", job_id)
                self._fail_in_memory(job_id, "the server failed to run this job (its log has the details)")
            finally:
                self.current = None
                self.runtime.last_used = time.monotonic()

    def _take(self, job_id: str) -> None:
        with self._lock:
            status = self.store.get(job_id)
            if status is None or status.final:
                return
            self.current = job_id
            started = time.time()
            try:
                self.store.update(job_id, state=RUNNING, started=started, stage="loading")
            except StorageError as error:
                self._fail_in_memory(job_id, str(error))
                return
        self._run(job_id, started)

    def _run(self, job_id: str, started: float) -> None:
        status = self.store.get(job_id)
        assert status is not None
        estimate = Estimate(StageTimes(self.store.data_dir / STAGE_TIMES_FILE, self.runtime.device))
        progress = JobProgress(self.store, job_id, started, estimate)
        try:
            results, notices = self._reconstruct(job_id, JobParams(**status.params), progress)
        except Cancelled:
            self._finish(job_id, started, CANCELLED, stage=CANCELLED)
        except (torch.OutOfMemoryError, MemoryError):
            self.runtime.unload()
            self._finish(job_id, started, FAILED, error=OUT_OF_MEMORY)
        except Exception as error:  # noqa: BLE001 - a failed job must never stop the worker
            self._finish(job_id, started, FAILED, error=self._explain(error))
        else:
            estimate.finish(time.time())
            notices = status.notices + notices
            self._finish(job_id, started, DONE, stage=DONE, results=results, notices=notices, progress=1.0)
        finally:
            self._cancelled.discard(job_id)

    def _finish(self, job_id: str, started: float, state: str, **changes: object) -> None:
        """The final state, on disk when it can be written, else failed in memory with both reasons."""
        now = time.time()
        try:
            self.store.update(job_id, state=state, finished=now, elapsed=round(now - started, 2), eta=None, **changes)
        except StorageError as error:
            reason = str(changes.get("error", ""))
            if not reason:
                reason = f"its state could not be saved: {error}"
            elif reason != str(error):
                reason = f"{reason} (the failure could not be saved: {error})"
            self._fail_in_memory(job_id, reason)

    def _fail_in_memory(self, job_id: str, reason: str) -> None:
        """The job failed and the disk may not take it: the server answers it from memory (a restart
        reports it interrupted)."""
        log.warning("job %s failed: %s", job_id, reason)
        try:
            self.store.update(job_id, persist=False, state=FAILED, error=reason, finished=time.time(), eta=None)
        except Exception:  # noqa: BLE001 - the store itself is broken: the log has it, the worker goes on
            log.exception("job %s: could not record its failure", job_id)

    def _explain(self, error: Exception) -> str:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return str(storage_error(error, self.store.data_dir))
        text = str(error) or type(error).__name__
        return OUT_OF_MEMORY if "out of memory" in text.lower() else text

    def _reconstruct(self, job_id: str, params: JobParams, progress: JobProgress) -> tuple[list[str], list[str]]:
        views = self.store.load_views(job_id)
        progress("loading")
        pipeline = self.runtime.pipeline()
        settings = run_settings(params)
        progress.estimate.units = job_units(
            len(views),
            params.variants,
            settings.structure.apply(pipeline.config.structure_sampler).steps,
            settings.slat.apply(pipeline.config.slat_sampler).steps,
            params.place,
        )
        progress("encoding")

        def cancelled() -> bool:
            return self.is_cancelled(job_id)

        result = pipeline(views, settings, progress, cancelled)
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
            finish=placing(params, views[0], progress, cancelled),
        )
        notices = [RANDOM_WEIGHTS_NOTICE] if pipeline.config.tiny_random_weights else []
        notices += [notice for variant in written for notice in variant.notices]
        return [path.name for variant in written for path in variant.files], notices

    def _unload_when_idle(self) -> None:
        while True:
            time.sleep(min(5.0, max(self.runtime.idle_unload / 4, 0.05)))
            try:
                self.runtime.unload_if_idle(busy=self.current is not None or self.queue_length > 0)
            except Exception:  # noqa: BLE001 - unloading is housekeeping: log it and keep going
                log.exception("unloading idle models failed")


def placing(params: JobParams, view: View, progress: JobProgress, cancelled: Callable[[], bool]):
    """The step that fits each variant's pose to the first view, for ``write_results``; None when
    the job does not ask for it. The camera is the one the upload resolved (``uploads.store_job``)."""
    if not params.place:
        return None
    camera = Intrinsics.from_dict(params.camera, "the job's camera")

    def place(variants: list[WrittenVariant]) -> None:
        place_variants(variants, view, camera, lambda index, count: progress("placing", index, count), cancelled)

    return place


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

"""The job worker in-process: no failure stops it (out of memory, a full disk, a broken store call),
idle models unload, and the ETA follows the measured step times."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from faults import small_disk

import amodal3r.service.job_store as job_store_module
from amodal3r.api.errors import PipelineError
from amodal3r.api.protocol import CANCELLED, DONE, FAILED, RUNNING, JobParams
from amodal3r.io.inputs import View, load_view
from amodal3r.pipelines.amodal3r import Amodal3RPipeline
from amodal3r.service.eta import STAGES, Estimate, StageTimes, job_units, stage_fraction
from amodal3r.service.job_store import INTERRUPTED, JobStore
from amodal3r.service.worker import OUT_OF_MEMORY, JobProgress, ModelRuntime, Worker
from amodal3r.weights.layout import RANDOM_WEIGHTS_NOTICE

EXAMPLE = REPO_ROOT / "examples" / "mug_behind_box"
FAST = JobParams(structure_steps=2, slat_steps=2, texture_size=256, faces=5000, preview=False)


def example_view() -> View:
    return load_view(EXAMPLE / "image.png", EXAMPLE / "target_mask.png", EXAMPLE / "occluder_mask.png")


def submit(store: JobStore) -> str:
    return store.create(FAST, [example_view()], ["image.png"]).id


def wait_final(store: JobStore, job_id: str, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = store.get(job_id)
        if status.final:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def test_out_of_memory_fails_the_job_with_advice_and_the_next_one_runs(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_call, calls = Amodal3RPipeline.__call__, []

    def first_call_runs_out(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(*args, **kwargs)

    monkeypatch.setattr(Amodal3RPipeline, "__call__", first_call_runs_out)
    store = JobStore(tmp_path / "data")
    runtime = ModelRuntime(tiny_model_dir, "cpu", idle_unload=0.3)
    jobs = Worker(store, runtime)
    first, second = submit(store), submit(store)
    jobs.start([first, second])
    try:
        failed, done = wait_final(store, first), wait_final(store, second)
        assert failed.state == FAILED and failed.error == OUT_OF_MEMORY
        assert done.state == DONE and done.results == ["variant0.glb"]
        assert done.notices.count(RANDOM_WEIGHTS_NOTICE) == 1  # said once, beside the result
        deadline = time.monotonic() + 10
        while runtime.loaded_models and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not runtime.loaded_models, "idle models were not unloaded"
    finally:
        jobs.stop()


@pytest.mark.parametrize("phase", ["decoding", "exporting"])
def test_cancel_while_decoding_or_exporting_leaves_no_results(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    """Cancel arrives after sampling: the next check (between decoders, or between export phases) ends the job."""
    from amodal3r.io import export

    store = JobStore(tmp_path / "data")
    jobs = Worker(store, ModelRuntime(tiny_model_dir, "cpu"))
    job_id = submit(store)

    def cancel_then(real):
        def wrapped(*args, **kwargs):
            jobs.cancel(job_id)
            return real(*args, **kwargs)

        return wrapped

    if phase == "decoding":
        monkeypatch.setattr(Amodal3RPipeline, "decode", cancel_then(Amodal3RPipeline.decode))
    else:
        monkeypatch.setattr(export, "largest_components", cancel_then(export.largest_components))
    jobs.start([job_id])
    try:
        status = wait_final(store, job_id)
    finally:
        jobs.stop()
    assert status.state == CANCELLED and status.results == []
    assert list((store.folder(job_id) / "results").iterdir()) == []


def test_a_full_disk_when_a_failed_job_is_recorded_does_not_stop_the_worker(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12, defect 1: the job fails, the disk is full when its failure is written; the worker
    thread used to die and every later job stayed queued. A real small tmpfs here (root), else the fake."""
    real_call, calls = Amodal3RPipeline.__call__, []
    with small_disk(tmp_path / "disk", monkeypatch, size_kib=16384) as disk:

        def first_call_fills_the_disk_and_fails(*args, **kwargs):
            calls.append(args)
            if len(calls) == 1:
                disk.fill()
                raise PipelineError("the structure stage produced no occupied voxels")
            return real_call(*args, **kwargs)

        monkeypatch.setattr(Amodal3RPipeline, "__call__", first_call_fills_the_disk_and_fails)
        monkeypatch.setattr(job_store_module, "RETRY_PAUSE_S", 0.01)
        store = JobStore(disk.root)
        worker = Worker(store, ModelRuntime(tiny_model_dir, "cpu"))
        first = submit(store)
        worker.start([first])
        try:
            failed = wait_final(store, first)
            assert failed.state == FAILED, failed
            assert failed.error == (
                "the structure stage produced no occupied voxels (the failure could not be saved: "
                f"the data folder's disk is full: free space in {disk.root})"
            ), disk.kind
            assert worker.alive
            disk.free()
            second = submit(store)
            worker.submit(second)
            assert wait_final(store, second).state == DONE
        finally:
            worker.stop()
        assert store.get(first).state == FAILED  # answered from memory; the disk still says running
        assert json.loads((store.folder(first) / "job.json").read_text())["state"] == RUNNING
        restarted = JobStore(disk.root)
        assert restarted.recover() == [] and restarted.get(first).error == INTERRUPTED


def test_a_broken_job_store_call_fails_one_job_and_the_worker_goes_on(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore(tmp_path / "data")
    real_update, broken = store.update, []

    def update_breaks_once(job_id: str, persist: bool = True, **changes):
        if changes.get("state") == RUNNING and not broken:
            broken.append(job_id)
            raise RuntimeError("a bug in the job store")
        return real_update(job_id, persist, **changes)

    monkeypatch.setattr(store, "update", update_breaks_once)
    worker = Worker(store, ModelRuntime(tiny_model_dir, "cpu"))
    first, second = submit(store), submit(store)
    worker.start([first, second])
    try:
        failed = wait_final(store, first)
        assert failed.state == FAILED and "the server failed to run this job" in failed.error
        assert wait_final(store, second).state == DONE and worker.alive
    finally:
        worker.stop()


class RecordingStore:
    """Stands in for the job store: keeps the ETA of every progress update."""

    def __init__(self) -> None:
        self.etas: list[float | None] = []

    def update(self, job_id: str, persist: bool = True, **changes) -> None:
        self.etas.append(changes["eta"])


# (stage, steps, seconds of the first step, seconds of each further step) of a simulated job: the first
# sampler step also loads the model. 30.9 s in all.
SCHEDULE = [
    ("loading", 0, 0.5, 0.0),
    ("encoding", 0, 1.0, 0.0),
    ("structure", 10, 3.0, 0.4),
    ("slat", 10, 2.0, 1.2),
    ("decoding", 0, 4.0, 0.0),
    ("exporting", 1, 6.0, 0.0),
]


def simulate(times: StageTimes) -> list[tuple[float, float | None]]:
    """Run SCHEDULE through JobProgress on a fake clock: ``(true seconds left, ETA)`` per report."""
    now = [0.0]
    store = RecordingStore()
    estimate = Estimate(times, job_units(views=1, variants=1, structure_steps=10, slat_steps=10, place=False))
    progress = JobProgress(store, "job", 0.0, estimate, clock=lambda: now[0])
    reports: list[float] = []
    for stage, steps, first, each in SCHEDULE:
        if stage == "decoding":  # reported by JobProgress itself when the last slat step is done
            now[0] += first
            continue
        if steps == 0 or stage == "exporting":
            progress(stage, 0, steps)
            reports.append(now[0])
            now[0] += first
            continue
        for step in range(1, steps + 1):
            now[0] += first if step == 1 else each
            progress(stage, step, steps)
            reports.extend([now[0]] * (2 if stage == "slat" and step == steps else 1))
    estimate.finish(now[0])
    return [(now[0] - at, eta) for at, eta in zip(reports, store.etas, strict=True)]


def test_the_eta_follows_measured_step_times() -> None:
    """Issue 12: the ETA said 7 s when 34 s remained. Once a job on this device has been timed, every
    estimate of the next one from its second structure step on is within 10% (+0.5 s)."""
    times = StageTimes(None, "cpu")
    first = simulate(times)
    assert all(eta is not None for _, eta in first[4:]), "no ETA once the sampler runs"
    second = simulate(times)
    checked = second[3:]  # from the second structure step: its pace is measured
    for left, eta in checked:
        assert eta is not None and abs(eta - left) <= 0.1 * left + 0.5, (left, eta)
    early = second[2]  # the first structure step, its pace not yet measured: the earlier job's times
    assert abs(early[1] - early[0]) <= 0.15 * early[0], early


def test_stage_times_persist_per_device(tmp_path: Path) -> None:
    path = tmp_path / "stage_times.json"
    cpu = StageTimes(path, "cpu")
    cpu.record("slat", 2.0)
    cpu.save()
    cuda = StageTimes(path, "cuda:0")
    cuda.record("slat", 0.1)
    cuda.save()
    assert StageTimes(path, "cpu").per_unit == {"slat": 2.0} and StageTimes(path, "cuda:0").per_unit == {"slat": 0.1}
    path.write_text("{broken")
    assert StageTimes(path, "cpu").per_unit == {}


@pytest.mark.parametrize("place", [False, True])
def test_progress_reaches_the_end_of_the_stages_the_job_runs(place: bool) -> None:
    """A job that does not place its results is all done when its export is; one that does, when it has
    placed them (placing's weight is shared out otherwise, not left as a jump to 100%)."""
    units = job_units(views=1, variants=2, structure_steps=4, slat_steps=4, place=place)
    end_of_export = stage_fraction("exporting", 2, 2, units)
    assert end_of_export == pytest.approx(1.0) if not place else end_of_export < 0.99
    assert stage_fraction("placing", 2, 2, units) == pytest.approx(1.0)
    fractions = [stage_fraction(stage, step, 2, units) for stage in STAGES for step in range(3)]
    assert fractions == sorted(fractions)

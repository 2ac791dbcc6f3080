"""The job worker in-process: running out of memory fails one job and not the next; idle models unload."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

from amodal3r.api.protocol import CANCELLED, DONE, FAILED, JobParams
from amodal3r.pipelines.amodal3r import Amodal3RPipeline
from amodal3r.service.job_store import JobStore
from amodal3r.service.worker import OUT_OF_MEMORY, ModelRuntime, Worker
from amodal3r.weights.layout import RANDOM_WEIGHTS_NOTICE

EXAMPLE = REPO_ROOT / "examples" / "mug_behind_box"
FAST = JobParams(structure_steps=2, slat_steps=2, texture_size=256, faces=5000, preview=False)


def example_view() -> dict[str, tuple[str, bytes]]:
    return {
        kind: (f"{kind}.png", (EXAMPLE / f"{kind}.png").read_bytes())
        for kind in ("image", "target_mask", "occluder_mask")
    }


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
    first, second = (store.create(FAST, [example_view()]) for _ in range(2))
    jobs.start([first.id, second.id])
    try:
        failed, done = wait_final(store, first.id), wait_final(store, second.id)
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
    job = store.create(FAST, [example_view()])

    def cancel_then(real):
        def wrapped(*args, **kwargs):
            jobs.cancel(job.id)
            return real(*args, **kwargs)

        return wrapped

    if phase == "decoding":
        monkeypatch.setattr(Amodal3RPipeline, "decode", cancel_then(Amodal3RPipeline.decode))
    else:
        monkeypatch.setattr(export, "largest_components", cancel_then(export.largest_components))
    jobs.start([job.id])
    try:
        status = wait_final(store, job.id)
    finally:
        jobs.stop()
    assert status.state == CANCELLED and status.results == []
    assert list((store.folder(job.id) / "results").iterdir()) == []

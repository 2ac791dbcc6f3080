"""The job store: damaged records never stop a start, a full disk leaves nothing half-made, writes retry."""

from __future__ import annotations

import errno
import json
import logging
import stat
from pathlib import Path

import numpy as np
import pytest
from faults import small_disk
from PIL import Image

import amodal3r.service.job_store as job_store_module
from amodal3r.api.errors import StorageError
from amodal3r.api.protocol import FAILED, QUEUED, RUNNING, JobParams
from amodal3r.io.inputs import View
from amodal3r.service.job_store import DAMAGED, INTERRUPTED, JobStore


def small_view(name: str = "photo") -> View:
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((40, 60, 3)) * 255).astype(np.uint8))
    target = np.zeros((40, 60), bool)
    target[10:30, 10:30] = True
    occluder = np.zeros((40, 60), bool)
    occluder[5:35, 30:50] = True
    return View(image, target, occluder, name, [f"{name}.png: a notice"])


def write_record(root: Path, folder: str, record: object) -> Path:
    (root / folder).mkdir(parents=True)
    text = record if isinstance(record, str) else json.dumps(record)
    (root / folder / "job.json").write_text(text)
    return root / folder


def test_damaged_records_are_moved_aside_and_the_store_starts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    good = JobStore(data).create(JobParams(), [small_view()], ["photo.png"])
    record = json.loads((data / "jobs" / good.id / "job.json").read_text())
    root = data / "jobs"
    bad = {
        "1" * 32: {**record, "id": "1" * 32, "created": None},  # the start-up TypeError of issue 12
        "2" * 32: "{not json",
        "3" * 32: "[1, 2]",
        "4" * 32: "[" * 100_000 + "]" * 100_000,
        "5" * 32: {**record, "results": ["../../token"]},
        "6" * 32: {**record, "params": {"seed": -3}},
        "7" * 32: {**record, "state": "zombie"},
        "not-a-job-id": record,
    }
    for folder, content in bad.items():
        write_record(root, folder, content)
    (root / ("8" * 32)).mkdir()  # a folder a crash left without its record
    escaping = {**record, "id": "../../escaped", "state": RUNNING}
    write_record(root, "9" * 32, escaping)

    with caplog.at_level(logging.WARNING, logger="amodal3r"):
        store = JobStore(data)
        requeued = store.recover()

    assert requeued == [good.id]
    assert sorted(s.id for s in store.list()) == sorted([good.id, "9" * 32])
    assert store.get("9" * 32).state == FAILED and store.get("9" * 32).error == INTERRUPTED
    assert not (tmp_path / "escaped").exists() and not (data / "escaped").exists()
    moved = sorted(p.name for p in (root / DAMAGED).iterdir())
    assert moved == sorted([*bad, "8" * 32])
    assert sorted(p.name for p in root.iterdir()) == sorted([DAMAGED, good.id, "9" * 32])
    lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(lines) == len(moved), lines
    assert any("created must be a number" in line for line in lines)
    assert any("results must be result file names" in line for line in lines)


def test_stored_views_come_back_as_checked(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "data")
    view = small_view()
    status = store.create(JobParams(seed=4), [view, small_view("other")], ["photo.png", "other.jpg"])
    assert status.state == QUEUED and status.notices == ["photo.png: a notice", "other.png: a notice"]
    loaded = store.load_views(status.id)
    assert [v.name for v in loaded] == ["photo", "other"]
    assert np.array_equal(np.asarray(loaded[0].image), np.asarray(view.image))
    assert np.array_equal(loaded[0].target, view.target) and np.array_equal(loaded[0].occluder, view.occluder)
    folder = store.folder(status.id)
    for path in (store.root, folder, folder / "inputs", folder / "results"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path


@pytest.mark.parametrize("kind", ["tmpfs", "fake"])
def test_a_full_disk_at_submission_leaves_no_job_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    with small_disk(tmp_path / "disk", monkeypatch, size_kib=2048, kind=kind) as disk:
        store = JobStore(disk.root)
        disk.fill()
        with pytest.raises(StorageError, match=rf"the data folder's disk is full: free space in {disk.root}$"):
            store.create(JobParams(), [small_view()], ["photo.png"])
        assert list(store.root.iterdir()) == [] and store.list() == []
        disk.free()
        assert store.create(JobParams(), [small_view()], ["photo.png"]).state == QUEUED


def test_a_failed_state_write_is_retried_and_a_lasting_failure_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore(tmp_path / "data")
    job = store.create(JobParams(), [small_view()], ["photo.png"])
    real, failures = job_store_module.write_atomically, []

    def flaky(path: Path, data: bytes):
        if len(failures) < budget:
            failures.append(path)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(job_store_module, "RETRY_PAUSE_S", 0.01)
    monkeypatch.setattr(job_store_module, "write_atomically", flaky)
    budget = job_store_module.WRITE_ATTEMPTS - 1
    store.update(job.id, state=RUNNING)
    on_disk = json.loads((store.folder(job.id) / "job.json").read_text())
    assert on_disk["state"] == RUNNING and len(failures) == budget

    failures.clear()
    budget = 10 * job_store_module.WRITE_ATTEMPTS
    with pytest.raises(StorageError, match="disk is full"):
        store.update(job.id, state=FAILED, error="boom")
    assert len(failures) == job_store_module.WRITE_ATTEMPTS
    assert store.get(job.id).state == RUNNING and store.get(job.id).error == ""
    assert json.loads((store.folder(job.id) / "job.json").read_text())["state"] == RUNNING

"""The job store when several processes share one data folder: the Ray Serve ingress and its replicas.

The folder is the only truth: every read goes to ``job.json``, every change is a read-modify-write
under a lock file of that job, and a cancel is a marker file the running replica sees at its next
sampler step. On several machines the folder must be a shared filesystem (NFS, CephFS, a cloud
file store) mounted at the same path everywhere, with working ``flock`` locks (NFSv4 has them).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from amodal3r.api.files import write_atomically
from amodal3r.api.protocol import CANCELLED, QUEUED, RUNNING, JobStatus

from .job_store import JobStore, is_job_id

JOB_FILE = "job.json"  # the single-process store's record of a job, read and written here the same way
LOCK_FILE = ".lock"
CANCEL_FILE = "cancel"  # present: the user asked to stop this job
REPLICA_FILE = "replica.json"  # which Ray actor runs or ran the job, for operators and fault handling


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created), held for the ``with`` block, across processes."""
    with open(path, "a+b") as handle:
        if os.name == "nt":
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
        else:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _read(path: Path) -> JobStatus | None:
    """A record being replaced is read whole (writes are atomic); a missing or broken one is no job."""
    try:
        return JobStatus.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def _write(path: Path, status: JobStatus) -> None:
    write_atomically(path, json.dumps(status.to_dict(), indent=1).encode())


class SharedJobStore(JobStore):
    """:class:`JobStore` with the data folder as the only state, so that any process sees every job."""

    def get(self, job_id: str) -> JobStatus | None:
        if not is_job_id(job_id):
            return None
        return _read(self.folder(job_id) / JOB_FILE)

    def list(self, limit: int | None = None) -> list[JobStatus]:
        jobs = [s for s in (_read(p) for p in self.root.glob(f"*/{JOB_FILE}")) if s is not None]
        return sorted(jobs, key=lambda s: s.created, reverse=True)[:limit]

    def update(self, job_id: str, persist: bool = True, **changes: object) -> JobStatus:
        """Apply ``changes`` to what is on disk now. Unpersisted changes are dropped: no other process
        could see them (progress is persisted every second or so, state changes at once)."""
        if not persist:
            return self._changed(job_id, changes)
        with file_lock(self.folder(job_id) / LOCK_FILE):
            status = self._changed(job_id, changes)
            _write(self.folder(job_id) / JOB_FILE, status)
        return status

    def _changed(self, job_id: str, changes: dict[str, object]) -> JobStatus:
        status = self.get(job_id)
        if status is None:
            raise KeyError(job_id)
        for key, value in changes.items():
            setattr(status, key, value)
        return status

    def claim(self, job_id: str) -> JobStatus | None:
        """Mark a queued job running for the caller; None when it is not queued (cancelled, already
        taken by another replica, finished)."""
        with file_lock(self.folder(job_id) / LOCK_FILE):
            status = self.get(job_id)
            if status is None or status.state != QUEUED:
                return None
            (self.folder(job_id) / CANCEL_FILE).unlink(missing_ok=True)
            status.state, status.stage, status.started = RUNNING, "loading", time.time()
            _write(self.folder(job_id) / JOB_FILE, status)
        return status

    def requeue(self, job_id: str, notice: str) -> JobStatus | None:
        """Put a job whose replica died back in the queue; None when it ended meanwhile."""
        with file_lock(self.folder(job_id) / LOCK_FILE):
            status = self.get(job_id)
            if status is None or status.final:
                return None
            status.state, status.stage, status.step, status.total = QUEUED, QUEUED, 0, 0
            status.progress, status.eta = 0.0, None
            status.notices = [*status.notices, notice]
            _write(self.folder(job_id) / JOB_FILE, status)
        return status

    def request_cancel(self, job_id: str) -> None:
        """A queued job ends at once; a running one when its replica sees the marker."""
        with file_lock(self.folder(job_id) / LOCK_FILE):
            status = self.get(job_id)
            if status is None or status.final:
                return
            write_atomically(self.folder(job_id) / CANCEL_FILE, b"")
            if status.state != RUNNING:
                status.state, status.stage, status.finished, status.eta = CANCELLED, CANCELLED, time.time(), None
                _write(self.folder(job_id) / JOB_FILE, status)

    def cancel_requested(self, job_id: str) -> bool:
        return (self.folder(job_id) / CANCEL_FILE).exists()

    def record_replica(self, job_id: str, replica: dict) -> None:
        write_atomically(self.folder(job_id) / REPLICA_FILE, json.dumps(replica).encode())

    def replica(self, job_id: str) -> dict | None:
        try:
            return json.loads((self.folder(job_id) / REPLICA_FILE).read_text())
        except (OSError, ValueError):
            return None

    def remove_partials(self, job_id: str) -> None:
        self._remove_partials(job_id)

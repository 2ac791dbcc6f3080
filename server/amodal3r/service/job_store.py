"""Jobs on disk: nothing a user submitted or received is lost when the server or Blender restarts.

Layout under the data folder: ``jobs/<id>/job.json`` (the ``JobStatus``), ``jobs/<id>/inputs/``
(the uploaded files under names the server chooses) and ``jobs/<id>/results/``. Every file is
written aside and renamed into place, so a crash leaves the old version or the new one.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path

from amodal3r.api.files import write_atomically
from amodal3r.api.protocol import (
    FAILED,
    FINAL_STATES,
    QUEUED,
    RUNNING,
    JobParams,
    JobStatus,
    view_field,
)

INTERRUPTED = (
    "the server stopped while this job was running (it crashed, was killed or the machine "
    "restarted); submit the job again"
)
KEEP_JOBS = 200  # finished jobs beyond this many are deleted, oldest first


def is_job_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


class JobStore:
    def __init__(self, data_dir: Path):
        self.root = Path(data_dir) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, JobStatus] = {}
        self._lock = threading.Lock()
        for path in sorted(self.root.glob("*/job.json")):
            status = self._read(path)
            if status is not None:
                self._jobs[status.id] = status

    def _read(self, path: Path) -> JobStatus | None:
        """A job folder that cannot be read (half-created before a crash) is left alone."""
        try:
            return JobStatus.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return None

    def recover(self) -> list[str]:
        """After a restart: jobs that were running failed, queued ones wait again (oldest first)."""
        requeue = []
        for status in self.list():
            if status.state == RUNNING:
                self.update(status.id, state=FAILED, error=INTERRUPTED, finished=time.time(), eta=None)
            elif status.state == QUEUED:
                requeue.append(status.id)
            self._remove_partials(status.id)
        return sorted(requeue, key=lambda job_id: self._jobs[job_id].created)

    def _remove_partials(self, job_id: str) -> None:
        for pattern in (".*.tmp", ".partial-*"):
            for partial in self.folder(job_id).rglob(pattern):
                partial.unlink(missing_ok=True)

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def create(self, params: JobParams, views: list[dict[str, tuple[str, bytes]]]) -> JobStatus:
        """Store the uploads (``kind -> (original name, bytes)`` per view) and a queued job."""
        job_id = secrets.token_hex(16)
        inputs = self.folder(job_id) / "inputs"
        inputs.mkdir(parents=True)
        (self.folder(job_id) / "results").mkdir()
        for index, view in enumerate(views):
            for kind, (_, data) in view.items():
                write_atomically(inputs / f"{view_field(index, kind)}.bin", data)
        names = [view["image"][0] for view in views]
        status = JobStatus(id=job_id, state=QUEUED, created=time.time(), params=vars(params), views=names, stage=QUEUED)
        with self._lock:
            self._jobs[job_id] = status
        self._save(status)
        self._prune()
        return status

    def discard(self, job_id: str) -> None:
        """Forget a job whose inputs were refused at submission."""
        with self._lock:
            self._jobs.pop(job_id, None)
        _remove_tree(self.folder(job_id))

    def input_paths(self, job_id: str) -> list[dict[str, Path]]:
        """The stored files of each view, by kind, in the order they were given."""
        views: dict[int, dict[str, Path]] = {}
        for path in sorted((self.folder(job_id) / "inputs").glob("view*.bin")):
            index, _, kind = path.stem[4:].partition("_")
            views.setdefault(int(index), {})[kind] = path
        return [views[i] for i in sorted(views)]

    def get(self, job_id: str) -> JobStatus | None:
        with self._lock:
            status = self._jobs.get(job_id)
            return JobStatus.from_dict(status.to_dict()) if status else None

    def list(self, limit: int | None = None) -> list[JobStatus]:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda s: s.created, reverse=True)
            return [JobStatus.from_dict(s.to_dict()) for s in jobs[:limit]]

    def update(self, job_id: str, persist: bool = True, **changes: object) -> JobStatus:
        with self._lock:
            status = self._jobs[job_id]
            for key, value in changes.items():
                setattr(status, key, value)
            snapshot = JobStatus.from_dict(status.to_dict())
        if persist:
            self._save(snapshot)
        return snapshot

    def _save(self, status: JobStatus) -> None:
        write_atomically(self.folder(status.id) / "job.json", json.dumps(status.to_dict(), indent=1).encode())

    def result_path(self, job_id: str, name: str) -> Path | None:
        """Only names the job itself lists are served: clients never choose a path."""
        status = self.get(job_id)
        if status is None or name not in status.results:
            return None
        path = self.folder(job_id) / "results" / name
        return path if path.is_file() else None

    def _prune(self) -> None:
        finished = [s for s in self.list() if s.state in FINAL_STATES]
        for status in finished[KEEP_JOBS:]:
            with self._lock:
                self._jobs.pop(status.id, None)
            _remove_tree(self.folder(status.id))


def _remove_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink(missing_ok=True)
    folder.rmdir()

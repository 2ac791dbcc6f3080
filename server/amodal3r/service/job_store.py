"""Jobs on disk: nothing a user submitted or received is lost when the server or Blender restarts.

Layout under the data folder: ``jobs/<id>/job.json`` (the ``JobStatus``; the folder's name is the
job's id), ``jobs/<id>/inputs/`` (each view checked and decoded once at submission, kept as
``view<i>_image.png`` and ``view<i>_labels.png``: the worker never decodes a user's file) and
``jobs/<id>/results/``. Folders are made 0700. Every file is written aside and renamed into place,
so a crash leaves the old version or the new one; ``job.json`` is written last, so a folder without
it never was a job.

A record that cannot be read or does not validate is moved to ``jobs/.damaged/`` with a log line,
and the server starts without it. A state write that fails (a full disk) is retried; when it still
fails the caller gets a ``StorageError`` and decides what to keep in memory (the worker: failed).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path

from amodal3r.api.errors import PipelineError, StorageError
from amodal3r.api.files import write_atomically
from amodal3r.api.protocol import FAILED, FINAL_STATES, QUEUED, RUNNING, JobParams, JobStatus
from amodal3r.io.inputs import View, checked_pngs, load_checked

INTERRUPTED = (
    "the server stopped while this job was running (it crashed, was killed or the machine "
    "restarted); submit the job again"
)
KEEP_JOBS = 200  # finished jobs beyond this many are deleted, oldest first
JOB_FILE = "job.json"
DAMAGED = ".damaged"
WRITE_ATTEMPTS = 3  # a failed state write is tried this often in all
RETRY_PAUSE_S = 0.2
log = logging.getLogger(__name__)


def is_job_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def private_folder(path: Path) -> Path:
    """``path`` as a folder only its owner can enter (uploads and results are the user's data)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.name == "posix":
        path.chmod(0o700)
    return path


def storage_error(error: OSError, data_dir: Path) -> StorageError:
    """A write failure as the sentence a user acts on."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"the data folder's disk is full: free space in {data_dir}")
    return StorageError(
        f"cannot write to the data folder {data_dir} ({error.strerror or error}): check its permissions and free space"
    )


def _input_files(folder: Path, index: int) -> tuple[Path, Path]:
    return folder / "inputs" / f"view{index}_image.png", folder / "inputs" / f"view{index}_labels.png"


class JobStore:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.root = private_folder(self.data_dir / "jobs")
        self._jobs: dict[str, JobStatus] = {}
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and not folder.name.startswith("."):
                self._load(folder)

    def _load(self, folder: Path) -> None:
        """Take a job folder in, or move it aside when its record is missing or invalid."""
        try:
            if not is_job_id(folder.name):
                raise ValueError("its name is not a job id")
            data = json.loads((folder / JOB_FILE).read_text())
            if not isinstance(data, dict):
                raise ValueError(f"{JOB_FILE} is not a JSON object")
            data["id"] = folder.name  # the folder says which job this is, never the record
            self._jobs[folder.name] = JobStatus.from_dict(data).validate()
        except (OSError, ValueError, RecursionError) as error:
            reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
            self._move_aside(folder, reason)

    def _move_aside(self, folder: Path, reason: str) -> None:
        damaged = private_folder(self.root / DAMAGED)
        target, n = damaged / folder.name, 1
        while target.exists():
            target, n = damaged / f"{folder.name}.{n}", n + 1
        try:
            os.replace(folder, target)
        except OSError as error:
            log.warning("job folder %s is damaged (%s) and could not be moved aside (%s)", folder, reason, error)
            return
        log.warning("job folder %s is damaged (%s): moved to %s", folder, reason, target)

    def recover(self) -> list[str]:
        """After a restart: jobs that were running failed, queued ones wait again (oldest first)."""
        requeue = []
        for status in self.list():
            if status.state == RUNNING:
                changes = {"state": FAILED, "error": INTERRUPTED, "finished": time.time(), "eta": None}
                try:
                    self.update(status.id, **changes)
                except StorageError as error:
                    log.warning("job %s: %s (its failure is kept in memory only)", status.id, error)
                    self.update(status.id, persist=False, **changes)
            elif status.state == QUEUED:
                requeue.append(status.id)
            self._remove_partials(status.id)
        return sorted(requeue, key=lambda job_id: self._jobs[job_id].created)

    def _remove_partials(self, job_id: str) -> None:
        for pattern in (".*.tmp*", ".partial-*"):
            for partial in self.folder(job_id).rglob(pattern):
                partial.unlink(missing_ok=True)

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def create(self, params: JobParams, views: list[View], names: list[str]) -> JobStatus:
        """Store checked views (with the names of the uploaded images) as a queued job.

        A write that fails removes what was written and raises ``StorageError``."""
        job_id = secrets.token_hex(16)
        folder = self.folder(job_id)
        status = JobStatus(
            id=job_id,
            state=QUEUED,
            created=time.time(),
            params=vars(params),
            views=list(names),
            stage=QUEUED,
            notices=[notice for view in views for notice in view.notices],
        )
        try:
            for path in (folder, folder / "inputs", folder / "results"):
                private_folder(path)
            for index, view in enumerate(views):
                for path, data in zip(_input_files(folder, index), checked_pngs(view), strict=True):
                    write_atomically(path, data)
            write_atomically(folder / JOB_FILE, _record(status))
        except OSError as error:
            _remove_tree(folder)
            raise storage_error(error, self.data_dir) from None
        with self._lock:
            self._jobs[job_id] = status
        self._prune()
        return JobStatus.from_dict(status.to_dict())

    def load_views(self, job_id: str) -> list[View]:
        """The checked views of a job, named after the uploaded images."""
        status = self.get(job_id)
        assert status is not None
        views = []
        for index, name in enumerate(status.views):
            image, labels = _input_files(self.folder(job_id), index)
            if not (image.is_file() and labels.is_file()):
                raise PipelineError(
                    f"the stored inputs of view {index} are missing (the job folder was changed or an older "
                    "server stored it): submit the job again"
                )
            views.append(load_checked(image, labels, Path(name).stem or f"view{index}"))
        return views

    def get(self, job_id: str) -> JobStatus | None:
        with self._lock:
            status = self._jobs.get(job_id)
            return JobStatus.from_dict(status.to_dict()) if status else None

    def list(self, limit: int | None = None) -> list[JobStatus]:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda s: s.created, reverse=True)
            return [JobStatus.from_dict(s.to_dict()) for s in jobs[:limit]]

    def update(self, job_id: str, persist: bool = True, **changes: object) -> JobStatus:
        """Change a job: ``persist`` writes the changed record first (retrying a failed write a few
        times: space may come back), and only what was written reaches memory. A write that keeps
        failing raises ``StorageError`` and changes nothing: the caller decides what to answer."""
        if not persist:
            with self._lock:
                return self._apply(job_id, changes)
        with self._save_lock:  # one job.json write at a time: the newest state lands last
            with self._lock:
                pending = JobStatus.from_dict({**self._jobs[job_id].to_dict(), **changes})
            failure = self._write(pending)
            if failure is not None:
                raise storage_error(failure, self.data_dir)
            with self._lock:
                return self._apply(job_id, changes)

    def _apply(self, job_id: str, changes: dict[str, object]) -> JobStatus:
        status = self._jobs[job_id]
        for key, value in changes.items():
            setattr(status, key, value)
        return JobStatus.from_dict(status.to_dict())

    def _write(self, status: JobStatus) -> OSError | None:
        """Write a record, trying ``WRITE_ATTEMPTS`` times; the last failure, or None."""
        failure = None
        for attempt in range(WRITE_ATTEMPTS):
            if attempt:
                time.sleep(RETRY_PAUSE_S)
            try:
                write_atomically(self.folder(status.id) / JOB_FILE, _record(status))
                return None
            except OSError as error:
                failure = error
        return failure

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


def _record(status: JobStatus) -> bytes:
    return json.dumps(status.to_dict(), indent=1).encode()


def _remove_tree(folder: Path) -> None:
    """Best effort: what cannot be removed now is left for the user (and logged)."""
    try:
        for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink(missing_ok=True)
        folder.rmdir()
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("could not remove %s (%s)", folder, error)

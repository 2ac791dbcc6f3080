# SPDX-License-Identifier: GPL-3.0-or-later
"""One reconstruction on the server, run off Blender's main thread.

No bpy here. ``JobRunner`` submits the views, polls the job and downloads its results in a worker
thread; the main thread (a timer in the UI) only reads ``status``, ``error``, ``finished`` and
``result_paths``. ``run_blocking`` does the same synchronously, for background mode and batch.py,
where timers never fire.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .backend import Backend, BackendError
from .server_package import ensure_client_importable

if TYPE_CHECKING:
    from amodal3r.api.client import Client
    from amodal3r.api.protocol import JobParams, JobStatus

POLL_SECONDS = 0.3
POLL_FAILURES = 20  # consecutive failed polls of a live server before giving up (~6 s)
DOWNLOADED = (".glb", ".png", ".ply")


class JobError(RuntimeError):
    """The reconstruction did not produce a result; the message says why and what to do."""


class JobCancelled(JobError):
    """The job was cancelled on request."""


def _server_errors() -> tuple[type[Exception], type[Exception]]:
    ensure_client_importable()
    from amodal3r.api.client import ServerError, ServerUnavailable

    return ServerError, ServerUnavailable


def _death_error(backend: Backend) -> JobError:
    code = backend.exit_code()
    tail = backend.output_tail(8)
    return JobError(f"The reconstruction server stopped while working (exit code {code}). Start the job again: "
                    "the server restarts. If it keeps stopping, lower Texture Size or Faces, or choose the CPU "
                    "device." + (f"\nIts last output:\n{tail}" if tail else ""))


def _poll(backend: Backend, client: Client, job_id: str) -> JobStatus:
    """The job's status, retrying brief hiccups of a live server."""
    server_error, unavailable = _server_errors()
    failures = 0
    while True:
        try:
            return client.job(job_id)
        except unavailable:
            if backend.settings.mode == "local" and not backend.alive():
                raise _death_error(backend) from None
            failures += 1
            if failures >= POLL_FAILURES:
                raise JobError(f"The reconstruction server stopped answering: {backend.status_text()}. "
                               "Restart the server in the add-on preferences and try again") from None
            time.sleep(POLL_SECONDS)
        except server_error as error:
            raise JobError(f"The server lost the job: {error.detail}") from None


def _download(client: Client, status: JobStatus, out_dir: Path) -> list[Path]:
    """Fetch the job's meshes first, then previews and Gaussians, into out_dir."""
    names = [n for n in status.results if Path(n).suffix in DOWNLOADED]
    names.sort(key=lambda n: (DOWNLOADED.index(Path(n).suffix), n))
    return [client.download_result(status.id, name, out_dir / name) for name in names]


def execute(backend: Backend, views: list[dict[str, str]], params: JobParams, out_dir: Path,
            on_status: Callable[[JobStatus], None], cancelled: Callable[[], bool]) -> list[Path]:
    """Submit, follow and download one job; raises JobError (JobCancelled) or BackendError."""
    server_error, unavailable = _server_errors()
    client = backend.client()
    try:
        status = client.submit(views, params)
    except server_error as error:
        raise JobError(f"The server refused the job: {error.detail}") from None
    except unavailable:
        raise _death_error(backend) if not backend.alive() else JobError(
            f"The reconstruction server did not take the job: {backend.status_text()}") from None
    except OSError as error:
        raise JobError(f"Cannot read an input file: {error}") from None
    on_status(status)
    cancel_sent = False
    while not status.final:
        if cancelled() and not cancel_sent:
            _ask_cancel(client, status.id)
            cancel_sent = True
        time.sleep(POLL_SECONDS)
        status = _poll(backend, client, status.id)
        on_status(status)
    return _finish(client, status, out_dir)


def _ask_cancel(client: Client, job_id: str) -> None:
    server_error, unavailable = _server_errors()
    try:
        client.cancel(job_id)
    except (server_error, unavailable):
        pass  # the next poll tells what happened to the job


def _finish(client: Client, status: JobStatus, out_dir: Path) -> list[Path]:
    server_error, unavailable = _server_errors()
    if status.state == "cancelled":
        raise JobCancelled("The reconstruction was cancelled")
    if status.state != "done":
        raise JobError(f"The reconstruction failed: {status.error or 'no reason given'}")
    try:
        return _download(client, status, out_dir)
    except (server_error, unavailable) as error:
        raise JobError(f"The result could not be downloaded: {error}. Try the job again") from None
    except OSError as error:
        raise JobError(f"Cannot write the result into {out_dir} ({error.strerror}): free disk space or "
                       "choose another output folder") from None


class JobRunner:
    """Runs one reconstruction in a worker thread; the main thread reads its fields."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: JobStatus | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self.error = ""  # plain words and what to do, when the job did not give a result
        self.cancelled = False  # the job ended because cancel() was asked
        self.result_paths: list[Path] = []
        self.finished = False

    @property
    def status(self) -> JobStatus | None:
        """A snapshot of the job's last known status (None until the server took it)."""
        with self._lock:
            return copy.deepcopy(self._status)

    @property
    def running(self) -> bool:
        return self._thread is not None and not self.finished

    @property
    def glb_paths(self) -> list[Path]:
        return [p for p in self.result_paths if p.suffix == ".glb"]

    def start(self, backend: Backend, views: list[dict[str, str]], params: JobParams, out_dir: Path) -> None:
        if self._thread is not None:
            raise RuntimeError("a JobRunner runs one job; make a new one for the next")
        self._thread = threading.Thread(target=self._run, args=(backend, views, params, Path(out_dir)),
                                        name="amodal3r-job", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Ask the server to stop the job; it then ends cancelled, with no results."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ended (tests, background mode); True when it did."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.finished

    def _set_status(self, status: JobStatus) -> None:
        with self._lock:
            self._status = status

    def _run(self, backend: Backend, views: list[dict[str, str]], params: JobParams, out_dir: Path) -> None:
        try:
            self.result_paths = execute(backend, views, params, out_dir, self._set_status, self._cancel.is_set)
        except JobCancelled:
            self.cancelled = True
        except (JobError, BackendError) as error:
            self.error = str(error)
        except Exception as error:  # noqa: BLE001 - a worker must report, never die silently
            self.error = f"Unexpected error in the reconstruction job: {error!r}"
        finally:
            self.finished = True


def run_blocking(backend: Backend, views: list[dict[str, str]], params: JobParams, out_dir: Path,
                 progress: Callable[[JobStatus], None] | None = None) -> list[Path]:
    """One job to the end on this thread; raises JobError or BackendError when it gives no result."""
    return execute(backend, views, params, Path(out_dir), progress or (lambda status: None), lambda: False)

# SPDX-License-Identifier: GPL-3.0-or-later
"""One reconstruction on the server: submit the views, follow the job, download its results.

No bpy here. ``start_job`` runs it as a ``Task`` in a worker thread: the task publishes each
``JobStatus`` for the panel's timer and ends with the downloaded paths as its result.
``run_blocking`` does the same synchronously, for background mode and batch.py, where timers
never fire.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from amodal3r.api.client import Client, ServerError, ServerUnavailable
from amodal3r.api.errors import Cancelled
from amodal3r.api.protocol import CANCELLED, DONE, RANDOM_WEIGHTS_NOTICE_START, RESULT_SUFFIXES, JobParams, JobStatus

from .backend import LOCAL, Backend, BackendError
from .tasks import Task

POLL_SECONDS = 0.3
POLL_FAILURES = 20  # consecutive failed polls of a live server before giving up (~6 s)


class JobError(RuntimeError):
    """The reconstruction did not produce a result; the message says why and what to do."""


class JobCancelled(JobError, Cancelled):
    """The job was cancelled on request (a ``Task`` running it ends cancelled)."""


def _death_error(backend: Backend) -> JobError:
    code = backend.exit_code()
    tail = backend.output_tail(8)
    return JobError(
        f"The reconstruction server stopped while working (exit code {code}). Start the job again: "
        "the server restarts. If it keeps stopping, lower Texture Size or Faces, or choose the CPU "
        "device." + (f"\nIts last output:\n{tail}" if tail else "")
    )


def _poll(backend: Backend, client: Client, job_id: str) -> JobStatus:
    """The job's status, retrying brief hiccups of a live server."""
    failures = 0
    while True:
        try:
            return client.job(job_id)
        except ServerUnavailable:
            if backend.settings.mode == LOCAL and not backend.alive():
                raise _death_error(backend) from None
            failures += 1
            if failures >= POLL_FAILURES:
                raise JobError(
                    f"The reconstruction server stopped answering: {backend.status_text()}. "
                    "Restart the server in the add-on preferences and try again"
                ) from None
            time.sleep(POLL_SECONDS)
        except ServerError as error:
            raise JobError(f"The server lost the job: {error.detail}") from None


def _kind(name: str) -> int:
    """A result file's place in ``RESULT_SUFFIXES``, the order to fetch them in."""
    return next(i for i, suffix in enumerate(RESULT_SUFFIXES) if name.endswith(suffix))


def _download(client: Client, status: JobStatus, out_dir: Path) -> list[Path]:
    """Fetch the job's meshes and poses first, then previews and Gaussians, into out_dir."""
    kinds = {
        n: next((i for i, suffix in enumerate(RESULT_SUFFIXES) if n.endswith(suffix)), None) for n in status.results
    }
    names = sorted((n for n, kind in kinds.items() if kind is not None), key=lambda n: (kinds[n], n))
    return [client.download_result(status.id, name, out_dir / name) for name in names]


def execute(
    backend: Backend,
    views: list[dict[str, str]],
    params: JobParams,
    out_dir: Path,
    on_status: Callable[[JobStatus], None],
    cancelled: Callable[[], bool],
) -> list[Path]:
    """Submit, follow and download one job; raises JobError (JobCancelled) or BackendError."""
    client = backend.client()
    try:
        status = client.submit(views, params)
    except ServerError as error:
        raise JobError(f"The server refused the job: {error.detail}") from None
    except ServerUnavailable:
        raise (
            _death_error(backend)
            if not backend.alive()
            else JobError(f"The reconstruction server did not take the job: {backend.status_text()}")
        ) from None
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
    try:
        client.cancel(job_id)
    except (ServerError, ServerUnavailable):
        pass  # the next poll tells what happened to the job


def _finish(client: Client, status: JobStatus, out_dir: Path) -> list[Path]:
    if status.state == CANCELLED:
        raise JobCancelled("The reconstruction was cancelled")
    if status.state != DONE:
        raise JobError(f"The reconstruction failed: {status.error or 'no reason given'}")
    try:
        return _download(client, status, out_dir)
    except (ServerError, ServerUnavailable) as error:
        raise JobError(f"The result could not be downloaded: {error}. Try the job again") from None
    except OSError as error:
        raise JobError(
            f"Cannot write the result into {out_dir} ({error.strerror}): free disk space or "
            "choose another output folder"
        ) from None


def start_job(backend: Backend, views: list[dict[str, str]], params: JobParams, out_dir: Path) -> Task[list[Path]]:
    """One job in a worker thread: the task publishes each ``JobStatus``; its result is the downloads."""

    def work(task: Task[list[Path]]) -> list[Path]:
        return execute(backend, views, params, Path(out_dir), task.publish, lambda: task.cancel_requested)

    return Task("Reconstruction", work, expected=(JobError, BackendError)).start()


def notices_of(status: JobStatus | None) -> list[str]:
    """A finished job's notices, each once, in the server's order."""
    return list(dict.fromkeys(status.notices)) if status is not None else []


def random_weights(notices: list[str]) -> bool:
    """Whether the server said its model folder holds random weights (the result is noise)."""
    return any(notice.startswith(RANDOM_WEIGHTS_NOTICE_START) for notice in notices)


def glb_paths(paths: list[Path]) -> list[Path]:
    """The meshes among a job's downloads, one per variant."""
    return [p for p in paths if p.suffix == ".glb"]


def run_blocking(
    backend: Backend,
    views: list[dict[str, str]],
    params: JobParams,
    out_dir: Path,
    progress: Callable[[JobStatus], None] | None = None,
) -> list[Path]:
    """One job to the end on this thread; raises JobError or BackendError when it gives no result."""
    return execute(backend, views, params, Path(out_dir), progress or (lambda status: None), lambda: False)

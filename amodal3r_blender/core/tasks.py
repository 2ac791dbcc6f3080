# SPDX-License-Identifier: GPL-3.0-or-later
"""``Task``: one piece of work off Blender's main thread, and what the UI reads of it.

Every background call of the add-on (Set up backend, Download models, Restart server, a
reconstruction job, a click-to-mask request) is a ``Task``: the work runs in a worker thread and
reports progress, status lines and the latest server reply into the task; a timer on the main
thread polls ``done`` and then reads ``result``, ``error`` or ``cancelled``. The work never
touches bpy, and the main thread never waits. ``run()`` does the same work inline, for
background mode (``blender -b``), where timers never fire.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from amodal3r.api.errors import Cancelled

T = TypeVar("T")

PENDING, RUNNING, DONE, FAILED, CANCELLED = "pending", "running", "done", "failed", "cancelled"
FINAL_STATES = (DONE, FAILED, CANCELLED)
LOG_LINES = 400  # kept for the preferences' log box


class Task(Generic[T]):
    """A Future-like handle on ``work(task)``: state, progress, log, result or error, cancel.

    ``expected`` exceptions are failures the person can act on: their message becomes ``error``
    as it is. Any other exception becomes ``explain(error)``, by default a line naming the task,
    so a worker never dies silently. ``Cancelled`` raised by the work ends the task cancelled.
    """

    def __init__(
        self,
        title: str,
        work: Callable[[Task[T]], T],
        *,
        expected: tuple[type[BaseException], ...] = (),
        explain: Callable[[Exception], str] | None = None,
        echo: bool = False,
    ):
        self.title = title
        self.echo = echo  # print log lines: background mode has no window to show them
        self.state = PENDING
        self.progress = 0.0  # 0..1, for a progress bar
        self.status = title  # one line for the progress bar
        self.lines: deque[str] = deque(maxlen=LOG_LINES)
        self.result: T | None = None
        self.error = ""
        self._work = work
        self._expected = expected
        self._explain = explain or self._unexpected
        self._latest: Any = None
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    # --- for the main thread ----------------------------------------------------------------

    def start(self) -> Task[T]:
        """Run the work in a daemon thread (Blender may quit while it runs); returns the task."""
        if self.state != PENDING:
            raise RuntimeError(f"{self.title} has already run: make a new task")
        self.state = RUNNING
        self._thread = threading.Thread(target=self._run, name=f"amodal3r-{self.title}", daemon=True)
        self._thread.start()
        return self

    def run(self) -> Task[T]:
        """Run the work on this thread, to the end; returns the task."""
        if self.state != PENDING:
            raise RuntimeError(f"{self.title} has already run: make a new task")
        self.state = RUNNING
        self._run()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the work ended (tests, background mode); True when it did."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.done

    def cancel(self) -> None:
        """Ask the work to stop; it checks ``cancel_requested`` where stopping is safe."""
        self._cancel.set()

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def cancelled(self) -> bool:
        return self.state == CANCELLED

    @property
    def latest(self) -> Any:
        """The last value the work published (e.g. a job's status), None before the first."""
        with self._lock:
            return self._latest

    # --- for the work -----------------------------------------------------------------------

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def log(self, line: str) -> None:
        """A line for the log box; it becomes the status line too."""
        self.lines.append(line)
        self.status = line
        if self.echo:
            print(f"amodal3r: {line}", flush=True)

    def publish(self, value: Any) -> None:
        """Hand the main thread a new value to show; readers get it whole, never half-written."""
        with self._lock:
            self._latest = value

    # --- inside ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.result = self._work(self)
            self.state = DONE
        except Cancelled:
            self.state = CANCELLED
        except self._expected as error:
            self._fail(str(error))
        except Exception as error:  # noqa: BLE001 - shown to the person instead of a lost traceback
            self._fail(self._explain(error))

    def _fail(self, message: str) -> None:
        self.error = message
        self.state = FAILED

    def _unexpected(self, error: Exception) -> str:
        return f"{self.title} failed unexpectedly: {error!r}"

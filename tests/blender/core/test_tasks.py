# SPDX-License-Identifier: GPL-3.0-or-later
"""``Task``, the one handle on every background call: outcomes, progress, cancelling, inline runs."""

from __future__ import annotations

import threading

import pytest

from amodal3r.api.errors import Cancelled
from amodal3r_blender.core.tasks import Task


class Refused(RuntimeError):
    """A failure the person can act on."""


def test_result_and_published_values():
    release = threading.Event()

    def work(task: Task[int]) -> int:
        task.publish({"step": 1})
        task.progress = 0.5
        release.wait(10)
        return 42

    task = Task("Count", work).start()
    assert task.running and not task.done and task.result is None
    release.set()
    assert task.wait(10)
    assert task.result == 42 and task.error == "" and not task.cancelled
    assert task.latest == {"step": 1} and task.progress == 0.5


def test_expected_errors_keep_their_message():
    def work(task: Task[None]) -> None:
        raise Refused("The server refused the job: no target")

    task = Task("Reconstruction", work, expected=(Refused,)).start()
    assert task.wait(10)
    assert task.error == "The server refused the job: no target" and task.result is None


def test_unexpected_errors_name_the_task():
    task = Task("Download models", lambda task: 1 / 0).start()
    assert task.wait(10)
    assert task.error == "Download models failed unexpectedly: ZeroDivisionError('division by zero')"
    explained = Task("Click-to-mask", lambda task: 1 / 0, explain=lambda error: f"no mask: {error}").start()
    assert explained.wait(10) and explained.error == "no mask: division by zero"


def test_cancel_reaches_the_work_and_ends_cancelled():
    def work(task: Task[None]) -> None:
        while not task.cancel_requested:
            task.status = "waiting"
        raise Cancelled("stopped on request")

    task = Task("Wait", work).start()
    task.cancel()
    assert task.wait(10)
    assert task.cancelled and task.error == "" and task.result is None


def test_run_inline_logs_and_echoes(capsys):
    def work(task: Task[str]) -> str:
        task.log("step one")
        task.log("step two")
        return "ready"

    task = Task("Set up backend", work, echo=True).run()
    assert task.done and task.result == "ready"
    assert list(task.lines) == ["step one", "step two"] and task.status == "step two"
    assert "amodal3r: step one" in capsys.readouterr().out


def test_a_task_runs_once():
    task = Task("Once", lambda task: None).run()
    with pytest.raises(RuntimeError, match="already run"):
        task.start()

# SPDX-License-Identifier: GPL-3.0-or-later
"""The add-on's server side without Blender: the backend (local and remote) and reconstruction jobs
as background tasks, against a real server with tiny weights."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

from amodal3r.api.protocol import JobParams
from amodal3r_blender.core import jobs
from amodal3r_blender.core.backend import (
    Backend,
    BackendError,
    BackendSettings,
    get_backend,
    stop_backend,
)

TINY_JOB = JobParams(structure_steps=2, slat_steps=2, texture_size=256, faces=5000)


# --- backend errors that need no server ---------------------------------------------------------


def _settings(tmp_path: Path, **changes) -> BackendSettings:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "pipeline.json").write_text("{}")
    base = {"python": sys.executable, "model_dir": str(model), "data_dir": str(tmp_path / "data"), "device": "cpu"}
    return BackendSettings(**{**base, **changes})


@pytest.mark.parametrize(
    ("python", "message"),
    [
        ("", "No server Python is set: run Set up backend"),
        ("/nonexistent/python", "does not exist: run Set up backend"),
    ],
)
def test_missing_python(tmp_path, python, message):
    with pytest.raises(BackendError, match=message):
        Backend(_settings(tmp_path, python=python)).client()


def test_missing_model(tmp_path):
    with pytest.raises(BackendError, match="no pipeline.json: Download models or set the model folder"):
        Backend(_settings(tmp_path, model_dir=str(tmp_path / "empty"))).client()
    with pytest.raises(BackendError, match="No model folder is set: Download models"):
        Backend(_settings(tmp_path, model_dir="")).client()


def test_server_that_cannot_start(tmp_path):
    # This interpreter (Blender's) has no amodal3r server package installed.
    backend = Backend(_settings(tmp_path, python=sys.executable), startup_timeout=60)
    with pytest.raises(BackendError, match=r"(?s)did not start.*No module named.*Set up backend"):
        backend.client()
    assert not backend.alive()


def test_unknown_mode(tmp_path):
    with pytest.raises(BackendError, match="local or remote"):
        Backend(_settings(tmp_path, mode="cloud"))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_remote_errors(tmp_path):
    with pytest.raises(BackendError, match="No remote server URL"):
        Backend(BackendSettings(mode="remote")).client()
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(BackendError, match="check the remote URL"):
        Backend(BackendSettings(mode="remote", url=url, token="x", online_access=False)).client()
    with pytest.raises(BackendError, match="needs Online Access"):
        Backend(BackendSettings(mode="remote", url="http://192.0.2.1:8765", online_access=False)).client()


def test_get_backend_is_one_per_settings(tmp_path):
    first = get_backend(_settings(tmp_path))
    assert get_backend(_settings(tmp_path)) is first
    second = get_backend(_settings(tmp_path, device="auto"))
    assert second is not first
    stop_backend()


# --- a real server with tiny weights ------------------------------------------------------------


@pytest.fixture(scope="module")
def local(server_python, tiny_model_dir, tmp_path_factory) -> Backend:
    data = tmp_path_factory.mktemp("server-data")
    backend = Backend(
        BackendSettings(python=server_python, model_dir=str(tiny_model_dir), data_dir=str(data), device="cpu")
    )
    yield backend
    backend.stop()


def _views(example_dir: Path) -> list[dict[str, str]]:
    return [
        {
            "image": str(example_dir / "image.png"),
            "target_mask": str(example_dir / "target_mask.png"),
            "occluder_mask": str(example_dir / "occluder_mask.png"),
        }
    ]


def test_local_server_restarts_after_dying(local):
    assert local.client().health()["status"] == "ok"
    assert local.alive() and "running at http://127.0.0.1:" in local.status_text()
    first_pid = local._server.process.pid
    local._server.process.kill()
    local._server.process.wait()
    assert not local.alive()
    assert local.client().health()["status"] == "ok"
    assert local._server.process.pid != first_pid
    assert "had stopped (exit code -9) and was restarted" in local.died_message
    assert "restarted" in local.status_text()


def test_remote_mode_with_token(local):
    local.client()
    server = local._server
    remote = Backend(BackendSettings(mode="remote", url=server.url, token=server.token))
    assert remote.client().health()["status"] == "ok" and remote.alive()
    with pytest.raises(BackendError, match="refused the token"):
        Backend(BackendSettings(mode="remote", url=server.url, token="wrong")).client()


def test_job_task_downloads_results(local, example_dir, tmp_path):
    task = jobs.start_job(local, _views(example_dir), TINY_JOB, tmp_path)
    assert task.running
    assert task.wait(240), "the tiny job did not finish in 4 minutes"
    assert task.error == "" and not task.cancelled
    assert [p.name for p in task.result] == ["variant0.glb", "variant0.png"]
    assert jobs.glb_paths(task.result)[0].read_bytes()[:4] == b"glTF"
    assert task.latest.state == "done" and task.latest.progress == 1.0


def test_job_task_cancel(local, example_dir, tmp_path):
    task = jobs.start_job(local, _views(example_dir), TINY_JOB, tmp_path)
    task.cancel()
    assert task.wait(120)
    assert task.cancelled and task.error == "" and not task.result
    assert task.latest.state == "cancelled"


def test_run_blocking_reports_refused_input(local, tmp_path, example_dir):
    bad_mask = tmp_path / "mask.png"
    bad_mask.write_text("not a png")
    with pytest.raises(jobs.JobError, match="refused the job"):
        jobs.run_blocking(
            local, [{"image": str(example_dir / "image.png"), "mask": str(bad_mask)}], TINY_JOB, tmp_path / "out"
        )


def test_job_task_reports_server_death(local, example_dir, tmp_path):
    task = jobs.start_job(local, _views(example_dir), TINY_JOB, tmp_path)
    deadline = time.monotonic() + 120
    while (task.latest is None or task.latest.state != "running") and time.monotonic() < deadline:
        time.sleep(0.1)
    local._server.process.kill()
    assert task.wait(60)
    assert "stopped while working" in task.error and "Start the job again" in task.error
    assert not task.result
    assert local.client().health()["status"] == "ok"  # and the next job gets a new server

# SPDX-License-Identifier: GPL-3.0-or-later
"""The add-on's server side without Blender: backend, backend setup plans, background jobs."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from amodal3r_blender import backend_setup, jobs
from amodal3r_blender.backend import (
    Backend,
    BackendError,
    BackendSettings,
    get_backend,
    stop_backend,
)
from amodal3r_blender.backend_setup import (
    PlatformInfo,
    SetupCancelled,
    SetupError,
    plan_install,
)
from amodal3r_blender.server_package import ensure_client_importable

ensure_client_importable()
from amodal3r.api.protocol import JobParams

TINY_JOB = JobParams(structure_steps=2, slat_steps=2, texture_size=256, faces=5000)

# --- setup plans: every platform, nothing installed ---------------------------------------------


def _torch_command(info: PlatformInfo) -> list[str]:
    commands = plan_install(info, "/venv/bin/python", "/ext/wheels/amodal3r-0.1.0-py3-none-any.whl")
    return next(c for c in commands if "torch" in c)


def _index(command: list[str]) -> str | None:
    return command[command.index("--index-url") + 1] if "--index-url" in command else None


@pytest.fixture(autouse=True)
def _no_index_override(monkeypatch):
    monkeypatch.delenv(backend_setup.INDEX_ENV, raising=False)


@pytest.mark.parametrize(("info", "index"), [
    (PlatformInfo("Linux", "x86_64"), "https://download.pytorch.org/whl/cpu"),
    (PlatformInfo("Linux", "x86_64", cuda=(12, 4)), "https://download.pytorch.org/whl/cu126"),
    (PlatformInfo("Linux", "x86_64", cuda=(12, 9)), "https://download.pytorch.org/whl/cu128"),
    (PlatformInfo("Windows", "AMD64", cuda=(13, 0)), "https://download.pytorch.org/whl/cu130"),
    (PlatformInfo("Windows", "AMD64"), "https://download.pytorch.org/whl/cpu"),
    (PlatformInfo("Windows", "ARM64"), "https://download.pytorch.org/whl/cpu"),
    (PlatformInfo("Linux", "x86_64", rocm=(6, 4)), "https://download.pytorch.org/whl/rocm6.4"),
    (PlatformInfo("Linux", "x86_64", rocm=(6, 3)), "https://download.pytorch.org/whl/rocm6.3"),
    (PlatformInfo("Linux", "x86_64", cuda=(11, 8)), "https://download.pytorch.org/whl/cpu"),
    (PlatformInfo("Linux", "x86_64", rocm=(5, 7)), "https://download.pytorch.org/whl/cpu"),
    (PlatformInfo("Darwin", "arm64"), None),
])
def test_torch_index_per_platform(info, index):
    command = _torch_command(info)
    assert _index(command) == index
    assert "torch" in command and "torchvision" in command  # one index for both: timm needs torchvision


def test_cpu_fallback_says_why():
    assert "update it" in backend_setup.choose_torch(PlatformInfo("Linux", "x86_64", cuda=(11, 8))).label
    assert "no NVIDIA or AMD GPU" in backend_setup.choose_torch(PlatformInfo("Linux", "x86_64")).label


def test_intel_mac_has_no_pytorch():
    with pytest.raises(SetupError, match="Remote"):
        plan_install(PlatformInfo("Darwin", "x86_64"), "py", "pkg")


def test_index_override(monkeypatch):
    monkeypatch.setenv(backend_setup.INDEX_ENV, "https://mirror.example/torch")
    assert _index(_torch_command(PlatformInfo("Linux", "x86_64", cuda=(12, 8)))) == "https://mirror.example/torch"


def test_plan_order():
    wheel = "/ext/wheels/amodal3r-0.1.0-py3-none-any.whl"
    commands = plan_install(PlatformInfo("Linux", "x86_64"), "/venv/bin/python", wheel)
    assert all(c[0] == "/venv/bin/python" for c in commands)
    assert commands[0][-2:] == ["--upgrade", "pip"]
    assert commands[2][-1] == wheel and "--no-deps" not in commands[2]  # dependencies after torch
    assert commands[3][-3:] == ["--force-reinstall", "--no-deps", wheel]
    assert commands[4][1] == "-c" and "import torch, amodal3r" in commands[4][2]


def test_detect_cuda_reads_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '| NVIDIA-SMI 550.54   Driver Version: 550.54   CUDA Version: 12.4 |'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert backend_setup.detect_cuda() == (12, 4)


def test_detect_cuda_without_nvidia(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert backend_setup.detect_cuda() is None


def test_venv_python_layout(tmp_path):
    expected = "Scripts/python.exe" if sys.platform == "win32" else "bin/python"
    assert backend_setup.venv_python(tmp_path) == tmp_path / expected


# --- running setup commands ---------------------------------------------------------------------


def test_run_command_streams_lines():
    lines: list[str] = []
    backend_setup.run_command([sys.executable, "-c", "print('one'); print('two')"], lines.append, lambda: False)
    assert lines[1:] == ["one", "two"] and lines[0].startswith("$ ")


def test_run_command_failure_shows_output():
    with pytest.raises(SetupError, match=r"(?s)exit code 3.*boom.*run Set up backend again"):
        backend_setup.run_command([sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
                                  lambda line: None, lambda: False)


def test_run_command_cancel_stops_the_child():
    started = time.monotonic()
    deadline = started + 0.5
    with pytest.raises(SetupCancelled):
        backend_setup.run_command([sys.executable, "-c", "import time; time.sleep(60)"], lambda line: None,
                                  lambda: time.monotonic() > deadline)
    assert time.monotonic() - started < 15


def test_missing_base_python_is_a_setup_error(tmp_path):
    with pytest.raises(SetupError, match="cannot run"):
        backend_setup.create_venv(tmp_path / "venv", str(tmp_path / "no-python"), lambda line: None, lambda: False)


def test_create_venv_then_reuse(tmp_path):
    lines: list[str] = []
    python = backend_setup.create_venv(tmp_path / "venv", sys.executable, lines.append, lambda: False)
    assert python.is_file()
    assert backend_setup.create_venv(tmp_path / "venv", sys.executable, lines.append, lambda: False) == python
    assert "using the existing environment" in lines[-1]


# --- backend errors that need no server ---------------------------------------------------------


def _settings(tmp_path: Path, **changes) -> BackendSettings:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "pipeline.json").write_text("{}")
    base = {"python": sys.executable, "model_dir": str(model), "data_dir": str(tmp_path / "data"), "device": "cpu"}
    return BackendSettings(**{**base, **changes})


@pytest.mark.parametrize(("python", "message"), [
    ("", "No server Python is set: run Set up backend"),
    ("/nonexistent/python", "does not exist: run Set up backend"),
])
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
    backend = Backend(BackendSettings(python=server_python, model_dir=str(tiny_model_dir), data_dir=str(data),
                                      device="cpu"))
    yield backend
    backend.stop()


def _views(example_dir: Path) -> list[dict[str, str]]:
    return [{"image": str(example_dir / "image.png"), "target_mask": str(example_dir / "target_mask.png"),
             "occluder_mask": str(example_dir / "occluder_mask.png")}]


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


def test_job_runner_downloads_results(local, example_dir, tmp_path):
    runner = jobs.JobRunner()
    runner.start(local, _views(example_dir), TINY_JOB, tmp_path)
    assert runner.running
    assert runner.wait(240), "the tiny job did not finish in 4 minutes"
    assert runner.error == "" and not runner.cancelled
    assert [p.name for p in runner.result_paths] == ["variant0.glb", "variant0.png"]
    assert runner.glb_paths[0].read_bytes()[:4] == b"glTF"
    assert runner.status.state == "done" and runner.status.progress == 1.0


def test_job_runner_cancel(local, example_dir, tmp_path):
    runner = jobs.JobRunner()
    runner.start(local, _views(example_dir), TINY_JOB, tmp_path)
    runner.cancel()
    assert runner.wait(120)
    assert runner.cancelled and runner.error == "" and runner.result_paths == []
    assert runner.status.state == "cancelled"


def test_run_blocking_reports_refused_input(local, tmp_path, example_dir):
    bad_mask = tmp_path / "mask.png"
    bad_mask.write_text("not a png")
    with pytest.raises(jobs.JobError, match="refused the job"):
        jobs.run_blocking(local, [{"image": str(example_dir / "image.png"), "mask": str(bad_mask)}], TINY_JOB,
                          tmp_path / "out")


def test_job_runner_reports_server_death(local, example_dir, tmp_path):
    runner = jobs.JobRunner()
    runner.start(local, _views(example_dir), TINY_JOB, tmp_path)
    deadline = time.monotonic() + 120
    while (runner.status is None or runner.status.state != "running") and time.monotonic() < deadline:
        time.sleep(0.1)
    local._server.process.kill()
    assert runner.wait(60)
    assert "stopped while working" in runner.error and "Start the job again" in runner.error
    assert runner.result_paths == []
    assert local.client().health()["status"] == "ok"  # and the next job gets a new server

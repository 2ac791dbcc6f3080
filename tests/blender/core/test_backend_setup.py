# SPDX-License-Identifier: GPL-3.0-or-later
"""Set up backend without Blender: the PyTorch build per platform, the install plan, running its commands."""

from __future__ import annotations

import os
import sys
import time

import pytest

from amodal3r.api.environment import TORCH_INDEX_URL
from amodal3r_blender.core import backend_setup
from amodal3r_blender.core.backend_setup import PlatformInfo, SetupCancelled, SetupError, plan_install

# --- setup plans: every platform, nothing installed ---------------------------------------------


def _torch_command(info: PlatformInfo) -> list[str]:
    commands = plan_install(info, "/venv/bin/python", "/ext/wheels/amodal3r-0.1.0-py3-none-any.whl")
    return next(c for c in commands if "torch" in c)


def _index(command: list[str]) -> str | None:
    return command[command.index("--index-url") + 1] if "--index-url" in command else None


@pytest.fixture(autouse=True)
def _no_index_override(monkeypatch):
    monkeypatch.delenv(TORCH_INDEX_URL, raising=False)


@pytest.mark.parametrize(
    ("info", "index"),
    [
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
    ],
)
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
    monkeypatch.setenv(TORCH_INDEX_URL, "https://mirror.example/torch")
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
        backend_setup.run_command(
            [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], lambda line: None, lambda: False
        )


def test_run_command_cancel_stops_the_child():
    started = time.monotonic()
    deadline = started + 0.5
    with pytest.raises(SetupCancelled):
        backend_setup.run_command(
            [sys.executable, "-c", "import time; time.sleep(60)"],
            lambda line: None,
            lambda: time.monotonic() > deadline,
        )
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

# SPDX-License-Identifier: GPL-3.0-or-later
"""Set up backend: a virtual environment with PyTorch and the bundled server package.

No bpy here. Blender's own Python (``sys.executable``) makes the venv, so the server runs on the
same Python version the wheel was tested with. ``plan_install`` picks the PyTorch build for the
machine (CUDA by the driver's version, ROCm, Apple MPS, else CPU) and is a pure function, so every
platform's plan is tested without installing anything.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from amodal3r.api.environment import TORCH_INDEX_URL

TORCH_INDEX = "https://download.pytorch.org/whl"
# PyTorch's CUDA builds, newest first, with the lowest driver CUDA version each runs on (CUDA's minor
# version compatibility lets a 12.x build run on any 12.x driver; Blackwell GPUs need cu128).
CUDA_BUILDS = (((13, 0), "cu130"), ((12, 8), "cu128"), ((12, 0), "cu126"))
ROCM_BUILDS = (((6, 4), "rocm6.4"), ((6, 3), "rocm6.3"))
TORCH_PACKAGES = ["torch", "torchvision"]  # torchvision (timm needs it) must come from the same index


class SetupError(RuntimeError):
    """Setting up the backend failed; the message says what to do."""


class SetupCancelled(SetupError):
    """The person cancelled the setup."""


@dataclass(frozen=True)
class PlatformInfo:
    system: str  # platform.system(): Linux, Windows, Darwin
    machine: str  # platform.machine(): x86_64, AMD64, arm64, aarch64
    cuda: tuple[int, int] | None = None  # the CUDA version the NVIDIA driver supports
    rocm: tuple[int, int] | None = None  # the installed ROCm version (Linux)


@dataclass(frozen=True)
class TorchChoice:
    index_url: str | None  # None: the default index (PyPI)
    label: str  # for the log, e.g. "CUDA 12.8 (cu128)"


def _version(text: str) -> tuple[int, int] | None:
    match = re.search(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _output(command: list[str]) -> str:
    try:
        return subprocess.run(command, check=False, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def detect_cuda() -> tuple[int, int] | None:
    """The driver's CUDA version from ``nvidia-smi`` ("CUDA Version: 12.4"), None without NVIDIA."""
    if shutil.which("nvidia-smi") is None:
        return None
    match = re.search(r"CUDA Version:\s*([\d.]+)", _output(["nvidia-smi"]))
    return _version(match.group(1)) if match else None


def detect_rocm() -> tuple[int, int] | None:
    """The ROCm version on Linux (``/opt/rocm/.info/version``), when ``rocminfo`` is installed."""
    if shutil.which("rocminfo") is None:
        return None
    version_file = Path(os.environ.get("ROCM_PATH", "/opt/rocm")) / ".info" / "version"
    if version_file.is_file():
        return _version(version_file.read_text())
    match = re.search(r"Runtime Version:\s*([\d.]+)", _output(["rocminfo"]))
    return _version(match.group(1)) if match else None


def detect_platform() -> PlatformInfo:
    system = platform.system()
    return PlatformInfo(
        system,
        platform.machine(),
        cuda=detect_cuda() if system != "Darwin" else None,
        rocm=detect_rocm() if system == "Linux" else None,
    )


def _newest_fitting(version: tuple[int, int], builds) -> str | None:
    return next((tag for needed, tag in builds if version >= needed), None)


def choose_torch(info: PlatformInfo) -> TorchChoice:
    """The PyTorch build for this machine (the environment's index URL overrides it, e.g. for a mirror
    or a newer CUDA); raises SetupError where none exists."""
    if os.environ.get(TORCH_INDEX_URL):
        return TorchChoice(os.environ[TORCH_INDEX_URL], f"from {TORCH_INDEX_URL}")
    if info.system == "Darwin":
        if info.machine != "arm64":
            raise SetupError(
                "PyTorch no longer publishes builds for Intel Macs: run the server on another "
                "machine and choose Remote in the add-on preferences"
            )
        return TorchChoice(None, "Apple silicon (MPS)")
    if info.cuda is not None:
        tag = _newest_fitting(info.cuda, CUDA_BUILDS)
        if tag is not None:
            return TorchChoice(f"{TORCH_INDEX}/{tag}", f"NVIDIA CUDA {info.cuda[0]}.{info.cuda[1]} driver ({tag})")
    if info.system == "Linux" and info.rocm is not None:
        tag = _newest_fitting(info.rocm, ROCM_BUILDS)
        if tag is not None:
            return TorchChoice(f"{TORCH_INDEX}/{tag}", f"AMD ROCm {info.rocm[0]}.{info.rocm[1]} ({tag})")
    reason = _cpu_reason(info)
    return TorchChoice(f"{TORCH_INDEX}/cpu", f"CPU only{reason}")


def _cpu_reason(info: PlatformInfo) -> str:
    if info.cuda is not None:
        return f" (the NVIDIA driver supports CUDA {info.cuda[0]}.{info.cuda[1]}; update it for GPU support)"
    if info.rocm is not None:
        return f" (ROCm {info.rocm[0]}.{info.rocm[1]} is older than PyTorch supports)"
    return " (no NVIDIA or AMD GPU found)"


def plan_install(info: PlatformInfo, python: str | Path, package: str | Path) -> list[list[str]]:
    """The commands that install PyTorch and the server package into the venv of ``python``."""
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    choice = choose_torch(info)
    torch = [*pip, *TORCH_PACKAGES] + (["--index-url", choice.index_url] if choice.index_url else [])
    return [
        [*pip, "--upgrade", "pip"],
        torch,
        [*pip, str(package)],  # its other dependencies, from PyPI; torch is already satisfied
        [*pip, "--force-reinstall", "--no-deps", str(package)],  # the bundled version, even if one is installed
        [str(python), "-c", CHECK_SCRIPT],
    ]


CHECK_SCRIPT = (
    "import torch, amodal3r, amodal3r.service.app; "
    "gpu = 'cuda' if torch.cuda.is_available() "
    "else 'mps' if torch.backends.mps.is_available() else 'none'; "
    "print(f'amodal3r {amodal3r.__version__}, torch {torch.__version__}, GPU: {gpu}')"
)


def venv_python(venv_dir: str | Path) -> Path:
    """The interpreter inside a venv on this platform."""
    venv_dir = Path(venv_dir)
    return venv_dir / "Scripts" / "python.exe" if sys.platform == "win32" else venv_dir / "bin" / "python"


def run_command(command: list[str], log: Callable[[str], None], cancelled: Callable[[], bool]) -> None:
    """Run one command, passing each output line to ``log``; stop it when ``cancelled()``."""
    log("$ " + " ".join(command))
    try:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            bufsize=1,
        )
    except OSError as error:
        raise SetupError(f"cannot run {command[0]} ({error.strerror})") from None
    tail: deque[str] = deque(maxlen=15)
    watcher = threading.Thread(target=_stop_when_cancelled, args=(process, cancelled), daemon=True)
    watcher.start()
    for line in process.stdout:  # type: ignore[union-attr]
        line = line.rstrip()
        tail.append(line)
        log(line)
    code = process.wait()
    if cancelled():
        raise SetupCancelled("Set up backend was cancelled; run it again to finish")
    if code != 0:
        lines = "\n".join(tail)
        raise SetupError(
            f"{' '.join(command[:5])} ... failed (exit code {code}):\n{lines}\n"
            "Check the internet connection and disk space, then run Set up backend again"
        )


def _stop_when_cancelled(process: subprocess.Popen, cancelled: Callable[[], bool]) -> None:
    while process.poll() is None:
        if cancelled():
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
            return
        try:
            process.wait(0.2)
        except subprocess.TimeoutExpired:
            pass


def create_venv(venv_dir: Path, base_python: str, log: Callable[[str], None], cancelled: Callable[[], bool]) -> Path:
    """A venv at venv_dir (kept when it already works); returns its Python."""
    python = venv_python(venv_dir)
    if python.is_file():
        log(f"using the existing environment {venv_dir}")
        return python
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    run_command([base_python, "-m", "venv", str(venv_dir)], log, cancelled)
    if not python.is_file():
        raise SetupError(f"{base_python} made no environment at {venv_dir}: its venv module may be missing")
    return python


def run_setup(
    venv_dir: str | Path,
    package: str | Path,
    log: Callable[[str], None],
    cancelled: Callable[[], bool] = lambda: False,
    *,
    base_python: str = sys.executable,
    info: PlatformInfo | None = None,
) -> Path:
    """Create the venv and install PyTorch and the server package; returns the venv's Python."""
    info = info or detect_platform()
    choice = choose_torch(info)
    log(f"PyTorch build: {choice.label}")
    python = create_venv(Path(venv_dir), base_python, log, cancelled)
    for command in plan_install(info, python, package):
        run_command(command, log, cancelled)
    log(f"done: the server Python is {python}")
    return python

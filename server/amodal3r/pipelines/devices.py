"""Which device a run uses when the user says ``auto``, and how the CPU is set up for a run."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

import torch

from amodal3r.api.errors import InputError


def available_devices() -> list[str]:
    """What ``--device`` can name on this machine."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return names


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
GLIBC_MMAP_MAX_DEFAULT, GLIBC_TRIM_THRESHOLD_DEFAULT = 65536, 128 * 1024
KEEP_FREED_BYTES = 1 << 30


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """``auto`` (or None) prefers CUDA, then Apple's MPS, then the CPU; a named device must exist."""
    if isinstance(name, torch.device):
        return name
    if name not in (None, "auto"):
        return _checked(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _checked(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    usable = device is not None and (
        device.type == "cpu"
        or (device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count())
        or (device.type == "mps" and _mps_available())
    )
    if not usable:
        raise InputError(
            f"device {name!r} is not available here; available: {', '.join(available_devices())} (or auto)"
        )
    return device


def physical_cores(cpuinfo: Path = Path("/proc/cpuinfo")) -> int:
    """Physical cores this process may use. A second hardware thread of a core adds little to
    dense linear algebra and slows it when the two contend, so torch gets one thread per core."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = _linux_cores(cpuinfo) if sys.platform.startswith("linux") else _sysctl_cores()
    return max(1, min(usable, cores or usable))


def _linux_cores(cpuinfo: Path) -> int | None:
    """Distinct (physical id, core id) pairs of ``/proc/cpuinfo``; None when it does not say."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    cores, package = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            cores.add((package, value.strip()))
    return len(cores) or None


def _sysctl_cores() -> int | None:
    """macOS: ``hw.physicalcpu``; elsewhere None (the logical count is used)."""
    if sys.platform != "darwin":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    value, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
    if libc.sysctlbyname(b"hw.physicalcpu", ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
        return None
    return value.value or None


def keep_freed_memory(enable: bool = True) -> bool:
    """Let glibc keep freed memory for reuse instead of handing big blocks back to the system.

    A large tensor is otherwise a fresh ``mmap`` whose every page faults on first touch; inside a
    virtual machine that costs as much as the arithmetic of a gather (measured: an index_select
    producing 276 MB took 150 ms fresh, 32 ms reusing memory). Nothing changes in the results.
    Returns whether it took effect (glibc on Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mmap_max, trim = (0, KEEP_FREED_BYTES) if enable else (GLIBC_MMAP_MAX_DEFAULT, GLIBC_TRIM_THRESHOLD_DEFAULT)
    return bool(mallopt(M_MMAP_MAX, mmap_max)) and bool(mallopt(M_TRIM_THRESHOLD, trim))


def release_freed_memory() -> bool:
    """Hand the memory glibc keeps for reuse back to the system (``malloc_trim``): for a server that
    unloads its models when idle, or has just decoded a large upload in a worker thread (freed blocks
    stay in that thread's arena otherwise). Returns whether it ran (glibc on Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def configure_cpu(threads: int | None = None) -> int:
    """Set up this process for a run: ``threads`` torch threads (default: the physical cores) and
    freed memory kept for reuse. Returns the thread count."""
    threads = threads or physical_cores()
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    keep_freed_memory()
    return threads

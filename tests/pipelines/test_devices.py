"""Device choice, the physical core count and the CPU set-up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from amodal3r.pipelines.devices import (
    configure_cpu,
    keep_freed_memory,
    physical_cores,
    pick_device,
    release_freed_memory,
)


def test_auto_device_is_a_device() -> None:
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    assert pick_device("cpu") == torch.device("cpu")


def test_physical_cores_count_cores_not_hardware_threads(tmp_path: Path) -> None:
    # Two packages, two cores each, two hardware threads per core: 4 cores, 8 logical CPUs.
    entries = [f"processor\t: {i}\nphysical id\t: {i // 4}\ncore id\t\t: {i % 2}\nsiblings\t: 4\n" for i in range(8)]
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("\n".join(entries))
    import os

    usable = len(os.sched_getaffinity(0))
    assert physical_cores(cpuinfo) == min(usable, 4)
    assert physical_cores(tmp_path / "missing") == usable  # unknown: every usable CPU


def test_configure_cpu_sets_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_cpu(1) == 1 and torch.get_num_threads() == 1
        assert configure_cpu() == physical_cores()
        with pytest.raises(ValueError, match="at least 1"):
            configure_cpu(-2)
    finally:
        torch.set_num_threads(before)
        keep_freed_memory(False)


def test_freed_memory_switch_round_trips() -> None:
    assert keep_freed_memory(True) == keep_freed_memory(False)  # glibc: both True; elsewhere both False


def test_release_freed_memory_runs() -> None:
    import sys

    assert release_freed_memory() == sys.platform.startswith("linux")

"""Which device a run uses when the user says ``auto``."""

from __future__ import annotations

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

"""Which device a run uses when the user says ``auto``."""

from __future__ import annotations

import torch


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """``auto`` (or None) prefers CUDA, then Apple's MPS, then the CPU."""
    if isinstance(name, torch.device):
        return name
    if name not in (None, "auto"):
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")

"""Writing files so that a crash or a full disk never leaves a half-written one in place."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def _aside(path: Path) -> Path:
    """A temporary name beside ``path`` that keeps its suffix (writers pick the format by it)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")


def write_via_temp(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Let ``write(temporary)`` fill a file beside ``path``, then rename it over ``path``.

    Readers see the old file or the whole new one; a failure leaves nothing behind. Permissions
    follow the umask like any new file.
    """
    path = Path(path)
    partial = _aside(path)
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def write_atomically(path: str | Path, data: bytes) -> Path:
    """``data`` into ``path`` through :func:`write_via_temp`."""
    return write_via_temp(path, lambda partial: partial.write_bytes(data))

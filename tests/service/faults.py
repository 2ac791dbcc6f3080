"""A data folder whose disk can be filled up: a real small tmpfs where mounting is allowed (root, as
here and in CI), otherwise a size-limited fake of the server's write calls (the job store's and the
click-to-mask image store's ``write_atomically``). ``SmallDisk.kind`` says which one a test got."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import amodal3r.service.images as images_module
import amodal3r.service.job_store as job_store_module

FILLER = "filler.bin"


class SmallDisk:
    """``fill()`` leaves no free byte, ``free()`` gives the space back."""

    def __init__(self, root: Path, kind: str, size: int):
        self.root, self.kind, self.size = root, kind, size
        self.used = 0  # the fake's count of bytes written

    def fill(self) -> None:
        self.used = self.size
        if self.kind == "tmpfs":
            fd = os.open(self.root / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                for chunk in (1 << 16, 1 << 12, 1):  # down to the last byte
                    try:
                        while True:
                            os.write(fd, b"\0" * chunk)
                    except OSError as error:
                        assert error.errno == errno.ENOSPC, error
            finally:
                os.close(fd)

    def free(self) -> None:
        self.used = 0
        (self.root / FILLER).unlink(missing_ok=True)

    def take(self, path: Path, data: bytes) -> None:
        """The fake's accounting of one write: refused like a full disk past the size."""
        if self.used + len(data) > self.size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.used += len(data)


def _mount_tmpfs(folder: Path, size_kib: int) -> bool:
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs", str(folder)], capture_output=True
    )
    return done.returncode == 0


@contextmanager
def small_disk(
    folder: Path, monkeypatch: pytest.MonkeyPatch, size_kib: int = 8192, kind: str = "tmpfs"
) -> Iterator[SmallDisk]:
    """``folder`` on a disk of ``size_kib`` KiB that a test can fill: a tmpfs when ``kind`` asks for one
    and mounting is permitted, else the fake."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "tmpfs" and _mount_tmpfs(folder, size_kib):
        try:
            yield SmallDisk(folder, "tmpfs", size_kib * 1024)
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=False)
        return
    disk = SmallDisk(folder, "fake", size_kib * 1024)
    for module in (job_store_module, images_module):
        real = module.write_atomically

        def refusing(path, data, real=real):
            disk.take(path, data)
            return real(path, data)

        monkeypatch.setattr(module, "write_atomically", refusing)
    yield disk

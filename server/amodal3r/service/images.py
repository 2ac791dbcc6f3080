"""Images uploaded for click-to-mask, kept on disk under their SHA-256 while they are in use.

The least recently used go first once there are more than ``KEEP_SEGMENT_IMAGES`` of them or they
weigh more than ``KEEP_SEGMENT_IMAGE_BYTES`` together (the newest always stays). A file's
modification time is its last use, so the order survives a restart. An expired image's id answers
404 and the client uploads the image again.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from amodal3r.api.files import write_atomically
from amodal3r.api.protocol import KEEP_SEGMENT_IMAGE_BYTES, KEEP_SEGMENT_IMAGES

from .job_store import private_folder, storage_error

SUFFIX = ".bin"


class ImageStore:
    def __init__(self, folder: Path, max_count: int = KEEP_SEGMENT_IMAGES, max_bytes: int = KEEP_SEGMENT_IMAGE_BYTES):
        self.folder, self.max_count, self.max_bytes = private_folder(folder), max_count, max_bytes
        self._lock = threading.Lock()
        self._expire()

    def put(self, data: bytes) -> str:
        """Keep an (already checked) image; the same image uploaded twice is one file and one id."""
        image_id = hashlib.sha256(data).hexdigest()
        path = self.folder / f"{image_id}{SUFFIX}"
        with self._lock:
            try:
                if path.is_file():
                    os.utime(path)
                else:
                    write_atomically(path, data)
            except OSError as error:
                raise storage_error(error, self.folder.parent) from None
            self._expire()
        return image_id

    def path(self, image_id: str) -> Path | None:
        """The file of a kept image, marked as just used; None when it expired or never was."""
        path = self.folder / f"{image_id}{SUFFIX}"
        with self._lock:
            try:
                os.utime(path)
            except OSError:
                return None
        return path

    @property
    def ids(self) -> list[str]:
        """Kept images, most recently used first."""
        return [path.stem for path, _ in self._files()]

    def _files(self) -> list[tuple[Path, int]]:
        files = []
        for path in self.folder.glob(f"*{SUFFIX}"):
            try:
                stat = path.stat()
            except OSError:
                continue
            files.append((stat.st_mtime_ns, path, stat.st_size))
        return [(path, size) for _, path, size in sorted(files, reverse=True)]

    def _expire(self) -> None:
        total = 0
        for count, (path, size) in enumerate(self._files(), start=1):
            total += size
            if count > 1 and (count > self.max_count or total > self.max_bytes):
                path.unlink(missing_ok=True)

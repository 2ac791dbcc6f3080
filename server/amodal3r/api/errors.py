"""One family of errors: each message says what went wrong and what to do.

A caller that wants every expected failure (bad input, a missing model, a cancelled run) catches
:class:`Amodal3RError`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class Amodal3RError(Exception):
    """Base of every error this package raises on purpose."""


class InputError(Amodal3RError, ValueError):
    """An image, mask or setting the reconstruction cannot use, with the file and the fix."""


class ProtocolError(InputError):
    """A request that does not follow the server protocol; the message says what to change."""


class CheckpointError(Amodal3RError, ValueError):
    """A model file or folder that cannot be loaded as it is."""


class PipelineError(Amodal3RError, RuntimeError):
    """A run that cannot produce a result."""


class DownloadError(Amodal3RError, RuntimeError):
    """A download that failed; the message names each file and where to put it by hand."""


class StorageError(Amodal3RError, OSError):
    """A file the server must keep could not be written (a full disk, a read-only folder)."""


class Cancelled(Amodal3RError):
    """The caller asked to stop; raised at the next point where stopping is safe."""

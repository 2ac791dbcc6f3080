# SPDX-License-Identifier: GPL-3.0-or-later
"""The reconstruction server the add-on talks to: a local child process or a remote URL.

No bpy here: the operators turn preferences into ``BackendSettings`` and ask ``get_backend`` for a
``Backend``, whose ``client()`` starts (or restarts) the local server on demand. Errors are
``BackendError``s whose message says what to do, ready for ``self.report``.
"""

from __future__ import annotations

import atexit
import json
import shutil
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from amodal3r.api.client import Client, LocalServer, ServerError, ServerUnavailable, launch_server
from amodal3r.api.environment import TOKEN

LOCAL, REMOTE = "local", "remote"
STARTUP_TIMEOUT = 180.0  # importing torch on a cold disk can take a minute
SETUP_HINT = "run Set up backend in the Amodal3R add-on preferences, or set the server Python there"
MODEL_HINT = "Download models or set the model folder in the Amodal3R add-on preferences"


class BackendError(RuntimeError):
    """The server cannot be reached or started; the message says what to do."""


@dataclass(frozen=True)
class BackendSettings:
    """Everything that decides which server to use; a change means a different server."""

    mode: str = LOCAL  # "local" | "remote"
    python: str = ""  # local: the Python with the amodal3r server package and torch
    model_dir: str = ""  # local: folder with pipeline.json
    data_dir: str = ""  # local: the server's jobs, uploads and results
    url: str = ""  # remote
    token: str = ""  # remote
    device: str = "auto"  # local: auto, cpu, cuda, mps
    online_access: bool = True  # remote: Blender's Online Access; without it only loopback URLs are used


def _python_problem(python: str) -> str | None:
    if not python:
        return f"No server Python is set: {SETUP_HINT}"
    if not Path(python).is_file() and shutil.which(python) is None:
        return f"The server Python {python} does not exist: {SETUP_HINT}"
    return None


def _model_problem(model_dir: str) -> str | None:
    if not model_dir:
        return f"No model folder is set: {MODEL_HINT}"
    if not (Path(model_dir) / "pipeline.json").is_file():
        return f"The model folder {model_dir} has no pipeline.json: {MODEL_HINT}"
    return None


def holds_random_weights(model_dir: str) -> bool:
    """Whether the folder's pipeline.json marks it as ``amodal3r tiny-weights`` made it: its files are
    all "present", so Download models would keep them, yet every result is noise."""
    try:
        pipeline = json.loads((Path(model_dir) / "pipeline.json").read_text())
    except (OSError, ValueError):
        return False
    args = pipeline.get("args") if isinstance(pipeline, dict) else None
    return isinstance(args, dict) and args.get("tiny_random_weights") is True


class Backend:
    """One server for one ``BackendSettings``; thread-safe, so workers may call ``client()`` too."""

    def __init__(self, settings: BackendSettings, startup_timeout: float = STARTUP_TIMEOUT):
        if settings.mode not in (LOCAL, REMOTE):
            raise BackendError(f"unknown backend mode {settings.mode!r}: use local or remote")
        self.settings = settings
        self.startup_timeout = startup_timeout
        self.died_message = ""  # set when the local server was found dead (and restarted)
        self._lock = threading.RLock()
        self._server: LocalServer | None = None
        self._remote: Client | None = None
        self._starting = False
        self._atexit_registered = False

    def client(self, require_model: bool = True) -> Client:
        """A client of a running server, starting the local one if needed.

        ``require_model=False`` allows a model folder without weights yet (to download them).
        """
        with self._lock:
            if self.settings.mode == REMOTE:
                return self._remote_client()
            return self._local_client(require_model)

    # The readers below take no lock: the UI draws them while a worker may hold it starting the server.

    def alive(self) -> bool:
        """Whether the local server process runs (remote: whether a connection was made)."""
        if self.settings.mode == REMOTE:
            return self._remote is not None
        server = self._server
        return server is not None and server.alive()

    def stop(self) -> None:
        """Stop the local server (terminate, then kill); forget a remote connection."""
        with self._lock:
            server, self._server, self._remote = self._server, None, None
            self.died_message = ""
        if server is not None:
            server.stop()

    def output_tail(self, lines: int = 12) -> str:
        """The local server's last output lines, for error messages."""
        server = self._server
        return server.tail(lines) if server is not None else ""

    def exit_code(self) -> int | None:
        server = self._server
        return server.process.poll() if server is not None else None

    def status_text(self) -> str:
        """One line for the preferences and panels."""
        if self.settings.mode == REMOTE:
            state = "connected" if self._remote is not None else "not connected yet"
            return f"Remote server {self.settings.url}: {state}"
        server = self._server
        if self._starting:
            text = "Local server: starting"
        elif server is None:
            text = "Local server: not running (starts with the first job)"
        elif server.alive():
            text = f"Local server: running at {server.url} (pid {server.process.pid})"
        else:
            text = f"Local server: stopped (exit code {server.process.poll()})"
        return f"{text} (it had stopped unexpectedly and was restarted)" if self.died_message else text

    # --- local ------------------------------------------------------------------------------

    def _local_client(self, require_model: bool) -> Client:
        if self._server is not None:
            if self._server.alive():
                return self._server.client()
            self.died_message = self._death_notice(self._server)
            self._server = None
        problem = _python_problem(self.settings.python) or (
            _model_problem(self.settings.model_dir) if require_model else None
        )
        if problem:
            raise BackendError(problem)
        self._starting = True
        try:
            self._server = self._launch()
        finally:
            self._starting = False
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        return self._server.client()

    def _launch(self) -> LocalServer:
        settings = self.settings
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        Path(settings.model_dir).mkdir(parents=True, exist_ok=True)
        try:
            return launch_server(
                settings.python,
                settings.model_dir,
                settings.data_dir,
                extra_args=["--device", settings.device.lower() or "auto"],
                startup_timeout=self.startup_timeout,
            )
        except ServerUnavailable as error:
            raise BackendError(
                f"The reconstruction server did not start. {_last_lines(str(error))}\n"
                f"If the server Python lacks the amodal3r package or PyTorch, {SETUP_HINT}; "
                "another server using the same data folder must be stopped first"
            ) from None
        except OSError as error:
            raise BackendError(
                f"Cannot run the server Python {settings.python} ({error.strerror}): {SETUP_HINT}"
            ) from None

    @staticmethod
    def _death_notice(server: LocalServer) -> str:
        tail = server.tail(8)
        return f"The reconstruction server had stopped (exit code {server.process.poll()}) and was restarted." + (
            f" Its last output:\n{tail}" if tail else ""
        )

    # --- remote -----------------------------------------------------------------------------

    def _remote_client(self) -> Client:
        if self._remote is not None:
            return self._remote
        url = self.settings.url.strip()
        if not url:
            raise BackendError("No remote server URL is set: enter it in the Amodal3R add-on preferences")
        if not self.settings.online_access and not _is_loopback(url):
            raise BackendError(
                f"Reaching the server at {url} needs Online Access: allow it in "
                "Preferences > System, or run the server on this computer (Local)"
            )
        client = Client(url, self.settings.token)
        try:
            client.health()
        except ServerUnavailable as error:
            raise BackendError(f"{error}: check the remote URL and that the server runs there") from None
        except ServerError as error:
            if error.status in (401, 403):
                raise BackendError(
                    f"The server at {url} refused the token: copy the token the server prints "
                    f"(or {TOKEN}) into the add-on preferences"
                ) from None
            raise BackendError(f"The server at {url} answered: {error.detail}") from None
        self._remote = client
        return client


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _last_lines(text: str, lines: int = 12) -> str:
    return "\n".join(text.splitlines()[-lines:])


_current: Backend | None = None
_current_lock = threading.Lock()


def get_backend(settings: BackendSettings) -> Backend:
    """The add-on's one backend; new settings stop the old server and make a new backend."""
    global _current
    with _current_lock:
        old = _current
        if old is not None and old.settings == settings:
            return old
        _current = Backend(settings)
    if old is not None:
        old.stop()
    return _current


def current_backend() -> Backend | None:
    """The backend made last, without starting anything (for status lines)."""
    return _current


def stop_backend() -> None:
    """Stop the add-on's server, if any (unregister, Stop server)."""
    global _current
    with _current_lock:
        old, _current = _current, None
    if old is not None:
        old.stop()

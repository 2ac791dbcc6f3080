"""Joining a Ray cluster, for ``amodal3r batch --ray`` and ``amodal3r serve --ray``.

Ray is an optional extra (``pip install 'amodal3r[ray]'``): nothing here imports it before it is
needed, and a missing Ray or an unreachable cluster is one clear InputError (exit 2 at the CLI),
never a minute of retries.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

from amodal3r.api.environment import ATTN_BACKEND, HF_OFFLINE, SPARSE_CONV
from amodal3r.api.errors import InputError

LOCAL = "local"  # --ray without an address: a Ray started for this run on this machine
AUTO = "auto"  # the cluster `ray start` runs on this machine (RAY_ADDRESS or Ray's own note of it)
NAMESPACE = "amodal3r"
REACH_TIMEOUT = 5.0  # seconds to open a connection to the cluster's address before giving up
INSTALL_HINT = "--ray needs Ray: pip install 'amodal3r[ray]' (or pip install 'ray[serve]') into this Python"
# Environment the Ray workers need to run this same code with the same switches.
FORWARDED_ENV = ("PYTHONPATH", ATTN_BACKEND, SPARSE_CONV, HF_OFFLINE)


@dataclass(frozen=True)
class Replicas:
    """How many pipelines to run and what each one holds."""

    count: int | None = None  # None: one per GPU (or one when the cluster has none)
    gpus: float | None = None  # per replica; None: 1 when the cluster has GPUs, else 0
    cpus: float = 1.0

    def check(self) -> Replicas:
        if self.count is not None and self.count < 1:
            raise InputError(f"--replicas must be at least 1, got {self.count}")
        if self.gpus is not None and self.gpus < 0:
            raise InputError(f"--gpus-per-replica cannot be negative, got {self.gpus}")
        if self.cpus <= 0:
            raise InputError(f"--cpus-per-replica must be more than 0, got {self.cpus}")
        return self

    def resolved(self, cluster_gpus: float) -> Replicas:
        """Defaults filled in from the cluster's resources."""
        gpus = self.gpus if self.gpus is not None else (1.0 if cluster_gpus >= 1 else 0.0)
        count = self.count if self.count is not None else max(1, int(cluster_gpus // gpus) if gpus else 1)
        return Replicas(count, gpus, self.cpus)

    def device(self, requested: str) -> str:
        """A replica without a GPU computes on the CPU whatever GPUs its machine has."""
        return "cpu" if requested == "auto" and not self.gpus else requested


def require_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return ray


def connect(address: str | None) -> ModuleType:
    """Ray, joined to the cluster at ``address`` (None: a new local one; ``auto``: the one on this
    machine). Already joined (a test, a Ray job): that cluster."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    options = dict(
        namespace=NAMESPACE,
        log_to_driver=False,  # the workers' logs stay in Ray's session folder: the progress bar stays readable
        logging_level=logging.WARNING,
        runtime_env={"env_vars": forwarded_env()},
    )
    if address in (None, LOCAL):
        # a Ray for this run only: on loopback, so nothing of it is reachable from the network
        ray.init(address=LOCAL, include_dashboard=False, _node_ip_address="127.0.0.1", **options)
        return ray
    target = resolve_address(address)
    check_reachable(target)
    try:
        ray.init(address=target, **options)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as error:  # e.g. a wrong token
        raise InputError(f"cannot join the Ray cluster at {target}: {first_line(error)}") from None
    return ray


def forwarded_env() -> dict[str, str]:
    return {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}


def resolve_address(address: str) -> str:
    """``auto`` as Ray resolves it (RAY_ADDRESS, else the cluster file ``ray start`` writes)."""
    if address != AUTO:
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    note = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        return note.read_text().strip()
    except OSError:
        raise InputError(
            "--ray auto: no Ray cluster runs on this machine; start one (ray start --head) or give its address"
        ) from None


def check_reachable(address: str) -> None:
    """Something must accept connections at ``host:port`` (or ``ray://host:port``): Ray itself would
    retry for minutes."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise InputError(
            f"--ray {address}: expected HOST:PORT (the head's GCS port, 6379 by default) or ray://HOST:PORT"
        )
    try:
        socket.create_connection((host, port), timeout=REACH_TIMEOUT).close()
    except OSError as error:
        raise InputError(
            f"no Ray cluster answers at {address} ({error.strerror or error}): start it "
            "(ray start --head) or check the address"
        ) from None


def cluster_gpus(ray: ModuleType) -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def first_line(error: BaseException) -> str:
    """An error in one line (Ray's errors run to pages)."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]

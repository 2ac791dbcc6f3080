"""``amodal3r serve --ray``: the server's HTTP protocol as a Ray Serve application.

Two deployments. ``Ingress`` is the FastAPI app of ``app.py`` (same routes, token and OpenAPI) on
one replica; it stores each job in the shared data folder and hands its id to ``Reconstructor``,
whose N replicas (each one pipeline on its own GPU, or CPU threads, running one job at a time) Ray
Serve routes jobs to, queueing the rest, scaling between min and max replicas on that queue. A
replica writes the job's progress and results into the data folder (``shared_store.py``), so that
status, cancel and results work whichever replica ran it. A replica that dies mid-job (its actor,
its machine) fails its request: the ingress puts the job back in the queue once, then fails it
with the reason. Ray is imported only when an application is built.

``build_app`` is also the import path of the Ray Serve config file ``server/serve.yaml``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from amodal3r import __version__
from amodal3r.api.environment import TOKEN
from amodal3r.api.files import write_atomically
from amodal3r.api.protocol import (
    CANCELLED,
    FAILED,
    LISTENING_PREFIX,
    MAX_UPLOAD_BYTES,
    PROTOCOL_VERSION,
    QUEUED,
    RUNNING,
    STATE_FILE,
)

from .app import Server, ServerConfig, bind, guarded_app, load_token, lock_data_dir
from .job_store import INTERRUPTED
from .ray_cluster import NAMESPACE, Replicas, cluster_gpus, connect, first_line
from .shared_store import SharedJobStore
from .worker import ModelRuntime, Worker

APP_NAME = "amodal3r"
INGRESS, RECONSTRUCTOR = "Ingress", "Reconstructor"
SERVE_NAMESPACE = "serve"  # where Ray Serve names its replica actors
ATTEMPTS = 2  # a job whose replica dies runs once more, then fails with the reason
GRACEFUL_STOP = 120.0  # seconds a replica being removed may take to finish its job


@dataclass
class ServeOptions:
    """Everything ``build_app`` needs; also the ``args`` of an application in ``serve.yaml``."""

    model_dir: str
    data_dir: str
    device: str = "auto"
    dtype: str | None = None
    replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: autoscale on the queue of jobs
    max_replicas: int | None = None
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    sam_checkpoints: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: dict) -> ServeOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown amodal3r application args {unknown}; known: {sorted(known)}")
        return cls(**args)

    def server_config(self) -> ServerConfig:
        return ServerConfig(
            model_dir=Path(self.model_dir),
            data_dir=Path(self.data_dir),
            device=self.device,
            dtype=self.dtype,
            max_upload_bytes=self.max_upload_bytes,
            sam_checkpoints={kind: Path(path) for kind, path in self.sam_checkpoints.items()},
        )

    def scaling(self) -> dict:
        """Serve deployment options: a fixed count, or autoscaling on ongoing plus queued jobs."""
        if self.min_replicas is None and self.max_replicas is None:
            return {"num_replicas": self.replicas}
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got {low}, {high}")
        initial = min(max(self.replicas, low), high)
        return {
            "autoscaling_config": {
                "min_replicas": low,
                "max_replicas": high,
                "initial_replicas": initial,
                "target_ongoing_requests": 1,
            }
        }

    def describe(self) -> str:
        count = self.replicas if self.min_replicas is None and self.max_replicas is None else "autoscaled"
        return f"ray: {count} replica(s), {self.gpus_per_replica:g} GPU and {self.cpus_per_replica:g} CPU each"


class ReplicaWorker(Worker):
    """The single-process worker's job run, on a Serve replica: no queue of its own (Serve routes the
    jobs), the cancel request is the marker file in the shared folder."""

    store: SharedJobStore
    _earlier_notices: list[str] = []  # the running job's notices from before this run (reassigned, never changed)

    def is_cancelled(self, job_id: str) -> bool:
        return self.store.cancel_requested(job_id)

    def run_job(self, job_id: str, replica: dict) -> str:
        """Run one job if it is still queued; returns its final state."""
        status = self.store.claim(job_id)
        if status is None:
            current = self.store.get(job_id)
            return current.state if current is not None else FAILED
        self.store.record_replica(job_id, replica)
        self.current, self._earlier_notices = job_id, status.notices
        try:
            self._run(job_id, status.started or time.time())
        finally:
            self.current, self._earlier_notices = None, []
        final = self.store.get(job_id)
        return final.state if final is not None else FAILED

    def _finish(self, job_id: str, started: float, state: str, **changes: object) -> None:
        """Keep what the job was told before this run (a retry's reason) ahead of this run's notices."""
        if "notices" in changes:
            new = list(changes["notices"])  # type: ignore[call-overload]
            changes["notices"] = [n for n in self._earlier_notices if n not in new] + new
        super()._finish(job_id, started, state, **changes)


class Reconstructor:
    """A Serve replica: one pipeline, one job at a time (``max_ongoing_requests=1``)."""

    def __init__(self, options: dict):
        import ray
        import torch

        opts = ServeOptions.from_args(options)
        torch.set_num_threads(max(1, round(opts.cpus_per_replica)))
        dtype = getattr(torch, opts.dtype) if opts.dtype else None
        device = Replicas(gpus=opts.gpus_per_replica).device(opts.device)
        runtime = ModelRuntime(Path(opts.model_dir), device, dtype, idle_unload=math.inf)
        self.worker = ReplicaWorker(SharedJobStore(Path(opts.data_dir)), runtime)
        context = ray.get_runtime_context()
        self.identity = {
            "actor": context.get_actor_name(),
            "namespace": SERVE_NAMESPACE,
            "node": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
        }

    async def run(self, job_id: str) -> str:
        """The job runs in a thread: the replica's event loop stays free for Serve's health checks."""
        return await asyncio.to_thread(self.worker.run_job, job_id, self.identity)


class Dispatcher:
    """The ingress side of the worker interface ``app.py`` uses: submit, cancel, queue length."""

    def __init__(self, store: SharedJobStore, reconstructor):
        self.store, self.reconstructor = store, reconstructor
        self._tasks: dict[str, asyncio.Task] = {}

    def submit(self, job_id: str) -> None:
        """Called on the ingress's event loop (from the async submit route, or at start-up)."""
        task = asyncio.get_running_loop().create_task(self._dispatch(job_id))
        self._tasks[job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job_id, None))

    def cancel(self, job_id: str) -> None:
        self.store.request_cancel(job_id)

    @property
    def alive(self) -> bool:
        """Jobs are handed to the replicas from the ingress's own event loop: it works while the ingress
        answers (a replica's death is handled per job, in :meth:`_dispatch`)."""
        return True

    @property
    def queue_length(self) -> int:
        return sum(s.state == QUEUED for s in self.store.list())

    @property
    def current(self) -> str | None:
        running = self.running()
        return running[0] if running else None

    def running(self) -> list[str]:
        return [s.id for s in self.store.list() if s.state == RUNNING]

    async def _dispatch(self, job_id: str) -> None:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                await self.reconstructor.run.remote(job_id)
                return
            except Exception as error:  # noqa: BLE001 - the replica died, or Serve could not reach one
                reason = first_line(error)
            if self.store.cancel_requested(job_id):
                self._end(job_id, CANCELLED)
                return
            notice = f"the replica running this job stopped ({reason}); the job ran again on another replica"
            if attempt < ATTEMPTS and self.store.requeue(job_id, notice) is not None:
                continue
            self._end(
                job_id, FAILED, f"the replica running this job stopped {attempt} time(s): {reason}; submit it again"
            )
            return

    def _end(self, job_id: str, state: str, error: str = "") -> None:
        status = self.store.get(job_id)
        if status is not None and not status.final:
            stage = state if state == CANCELLED else status.stage
            self.store.update(job_id, state=state, stage=stage, error=error, finished=time.time(), eta=None)

    def recover(self, alive) -> None:
        """At ingress start: queued jobs are sent again (a replica takes each once), running jobs whose
        replica is gone failed (``alive(replica)`` says whether that actor lives)."""
        for status in sorted(self.store.list(), key=lambda s: s.created):
            if status.state == QUEUED:
                self.submit(status.id)
            elif status.state == RUNNING and not alive(self.store.replica(status.id)):
                self.store.update(status.id, state=FAILED, error=INTERRUPTED, finished=time.time(), eta=None)
                self.store.remove_partials(status.id)


class RayServer(Server):
    """The single-process server's state with the shared store and the dispatcher in place of its own."""

    def __init__(self, config: ServerConfig, token: str, reconstructor, description: str):
        super().__init__(config, token)
        self.store = SharedJobStore(config.data_dir)
        self.worker = Dispatcher(self.store, reconstructor)  # type: ignore[assignment]
        self.description = description

    def start(self) -> None:
        self.worker.recover(_actor_alive)

    def info(self) -> dict:
        info = super().info()
        info["device"] = self.description
        info["running_jobs"] = self.worker.running()
        return info


def _actor_alive(replica: dict | None) -> bool:
    import ray

    if not replica:
        return False
    try:
        ray.get_actor(replica["actor"], namespace=replica.get("namespace", SERVE_NAMESPACE))
    except (ValueError, KeyError):
        return False
    return True


class Ingress:
    """The HTTP side: ``app.py``'s routes and token guard over :class:`RayServer`."""

    async def __init__(self, reconstructor, options: dict):
        opts = ServeOptions.from_args(options)
        config = opts.server_config()
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.server = RayServer(config, load_token(config.data_dir), reconstructor, opts.describe())
        self.server.start()

    def __serve_build_asgi_app__(self):
        return guarded_app(self.server, self.server.config.host)


def build_app(args: dict):
    """The Serve application (``import_path`` of ``serve.yaml``, whose ``args`` are :class:`ServeOptions`)."""
    from ray import serve

    options = ServeOptions.from_args(args)
    plain = asdict(options)
    reconstructor = serve.deployment(
        Reconstructor,
        name=RECONSTRUCTOR,
        max_ongoing_requests=1,
        graceful_shutdown_timeout_s=GRACEFUL_STOP,
        ray_actor_options={"num_gpus": options.gpus_per_replica, "num_cpus": options.cpus_per_replica},
        **options.scaling(),
    ).bind(plain)
    ingress_env = {TOKEN: os.environ[TOKEN]} if os.environ.get(TOKEN) else {}
    ingress = serve.deployment(
        serve.ingress()(Ingress),
        name=INGRESS,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": ingress_env}},
    )
    return ingress.bind(reconstructor, plain)


def free_port(host: str) -> int:
    """A port nothing listens on now (Serve's proxies need a number, not 0)."""
    sock = bind(host, 0)
    port = sock.getsockname()[1]
    sock.close()
    return port


def serve_on_ray(
    config: ServerConfig, address: str | None, replicas: Replicas, scale: tuple[int | None, int | None]
) -> int:
    """Deploy the application on the cluster, print where it listens, and remove it on SIGTERM/SIGINT."""
    ray = connect(address)
    from ray import serve

    config.data_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_data_dir(config.data_dir)
    load_token(config.data_dir)  # the ingress reads the same file (or AMODAL3R_TOKEN)
    placed = replicas.resolved(cluster_gpus(ray))
    options = ServeOptions(
        model_dir=str(config.model_dir.resolve()),
        data_dir=str(config.data_dir.resolve()),
        device=config.device,
        dtype=config.dtype,
        replicas=placed.count or 1,
        min_replicas=scale[0],
        max_replicas=scale[1],
        gpus_per_replica=placed.gpus or 0.0,
        cpus_per_replica=placed.cpus,
        max_upload_bytes=config.max_upload_bytes,
        sam_checkpoints={kind: str(path) for kind, path in config.sam_checkpoints.items()},
    )
    port = config.port or free_port(config.host)
    print(f"deploying on Ray: {options.describe()}", file=sys.stderr, flush=True)
    stop = _stop_event()
    serve.start(http_options={"host": config.host, "port": port})
    try:
        serve.run(build_app(asdict(options)), name=APP_NAME, route_prefix="/")
        url = f"http://{f'[{config.host}]' if ':' in config.host else config.host}:{port}"
        state = {"url": url, "pid": os.getpid(), "protocol": PROTOCOL_VERSION, "version": __version__}
        state |= {"started": time.time(), "ray": ray.get_runtime_context().gcs_address, "namespace": NAMESPACE}
        write_atomically(config.data_dir / STATE_FILE, json.dumps(state).encode())
        print(f"{LISTENING_PREFIX}{url}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        (config.data_dir / STATE_FILE).unlink(missing_ok=True)
        serve.delete(APP_NAME)
        lock.close()
        ray.shutdown()
    return 0


def _stop_event() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop

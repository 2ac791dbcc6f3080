"""``amodal3r batch --ray``: the items spread over Ray actors, each holding one loaded pipeline.

The driver reads each item's files and sends their bytes; the actor reconstructs in a temporary
folder and sends the result files back, which the driver writes atomically. So the workers need
the model, not the batch's folders. An actor that dies (its process or its machine) takes its item
with it: the item runs once more on another actor, and a replacement actor starts.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from amodal3r.api.files import write_atomically
from amodal3r.io.batch_inputs import BatchItem

from .batch import DONE, FAILED, BatchSpec, Outcome, Reporter, output_paths, reconstruct_item
from .ray_cluster import Replicas, first_line
from .worker import ModelRuntime

ATTEMPTS = 2  # an item whose actor dies runs once more, then fails with the reason
WAIT = 1.0  # seconds between looks at the cluster while items run (the progress bar's ETA moves)
SLOW_START = 60.0  # seconds without any ready actor before saying what the replicas wait for

Payload = list[dict[str, tuple[str, bytes]]]  # per view: kind -> (file name, bytes)


class ItemActor:
    """One pipeline on one Ray worker (its GPU, or CPU threads), reconstructing the items it is sent."""

    def __init__(self, spec: BatchSpec, device: str, threads: int):
        self.spec, self.device, self.threads = spec, device, threads
        self.runtime: ModelRuntime | None = None

    def ready(self) -> str:
        """Find the model and check its folder (the models load with the first item); return where this
        actor runs. Raises what keeps the model from loading, as an error of this call, not a dead actor."""
        import torch

        from amodal3r.weights.hub import resolve_model

        torch.set_num_threads(max(1, self.threads))
        dtype = getattr(torch, self.spec.dtype) if self.spec.dtype else None
        self.runtime = ModelRuntime(resolve_model(self.spec.model), self.device, dtype, idle_unload=math.inf)
        return f"{socket.gethostname()} ({self.runtime.pipeline().device}, pid {os.getpid()})"

    def run(self, name: str, views: Payload) -> tuple[Outcome, dict[str, bytes]]:
        with tempfile.TemporaryDirectory(prefix="amodal3r-item-") as tmp:
            folder = Path(tmp)
            item = BatchItem(name, [_unpack(folder, index, view) for index, view in enumerate(views)])
            paths = output_paths(folder / "out", name, self.spec.params)
            paths[0].parent.mkdir()
            assert self.runtime is not None, "ready() runs first"
            outcome = reconstruct_item(self.runtime, item, self.spec.params, paths[0])
            files = {p.name: p.read_bytes() for p in paths if p.is_file()} if outcome.status == DONE else {}
        return outcome, files


def _unpack(folder: Path, index: int, view: dict[str, tuple[str, bytes]]) -> dict[str, Path]:
    """One view's files under their own names (messages name them), in a folder of their own."""
    place = folder / f"view{index}"
    place.mkdir()
    paths = {}
    for kind, (filename, data) in view.items():
        paths[kind] = place / f"{kind}_{Path(filename).name}"
        paths[kind].write_bytes(data)
    return paths


def pack(item: BatchItem) -> Payload:
    return [{kind: (path.name, path.read_bytes()) for kind, path in view.items()} for view in item.views]


@dataclass
class _Running:
    actor: object
    item: BatchItem | None  # None: the actor's ready() call


class RayExecutor:
    """Items over ``replicas.count`` actors; each item runs on whichever actor is free first."""

    def __init__(self, ray: ModuleType, spec: BatchSpec, replicas: Replicas, out_dir: Path):
        self.ray, self.spec, self.replicas, self.out_dir = ray, spec, replicas, out_dir
        self.actor_class = ray.remote(num_cpus=replicas.cpus, num_gpus=replicas.gpus, max_restarts=0)(ItemActor)
        self.actors: list = []
        self.attempts: dict[str, int] = {}

    def run(self, items: list[BatchItem], report: Reporter) -> None:
        queue, running, idle = deque(items), {}, []
        for _ in range(self.replicas.count or 1):
            self._start_actor(running)
        report.say(
            f"starting {self.replicas.count or 1} Ray actor(s), each with {self.replicas.gpus or 0:g} GPU and "
            f"{self.replicas.cpus:g} CPU"
        )
        started, said_slow = time.monotonic(), False
        try:
            while queue or any(task.item is not None for task in running.values()):
                if queue and not running and not idle:
                    for item in queue:
                        report.finished(
                            item, Outcome(FAILED, error="no Ray actor could start (see the messages above)")
                        )
                    break
                while idle and queue:
                    self._dispatch(idle.pop(), queue.popleft(), running, idle, report)
                done, _ = self.ray.wait(list(running), num_returns=1, timeout=WAIT)
                for ref in done:
                    self._collect(running.pop(ref), ref, queue, idle, running, report)
                if not done and not said_slow and not idle and time.monotonic() - started > SLOW_START:
                    said_slow = True
                    report.say(f"still waiting for Ray to place the actors; the cluster has {self._resources()}")
                report.tick()
        finally:
            for actor in self.actors:
                self.ray.kill(actor)

    def _start_actor(self, running: dict) -> None:
        actor = self.actor_class.remote(
            self.spec, self.replicas.device(self.spec.device), max(1, round(self.replicas.cpus))
        )
        self.actors.append(actor)
        running[actor.ready.remote()] = _Running(actor, None)

    def _dispatch(self, actor, item: BatchItem, running: dict, idle: list, report: Reporter) -> None:
        try:
            views = pack(item)
        except OSError as error:
            report.finished(item, Outcome(FAILED, error=f"cannot read its files any more: {error}"))
            idle.append(actor)
            return
        running[actor.run.remote(item.name, views)] = _Running(actor, item)

    def _collect(self, task: _Running, ref, queue: deque, idle: list, running: dict, report: Reporter) -> None:
        """One finished call: an actor ready, an item done, or an actor dead."""
        try:
            value = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as error:
            self._actor_died(task, first_line(error), queue, running, report)
            return
        except Exception as error:  # noqa: BLE001 - reported with the item, or as an actor that cannot start
            if task.item is None:
                report.say(f"a Ray actor cannot start: {first_line(error)}")
                return
            value = (Outcome(FAILED, error=first_line(error)), {})
        if task.item is None:
            report.say(f"Ray actor ready on {value}")
        else:
            self._deliver(task.item, *value, report)
        idle.append(task.actor)

    def _actor_died(self, task: _Running, reason: str, queue: deque, running: dict, report: Reporter) -> None:
        """Its item runs once more elsewhere, and a replacement starts. An actor that dies while starting is
        not replaced: whatever killed it would kill the next one too."""
        item = task.item
        if item is None:
            report.say(f"a Ray actor died while starting: {reason}")
            return
        self.attempts[item.name] = self.attempts.get(item.name, 1) + 1
        if self.attempts[item.name] <= ATTEMPTS:
            report.say(f"{item.name}: its Ray actor died ({reason}); running it again")
            queue.appendleft(item)
        else:
            report.finished(item, Outcome(FAILED, error=f"its Ray actor died {ATTEMPTS} times, last: {reason}"))
        if queue:
            self._start_actor(running)

    def _deliver(self, item: BatchItem, outcome: Outcome, files: dict[str, bytes], report: Reporter) -> None:
        try:
            for name, data in files.items():
                write_atomically(self.out_dir / name, data)
        except OSError as error:  # a full disk, a lost mount: this item failed, the next may not
            outcome = Outcome(FAILED, outcome.seconds, f"cannot write its results into {self.out_dir}: {error}")
        report.finished(item, outcome)

    def _resources(self) -> str:
        available = self.ray.available_resources()
        return f"{available.get('GPU', 0):g} GPU and {available.get('CPU', 0):g} CPU free"

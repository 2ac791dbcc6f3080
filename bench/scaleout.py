"""Scale-out on Ray: items per minute with 1 and 2 replicas, and what the Ray path adds per job.

A local Ray cluster on this machine (``--cpus`` CPUs), tiny random weights, CPU replicas of one
thread each. Throughput: ``amodal3r batch``'s Ray executor over ``--items`` pictures, counted from
the first actor ready to the last item written (actor start and model load are shown apart); on a
machine of N free cores the ratio, not the absolute number, is the figure. Overhead: ``--jobs``
identical warm jobs, one at a time, through the stdlib client against the single-process server and
against ``amodal3r serve --ray`` with one replica; both run the job on one thread. The overhead of a
path is what the client waits beyond the job's own time on the server (claimed to finished), and
how long a submitted job waits before a worker takes it.

    .venv/bin/python bench/scaleout.py [--items 6] [--jobs 3] [--cpus 2] [--occupancy 0.03]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from amodal3r.api.client import Client, launch_server
from amodal3r.api.protocol import JobParams
from amodal3r.io.batch_inputs import check_items, read_batch
from amodal3r.service.batch import DONE, BatchItem, BatchSpec, Outcome
from amodal3r.service.ray_batch import RayExecutor
from amodal3r.service.ray_cluster import Replicas
from amodal3r.weights.tiny import OCCUPANCY, write_tiny_weights

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mug_behind_box"
VIEW = {
    "image": EXAMPLE / "image.png",
    "target_mask": EXAMPLE / "target_mask.png",
    "occluder_mask": EXAMPLE / "occluder_mask.png",
}
PARAMS = JobParams(structure_steps=2, slat_steps=2, texture_size=256, faces=5000, preview=False)
POLL = 0.05


class Timing:
    """A batch reporter that keeps when the first actor was ready and when each item finished."""

    def __init__(self) -> None:
        self.first_ready: float | None = None
        self.finished_at: list[float] = []
        self.work: list[float] = []

    def finished(self, item: BatchItem, outcome: Outcome) -> None:
        assert outcome.status == DONE, f"{item.name}: {outcome.error}"
        self.finished_at.append(time.perf_counter())
        self.work.append(outcome.seconds)

    def say(self, text: str) -> None:
        if text.startswith("Ray actor ready") and self.first_ready is None:
            self.first_ready = time.perf_counter()

    def tick(self) -> None:
        pass


def batch_folder(folder: Path, count: int) -> list[BatchItem]:
    """``count`` copies of the shipped example as a batch folder."""
    folder.mkdir()
    for index in range(count):
        for kind, suffix in (("image", ""), ("target_mask", "_target"), ("occluder_mask", "_occluder")):
            (folder / f"item{index}{suffix}.png").write_bytes(VIEW[kind].read_bytes())
    return check_items(read_batch(folder))


def throughput(ray, model: Path, items: list[BatchItem], replicas: int, out: Path) -> dict[str, float]:
    out.mkdir()
    executor = RayExecutor(ray, BatchSpec(str(model), PARAMS, device="cpu"), Replicas(replicas, 0.0, 1.0), out)
    timing = Timing()
    start = time.perf_counter()
    executor.run(items, timing)
    end = max(timing.finished_at)
    steady = end - (timing.first_ready or start)
    return {
        "replicas": replicas,
        "start": (timing.first_ready or start) - start,
        "wall": end - start,
        "per_minute": len(items) / steady * 60,
        "work": statistics.median(timing.work),
    }


def time_jobs(client: Client, jobs: int) -> dict[str, float]:
    """Medians over warm jobs (one untimed job first): seconds seen by the client, seconds on the server
    (claimed to finished: the work), and the submit round trip plus the wait until a worker took it."""
    rows: dict[str, list[float]] = {"seen": [], "server": [], "submit": [], "to running": []}
    for index in range(jobs + 1):
        start = time.perf_counter()
        job = client.submit([VIEW], PARAMS)
        submitted = time.perf_counter() - start
        running = None
        while not (status := client.job(job.id)).final:
            if running is None and status.state != "queued":
                running = time.perf_counter() - start
            time.sleep(POLL)
        assert status.state == DONE, status.error
        if index:
            rows["seen"].append(time.perf_counter() - start)
            rows["server"].append(status.elapsed)
            rows["submit"].append(submitted)
            rows["to running"].append(running if running is not None else rows["seen"][-1])
    return {key: statistics.median(values) for key, values in rows.items()}


def overhead(model: Path, address: str, jobs: int, tmp: Path) -> dict[str, dict[str, float]]:
    rows = {}
    for label, extra in (("single-process server", []), ("serve --ray, 1 replica", ["--ray", address])):
        started = time.perf_counter()
        server = launch_server(
            sys.executable,
            model,
            tmp / label.split()[0],
            extra_args=["--device", "cpu", *extra, *(["--replicas", "1"] if extra else [])],
            env={"OMP_NUM_THREADS": "1"},
            startup_timeout=300,
        )
        ready = time.perf_counter() - started
        try:
            rows[label] = {"start-up": ready, **time_jobs(server.client(timeout=120), jobs)}
        finally:
            server.stop(grace=60)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--occupancy", type=float, default=OCCUPANCY, help="tiny weights' structure occupancy")
    args = parser.parse_args()
    import ray

    load_before = os.getloadavg()[0]
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    address = ray.get_runtime_context().gcs_address
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny_weights(tmp / "model", seed=0, occupancy=args.occupancy)
        items = batch_folder(tmp / "in", args.items)
        rows = [throughput(ray, model, items, n, tmp / f"out{n}") for n in (1, 2)]
        jobs = overhead(model, address, args.jobs, tmp)
    ray.shutdown()
    load = os.getloadavg()[0]
    print(
        f"tiny random weights (occupancy {args.occupancy}), {PARAMS.structure_steps}+{PARAMS.slat_steps} steps, "
        f"{PARAMS.texture_size}px texture, <= {PARAMS.faces} faces; local Ray with {args.cpus} CPUs, "
        f"1 thread per replica; load average {load_before:.1f} before, {load:.1f} after, on {os.cpu_count()} cores\n"
    )
    print("| replicas | items | actor start (s) | wall (s) | work per item (s) | items/min | vs 1 replica |")
    print("|----------|-------|-----------------|----------|-------------------|-----------|--------------|")
    for row in rows:
        print(
            f"| {row['replicas']:8d} | {args.items:5d} | {row['start']:15.1f} | {row['wall']:8.1f} | "
            f"{row['work']:17.2f} | {row['per_minute']:9.2f} | {row['per_minute'] / rows[0]['per_minute']:11.2f}x |"
        )
    print(f"\n{args.jobs} warm jobs one at a time (medians), polling every {POLL} s:\n")
    print(
        "| path                    | start-up (s) | submit (ms) | to running (ms) | job seen by client (s) "
        "| on the server (s) | client - server (s) |"
    )
    print(
        "|-------------------------|--------------|-------------|-----------------|------------------------"
        "|-------------------|---------------------|"
    )
    for label, row in jobs.items():
        print(
            f"| {label:<23} | {row['start-up']:12.1f} | {row['submit'] * 1e3:11.0f} | {row['to running'] * 1e3:15.0f} "
            f"| {row['seen']:22.2f} | {row['server']:17.2f} | {row['seen'] - row['server']:19.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

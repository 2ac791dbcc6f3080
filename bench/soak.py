"""Soak: N jobs through a real server process, killed with SIGKILL halfway and restarted.

Jobs run one after another (tiny random weights unless ``--model``). Halfway, three jobs are
submitted together and the server is killed (kill -9) while the first of them runs; a new server
on the same data folder must report that one failed with a reason and run the two queued ones.
Every job is then accounted for: done, failed with a reason, or lost (still queued or running at the
end, or unknown to the server: must be 0). The server's resident memory is read from /v1/info after
every job: at the start, after the first job (models loaded), before the kill, after the restart and
at the end, with its range and its drift per job over each server's later jobs (a leak shows there).

    .venv/bin/python bench/soak.py [--jobs 50] [--model MODEL_DIR] [--steps 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from amodal3r.api.client import Client, LocalServer, launch_server
from amodal3r.api.protocol import DONE, FAILED, JobParams
from amodal3r.weights.tiny import write_tiny_weights

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mug_behind_box"
VIEW = {
    "image": EXAMPLE / "image.png",
    "target_mask": EXAMPLE / "target_mask.png",
    "occluder_mask": EXAMPLE / "occluder_mask.png",
}
KILLED_BATCH = 3  # submitted together at the kill: one running, the rest queued


def start(model: Path, data: Path) -> LocalServer:
    return launch_server(sys.executable, model, data, extra_args=["--device", "cpu"], env={"OMP_NUM_THREADS": "2"})


def rss_mib(client: Client) -> float:
    return client.info()["memory"]["process_rss_bytes"] / 2**20


def wait_final(client: Client, job_id: str, timeout: float = 600.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.job(job_id)
        if status.final:
            return status
        time.sleep(0.2)
    return client.job(job_id)


def wait_running(client: Client, job_id: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while client.job(job_id).stage not in ("structure", "slat") and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--model", type=Path, help="model folder (default: tiny random weights)")
    parser.add_argument("--steps", type=int, default=2, help="sampler steps of both stages")
    args = parser.parse_args()
    params = JobParams(structure_steps=args.steps, slat_steps=args.steps, texture_size=256, faces=5000, preview=False)
    slow = JobParams(structure_steps=500, slat_steps=args.steps, texture_size=256, preview=False)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or write_tiny_weights(Path(tmp) / "model", seed=0)
        data = Path(tmp) / "data"
        submitted: list[str] = []
        memory: list[tuple[str, float]] = []
        series: list[list[float]] = [[], []]  # RSS after each job, per server
        started = time.perf_counter()
        server = start(model, data)
        try:
            client = server.client()
            memory.append(("start", rss_mib(client)))
            half = max(0, args.jobs // 2 - 1)
            for _ in range(half):
                submitted.append(client.submit([VIEW], params).id)
                wait_final(client, submitted[-1])
                series[0].append(rss_mib(client))
            memory.append((f"before kill -9 (after {half} jobs)", rss_mib(client)))
            batch = [client.submit([VIEW], slow).id] + [
                client.submit([VIEW], params).id for _ in range(KILLED_BATCH - 1)
            ]
            submitted += batch
            wait_running(client, batch[0])
            os.kill(server.process.pid, signal.SIGKILL)
            server.process.wait()
        finally:
            server.stop()
        server = start(model, data)
        try:
            client = server.client()
            memory.append(("after restart", rss_mib(client)))
            for job_id in batch[1:]:
                wait_final(client, job_id)
            while len(submitted) < args.jobs:
                submitted.append(client.submit([VIEW], params).id)
                wait_final(client, submitted[-1])
                series[1].append(rss_mib(client))
            memory.append((f"end (after {len(submitted)} jobs)", rss_mib(client)))
            report(client, submitted, memory, time.perf_counter() - started)
            drift(series)
        finally:
            server.stop()
    return 0


def report(client: Client, submitted: list[str], memory: list[tuple[str, float]], seconds: float) -> None:
    known = {status.id: status for status in client.jobs()}
    done = [j for j in submitted if j in known and known[j].state == DONE]
    failed = [j for j in submitted if j in known and known[j].state == FAILED and known[j].error]
    lost = [j for j in submitted if j not in done and j not in failed]
    print(f"{len(submitted)} jobs in {seconds:.0f} s, one kill -9 while a job ran\n")
    print("| jobs | count |\n|---|---:|")
    print(f"| done | {len(done)} |\n| failed with a reason | {len(failed)} |\n| lost | {len(lost)} |")
    for job_id in failed:
        print(f"\nfailed {job_id}: {known[job_id].error}")
    print("\n| server RSS | MiB |\n|---|---:|")
    for label, mib in memory:
        print(f"| {label} | {mib:.0f} |")
    if lost:
        print(f"\nLOST: {lost}")


def drift(series: list[list[float]]) -> None:
    """RSS after each job of each server: its range after the first job, and the least-squares slope."""
    print("\n| server | jobs | RSS after job 1 MiB | range after MiB | drift MiB/job |\n|---|---:|---:|---|---:|")
    for name, values in zip(("first", "restarted"), series, strict=True):
        if len(values) < 3:
            continue
        later = values[1:]
        mean_x, mean_y = (len(later) - 1) / 2, sum(later) / len(later)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(later)) / sum(
            (x - mean_x) ** 2 for x in range(len(later))
        )
        print(f"| {name} | {len(values)} | {values[0]:.0f} | {min(later):.0f}..{max(later):.0f} | {slope:+.1f} |")


if __name__ == "__main__":
    sys.exit(main())

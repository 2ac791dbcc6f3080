"""What the reconstruction server adds on top of the work itself, and click-to-mask latency.

A real server process on loopback (tiny random weights, a random-initialised SAM vit_b), reached
through the stdlib client the Blender extension uses. For each of ``--jobs`` identical warm jobs:
the submit round trip (upload + validation + queueing), submit to the first status showing the job
running and to the first finished sampler step, the job's wall time, and the result download. The
same job runs in this process on a warm pipeline for comparison: the difference is the overhead.
Click-to-mask: the first click on an image (embedding computed) and further clicks (cached).

    .venv/bin/python bench/server_overhead.py [--jobs 3] [--clicks 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from amodal3r.api.client import Client, launch_server
from amodal3r.api.protocol import JobParams, SegmentParams
from amodal3r.io.export import export_glb, preview_png
from amodal3r.io.inputs import load_view
from amodal3r.pipelines.amodal3r import Amodal3RPipeline, RunSettings, StageSettings
from amodal3r.pipelines.segment import write_random_sam
from amodal3r.weights.tiny import write_tiny_weights

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mug_behind_box"
VIEW = {
    "image": EXAMPLE / "image.png",
    "target_mask": EXAMPLE / "target_mask.png",
    "occluder_mask": EXAMPLE / "occluder_mask.png",
}
PARAMS = JobParams(structure_steps=4, slat_steps=4, texture_size=512, faces=20000)
FAST_POLL = 0.01  # until the first sampler step, to time it closely
POLL = 0.3  # afterwards, as the Blender add-on polls: each status request takes CPU from the job


def in_process_seconds(model_dir: Path, out: Path) -> float:
    """The same job without a server, on a pipeline already warm (one untimed run first)."""
    pipeline = Amodal3RPipeline.from_pretrained(model_dir, "cpu")
    settings = RunSettings(
        seed=PARAMS.seed,
        structure=StageSettings(steps=PARAMS.structure_steps),
        slat=StageSettings(steps=PARAMS.slat_steps),
        formats=("mesh",),
    )

    def run() -> float:
        start = time.perf_counter()
        view = load_view(VIEW["image"], VIEW["target_mask"], VIEW["occluder_mask"])
        mesh = pipeline([view], settings).meshes[0]
        export_glb(mesh, out / "direct.glb", texture_size=PARAMS.texture_size, target_faces=PARAMS.faces)
        preview_png(mesh, out / "direct.png")
        return time.perf_counter() - start

    run()
    return statistics.median(run() for _ in range(3))


def time_job(client: Client, out: Path) -> dict[str, float]:
    start = time.perf_counter()
    job = client.submit([VIEW], PARAMS)
    row = {"submit": time.perf_counter() - start}
    while True:
        status = client.job(job.id)
        now = time.perf_counter() - start
        if status.state != "queued":
            row.setdefault("running", now)
        if status.stage == "structure" and status.step >= 1:
            row.setdefault("first step", now)
        if status.final:
            break
        time.sleep(POLL if "first step" in row else FAST_POLL)
    assert status.state == "done", status.error
    row["job"] = now
    row["server"] = status.elapsed
    clock = time.perf_counter()
    for name in status.results:
        client.download_result(job.id, name, out / name)
    row["download"] = time.perf_counter() - clock
    row["bytes"] = sum((out / name).stat().st_size for name in status.results)
    return row


def time_clicks(client: Client, clicks: int) -> tuple[float, list[float]]:
    image = VIEW["image"].read_bytes()
    start = time.perf_counter()
    _, first = client.segment(SegmentParams(points=[[300.0, 260.0]], labels=[1], model="vit_b"), image=image)
    first_seconds = time.perf_counter() - start
    times = []
    points, labels = [[300.0, 260.0]], [1]
    for i in range(clicks):
        points.append([100.0 + 20 * i, 120.0])
        labels.append(i % 2)
        clock = time.perf_counter()
        _, reply = client.segment(SegmentParams(points=points, labels=labels, model="vit_b", image_id=first.image_id))
        times.append(time.perf_counter() - clock)
        assert reply.embedding_cached
    return first_seconds, times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny_weights(tmp / "model", seed=0)
        sam = write_random_sam(tmp / "sam_vit_b.pth", kind="vit_b")
        server = launch_server(
            sys.executable,
            model,
            tmp / "data",
            extra_args=["--device", "cpu", "--sam-checkpoint", f"vit_b={sam}"],
            env={"OMP_NUM_THREADS": str(args.threads)},
        )
        try:
            client = server.client(timeout=300)
            cold = time_job(client, tmp)
            rows = [time_job(client, tmp) for _ in range(args.jobs)]
            first_click, clicks = time_clicks(client, args.clicks)
        finally:
            server.stop()
        direct = in_process_seconds(model, tmp)
    print(
        f"job: tiny random weights, {PARAMS.structure_steps}+{PARAMS.slat_steps} steps, "
        f"{PARAMS.texture_size}px texture, <= {PARAMS.faces} faces, CPU, {args.threads} threads\n"
    )
    print(
        "| run   | submit (ms) | to running (ms) | to first step (s) | job (s) | on the server (s) | download (ms) "
        "| result (KiB) |"
    )
    print(
        "|-------|-------------|-----------------|-------------------|---------|-------------------|---------------"
        "|--------------|"
    )
    for label, row in [("cold", cold)] + [(f"warm{i}", r) for i, r in enumerate(rows)]:
        print(
            f"| {label:<5} | {row['submit'] * 1e3:11.1f} | {row['running'] * 1e3:15.1f} | "
            f"{row['first step']:17.2f} | {row['job']:7.2f} | {row['server']:17.2f} | {row['download'] * 1e3:13.1f} | "
            f"{row['bytes'] / 1024:12.0f} |"
        )
    warm = statistics.median(r["job"] for r in rows)
    on_server = statistics.median(r["server"] for r in rows)
    print(
        f"\nsame job in-process on a warm pipeline (median of 3): {direct:.2f} s. Warm medians: seen by the "
        f"client (polling every {POLL} s) {warm - direct:+.2f} s ({(warm - direct) / direct * 100:+.1f}%), on the "
        f"server {on_server - direct:+.2f} s ({(on_server - direct) / direct * 100:+.1f}%)\n"
    )
    print("| click-to-mask (vit_b, 1024 px)  | latency (ms) |")
    print("|---------------------------------|--------------|")
    print(f"| first click (image embedding)   | {first_click * 1e3:12.0f} |")
    print(f"| further clicks, median of {len(clicks):<5} | {statistics.median(clicks) * 1e3:12.0f} |")
    print(f"| further clicks, max             | {max(clicks) * 1e3:12.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

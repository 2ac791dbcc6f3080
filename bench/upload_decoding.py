"""What large uploads cost the server: time to answer the submission and the server's memory.

A real server process (tiny random weights) gets ``POST /v1/jobs`` requests whose views are
10000 x 10000 pixels (uniform PNGs: a few hundred KiB on the wire, 100 M pixels to decode): one view,
then the same request twice more, then one request with three such views. For each: the answer, its
round trip, the server's resident memory after it and its peak so far (Linux ``/proc``). Accepted
jobs are cancelled at once, so only the submission is measured. ``--server-path`` runs the server
from another checkout's ``server/`` folder (e.g. an older commit) for a before/after table.

    .venv/bin/python bench/upload_decoding.py [--side 10000] [--server-path DIR]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from amodal3r.api.client import LocalServer, ServerError, Upload, launch_server
from amodal3r.api.protocol import JobParams
from amodal3r.weights.tiny import write_tiny_weights


def uniform_png(size: tuple[int, int], mode: str, value: int | tuple[int, ...], box=None) -> bytes:
    image = Image.new(mode, size, value)
    if box is not None:
        image.paste(255 if mode == "L" else (255, 255, 255), box)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def memory_mib(pid: int) -> tuple[float, float]:
    """(resident, peak resident) of a process in MiB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def submit(server: LocalServer, uploads: list[Upload]) -> tuple[str, float]:
    client = server.client(timeout=600)
    start = time.perf_counter()
    try:
        status = client.submit(uploads, JobParams(structure_steps=1, slat_steps=1))
        answer = "202 accepted"
        client.cancel(status.id)
    except ServerError as error:
        answer = f"{error.status} {error.detail[:60]}"
    return answer, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=10_000)
    parser.add_argument("--server-path", type=Path, help="a server/ folder to run the server from")
    args = parser.parse_args()
    size = (args.side, args.side)
    image = uniform_png(size, "RGB", (90, 120, 150))
    mask = uniform_png(size, "L", 0, (args.side // 4, args.side // 4, args.side // 2, args.side // 2))
    view = [Upload("view{i}_image", "big.png", image), Upload("view{i}_target_mask", "big_mask.png", mask)]

    def views(count: int) -> list[Upload]:
        return [Upload(u.field.format(i=i), u.filename, u.data) for i in range(count) for u in view]

    env = {"OMP_NUM_THREADS": "2"}
    if args.server_path is not None:
        env["PYTHONPATH"] = str(args.server_path.resolve())
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_weights(Path(tmp) / "model", seed=0)
        server = launch_server(sys.executable, model, Path(tmp) / "data", extra_args=["--device", "cpu"], env=env)
        try:
            rss, peak = memory_mib(server.process.pid)
            source = args.server_path or "this checkout"
            print(f"server from {source}; a request of one view: {len(image) + len(mask):,} bytes")
            print("\n| request | answer | seconds | RSS after MiB | peak RSS MiB |\n|---|---|---:|---:|---:|")
            print(f"| (idle) | | | {rss:.0f} | {peak:.0f} |")
            for label, count in (("1 view", 1), ("1 view again", 1), ("1 view a third time", 1), ("3 views", 3)):
                answer, seconds = submit(server, views(count))
                time.sleep(1.0)
                rss, peak = memory_mib(server.process.pid)
                print(f"| {label} {size[0]}x{size[1]} | {answer} | {seconds:.1f} | {rss:.0f} | {peak:.0f} |")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    if not Path("/proc/self/status").is_file():
        sys.exit("this bench reads /proc: run it on Linux")
    sys.exit(main())

"""Time pose fitting (``amodal3r.pipelines.placement.fit_pose``) against mesh size and resolution.

The object is an asymmetric blob (an icosphere squashed, with a bump and a handle-like lobe) of
1,280, 5,120 or 20,480 faces (``--faces``), posed by an upright camera at 35 degrees yaw and
25 degrees pitch in a 640 x 480 photo with a 50 degree field of view; a band hides 40% of its
silhouette. The fit decimates internally (the search draws at most ``SEARCH_FACES``, the last
stage ``FINAL_FACES``), so the drawn face counts are printed too. Wall time and process CPU time
are the medians of ``--repeat`` fits after one warm-up; the machine's load is printed beside them
because other processes on a shared machine slow the threaded runs most.

``--compare`` first times the rasteriser alone: scan conversion (the module) against
bounding-box tiling with edge functions (written here), 64 poses of a 5,120-face sphere at 256 px.

    .venv/bin/python bench/placement.py [--faces 1280 5120 20480] [--resolution 128 256 384]
        [--repeat 3] [--threads N] [--device cpu cuda] [--compare]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np
import torch
import trimesh

from amodal3r.api.camera import Intrinsics
from amodal3r.modules.silhouette import project, rasterize_silhouette
from amodal3r.pipelines import placement
from amodal3r.pipelines.placement import fit_pose, look_rotations


def blob(faces: int) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric closed mesh with about ``faces`` faces (icosphere subdivisions 3, 4, 5...)."""
    level = max(1, round(math.log(faces / 20, 4)))
    mesh = trimesh.creation.icosphere(subdivisions=level)
    v = mesh.vertices * np.array([0.5, 0.35, 0.3])
    v[:, 1] += 0.12 * np.exp(-((v[:, 0] - 0.25) ** 2 + v[:, 2] ** 2) / 0.02)  # a bump on top, right
    lobe = np.exp(-((v[:, 0] + 0.4) ** 2 + (v[:, 1] - 0.1) ** 2) / 0.01)
    v[:, 2] += 0.25 * lobe  # a lobe forward at the left
    v -= (v.min(axis=0) + v.max(axis=0)) / 2
    return v / (v.max(axis=0) - v.min(axis=0)).max(), np.asarray(mesh.faces, dtype=np.int64)


def scene(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, Intrinsics]:
    """Target and occluder masks of the blob in a 640 x 480 photo, 40% of it behind a band."""
    camera = Intrinsics.from_fov(640, 480, 50)
    rotation = look_rotations(torch.tensor([math.radians(35)]), torch.tensor([math.radians(25)]))[0]
    points = torch.from_numpy(vertices).float() @ rotation.T + torch.tensor([0.2, 0.1, 2.2])
    silhouette = rasterize_silhouette(
        points, torch.from_numpy(faces), camera.fx, camera.fy, camera.cx, camera.cy, camera.height, camera.width
    )[0].numpy()
    cut = np.quantile(np.nonzero(silhouette)[1], 0.4)
    occluder = np.zeros_like(silhouette)
    occluder[:, : int(cut)] = True
    return silhouette & ~occluder, occluder, camera


def load() -> str:
    """The 1-minute load average, for context."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def time_fits(faces: int, resolution: int, repeat: int, device: str) -> tuple[float, float, float]:
    """Median wall and CPU seconds of ``repeat`` fits, and the best score."""
    vertices, mesh_faces = blob(faces)
    target, occluder, camera = scene(vertices, mesh_faces)
    fit_pose(vertices, mesh_faces, target, occluder, camera, resolution=resolution, device=device)
    walls, cpus, score = [], [], 0.0
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fit_pose(vertices, mesh_faces, target, occluder, camera, resolution=resolution, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        score = result.score
    return statistics.median(walls), statistics.median(cpus), score


def tiled_silhouette(
    vertices: torch.Tensor, faces: torch.Tensor, fx: float, fy: float, cx: float, cy: float, height: int, width: int
) -> torch.Tensor:
    """Bounding-box tiling: every face tests every pixel of the largest face box with edge functions."""
    corners = project(vertices, fx, fy, cx, cy)[:, faces]  # [B, F, 3, 2]
    low = torch.floor(corners.amin(dim=2)).long()
    size = int((torch.ceil(corners.amax(dim=2)).long() - low).amax().item()) + 1
    offset = torch.arange(size, device=vertices.device)
    px = (low[..., 0, None, None] + offset[None, :]).float() + 0.5  # [B, F, 1, S]
    py = (low[..., 1, None, None] + offset[:, None]).float() + 0.5  # [B, F, S, 1]
    inside_pos = torch.ones(px.shape[:2] + (size, size), dtype=torch.bool, device=vertices.device)
    inside_neg = inside_pos.clone()
    for i, j in ((0, 1), (1, 2), (2, 0)):
        a, b = corners[..., i, :], corners[..., j, :]
        side = (b[..., 0] - a[..., 0])[..., None, None] * (py - a[..., 1, None, None]) - (b[..., 1] - a[..., 1])[
            ..., None, None
        ] * (px - a[..., 0, None, None])
        inside_pos &= side >= 0
        inside_neg &= side <= 0
    inside = inside_pos | inside_neg
    xs = (low[..., 0, None, None] + offset[None, :]).expand_as(inside)
    ys = (low[..., 1, None, None] + offset[:, None]).expand_as(inside)
    pose = torch.arange(len(vertices), device=vertices.device)[:, None, None, None].expand_as(inside)
    keep = inside & (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    out = torch.zeros(len(vertices), height, width, dtype=torch.bool, device=vertices.device)
    out[pose[keep], ys[keep], xs[keep]] = True
    return out


def compare(repeat: int) -> None:
    """Scan conversion against bounding-box tiling, 64 poses of a 5,120-face sphere at 256 px."""
    mesh = trimesh.creation.icosphere(subdivisions=4)
    vertices = torch.tensor(mesh.vertices, dtype=torch.float32) + torch.tensor([0.0, 0.0, 3.0])
    batch = vertices[None] + torch.randn(64, 1, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    faces = torch.from_numpy(mesh.faces)
    args = (batch, faces, 300.0, 300.0, 128.0, 128.0, 256, 256)
    runs = {
        "bounding-box tiling": lambda: tiled_silhouette(*args),
        "scan conversion": lambda: rasterize_silhouette(*args),
        "scan conversion, one side": lambda: rasterize_silhouette(*args, facing=-1),
    }
    reference = runs["scan conversion"]()
    print(
        f"rasteriser alone: 64 poses, {len(faces)} faces, 256 x 256, {torch.get_num_threads()} threads, load {load()}"
    )
    for name, run in runs.items():
        agree = (run() == reference).float().mean().item()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        print(f"  {name:28s} {statistics.median(times) * 1000:7.1f} ms   pixels agreeing {agree:.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, nargs="+", default=[1280, 5120, 20480])
    parser.add_argument("--resolution", type=int, nargs="+", default=[128, 256, 384])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        compare(args.repeat)
    print(
        f"fit_pose: torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeat}; "
        f"search draws <= {placement.SEARCH_FACES} faces, last stage <= {placement.FINAL_FACES}"
    )
    header = ("device", "faces", "drawn", "res", "wall s", "cpu s", "score", "load")
    widths = (-6, 6, 11, 4, 7, 7, 6, 5)
    print(" ".join(f"{name:{'<' if w < 0 else '>'}{abs(w)}s}" for name, w in zip(header, widths, strict=True)))
    for device in args.device:
        for faces in args.faces:
            count = len(blob(faces)[1])
            drawn = f"{min(count, placement.SEARCH_FACES)}/{min(count, placement.FINAL_FACES)}"
            for resolution in args.resolution:
                wall, cpu, score = time_fits(faces, resolution, args.repeat, device)
                print(
                    f"{device:6s} {count:6d} {drawn:>11s} {resolution:4d} {wall:7.2f} {cpu:7.2f} {score:6.3f} "
                    f"{load():>5s}",
                    flush=True,
                )


if __name__ == "__main__":
    main()

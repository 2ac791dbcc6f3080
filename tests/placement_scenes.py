"""Synthetic photos for placement tests: primitives posed by a known camera and drawn by an
independent rasteriser (numpy edge functions, not the code under test), partly hidden by an occluder."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import trimesh
from PIL import Image

from amodal3r.api.camera import Intrinsics


def reference_silhouette(vertices: np.ndarray, faces: np.ndarray, camera: Intrinsics) -> np.ndarray:
    """Pixel centres inside any face, by edge functions over each face's box (numpy, one face at a time)."""
    z = vertices[:, 2]
    u = camera.fx * vertices[:, 0] / z + camera.cx
    v = camera.fy * vertices[:, 1] / z + camera.cy
    out = np.zeros((camera.height, camera.width), dtype=bool)
    for a, b, c in faces:
        if min(z[a], z[b], z[c]) <= 1e-3:
            continue
        xs, ys = u[[a, b, c]], v[[a, b, c]]
        x0, x1 = max(0, math.floor(xs.min())), min(camera.width, math.ceil(xs.max()) + 1)
        y0, y1 = max(0, math.floor(ys.min())), min(camera.height, math.ceil(ys.max()) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        px, py = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)
        sides = [(xs[j] - xs[i]) * (py - ys[i]) - (ys[j] - ys[i]) * (px - xs[i]) for i, j in ((0, 1), (1, 2), (2, 0))]
        inside = ((sides[0] >= 0) & (sides[1] >= 0) & (sides[2] >= 0)) | (
            (sides[0] <= 0) & (sides[1] <= 0) & (sides[2] <= 0)
        )
        out[y0:y1, x0:x1] |= inside
    return out


def _box(extents: tuple[float, float, float], centre: tuple[float, float, float]) -> trimesh.Trimesh:
    return trimesh.creation.box(extents=extents, transform=trimesh.transformations.translation_matrix(centre))


def _upright_cylinder(radius: float, height: float, centre: tuple[float, float, float]) -> trimesh.Trimesh:
    """A cylinder along +Y (trimesh makes them along Z)."""
    mesh = trimesh.creation.cylinder(radius=radius, height=height, sections=32)
    mesh.apply_transform(trimesh.transformations.rotation_matrix(-math.pi / 2, (1, 0, 0)))
    mesh.apply_translation(centre)
    return mesh


def _canonical(parts: list[trimesh.Trimesh]) -> tuple[np.ndarray, np.ndarray]:
    """Parts joined, centred on their box and scaled to 1 across, as the model's GLBs are."""
    mesh = trimesh.util.concatenate(parts)
    lo, hi = mesh.bounds
    vertices = (mesh.vertices - (lo + hi) / 2) / (hi - lo).max()
    return vertices, np.asarray(mesh.faces, dtype=np.int64)


def bracket() -> tuple[np.ndarray, np.ndarray]:
    """An L (base, upright at the left end) with a tab forward on the right and a block behind the upright."""
    return _canonical(
        [
            _box((0.9, 0.15, 0.5), (0.0, -0.3, 0.0)),
            _box((0.15, 0.6, 0.5), (-0.375, 0.075, 0.0)),
            _box((0.25, 0.15, 0.3), (0.3, -0.3, 0.38)),
            _box((0.2, 0.2, 0.2), (-0.2, 0.3, -0.15)),
        ]
    )


def chair() -> tuple[np.ndarray, np.ndarray]:
    """Seat, back, four legs and one armrest (on the right): no mirror symmetry."""
    legs = [_box((0.06, 0.45, 0.06), (x, -0.265, z)) for x in (-0.27, 0.27) for z in (-0.27, 0.27)]
    return _canonical(
        [
            _box((0.6, 0.08, 0.6), (0, 0, 0)),
            _box((0.6, 0.6, 0.08), (0, 0.34, -0.26)),
            *legs,
            _box((0.06, 0.05, 0.5), (0.3, 0.25, 0.0)),
            _box((0.05, 0.22, 0.05), (0.3, 0.13, 0.2)),
        ]
    )


def steps() -> tuple[np.ndarray, np.ndarray]:
    """Three steps up towards +X, each set further back."""
    return _canonical(
        [
            _box((0.9, 0.25, 0.6), (0.0, -0.25, 0.1)),
            _box((0.6, 0.25, 0.45), (0.15, 0.0, -0.05)),
            _box((0.3, 0.25, 0.3), (0.3, 0.25, -0.15)),
        ]
    )


def kettle() -> tuple[np.ndarray, np.ndarray]:
    """A cylinder with a handle on the right and a spout forward-left, a lid knob off centre."""
    return _canonical(
        [
            _upright_cylinder(0.3, 0.55, (0, 0, 0)),
            _box((0.12, 0.35, 0.08), (0.36, 0.02, 0.0)),
            _box((0.3, 0.08, 0.08), (-0.36, 0.1, 0.12)),
            _box((0.1, 0.1, 0.1), (0.1, 0.32, -0.1)),
        ]
    )


def mug() -> tuple[np.ndarray, np.ndarray]:
    """Cylinder and handle: mirror-symmetric, so seen from some sides two poses look the same."""
    return _canonical([_upright_cylinder(0.3, 0.6, (0, 0, 0)), _box((0.12, 0.35, 0.08), (0.36, 0.0, 0.0))])


def block() -> tuple[np.ndarray, np.ndarray]:
    """A plain box: four (or more) poses give every silhouette."""
    return _canonical([_box((0.8, 0.5, 0.6), (0, 0, 0))])


ASYMMETRIC = {"bracket": bracket, "chair": chair, "steps": steps, "kettle": kettle}
SYMMETRIC = {"mug": mug, "block": block}


def look_at(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Object-to-camera rotation (OpenCV axes) of an upright camera at yaw/pitch looking at the centre,
    then rolled about its axis (written here independently of the code under test)."""
    eye = np.array([math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
    forward = -eye
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rotation = np.stack([right, down, forward])
    c, s = math.cos(roll), math.sin(roll)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ rotation


@dataclass
class Case:
    name: str
    vertices: np.ndarray
    faces: np.ndarray
    camera: Intrinsics
    rotation: np.ndarray
    translation: np.ndarray
    silhouette: np.ndarray
    target: np.ndarray
    occluder: np.ndarray
    hidden: float


def _occluder(silhouette: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A band from one side of the object, or a disc on its outline, hiding ``fraction`` of it."""
    height, width = silhouette.shape
    ys, xs = np.nonzero(silhouette)
    out = np.zeros_like(silhouette)
    if rng.random() < 0.5:
        axis = int(rng.integers(2))
        along = (xs, ys)[axis]
        side = int(rng.integers(2))
        cut = np.quantile(along, fraction if side == 0 else 1 - fraction)
        across = (ys, xs)[axis]
        lo = max(0, int(across.min() - rng.integers(3, 20)))
        hi = int(across.max() + rng.integers(3, 20))
        span = slice(lo, hi)
        start = max(0, int(along.min() - rng.integers(3, 20)))
        stop = int(along.max() + rng.integers(3, 20))
        band = slice(start, round(cut)) if side == 0 else slice(round(cut), stop)
        if axis == 0:
            out[span, band] = True
        else:
            out[band, span] = True
        return out
    k = int(rng.integers(len(xs)))
    cx, cy = xs[k] + 0.5, ys[k] + 0.5
    gx, gy = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    distance = np.hypot(gx - cx, gy - cy)
    lo, hi = 0.0, float(max(width, height)) * 2
    for _ in range(40):
        radius = (lo + hi) / 2
        covered = (silhouette & (distance < radius)).sum() / silhouette.sum()
        lo, hi = (radius, hi) if covered < fraction else (lo, radius)
    return distance < hi


def make_case(name: str, shape: tuple[np.ndarray, np.ndarray], seed: int) -> Case:
    """A random upright view in the training range, random field of view and framing, an occluder."""
    rng = np.random.default_rng(seed)
    vertices, faces = shape
    width, height = [(320, 240), (240, 320), (288, 288)][int(rng.integers(3))]
    camera = Intrinsics.from_fov(width, height, float(rng.uniform(30, 70)))
    rotation = look_at(
        rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(-10, 60)), math.radians(rng.uniform(-5, 5))
    )
    across = float(rng.uniform(0.4, 0.65)) * min(width, height)
    depth = camera.fx * 1.2 / across
    u = rng.uniform(0.4, 0.6) * width
    v = rng.uniform(0.4, 0.6) * height
    translation = depth * np.array([(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, 1.0])
    silhouette = reference_silhouette(vertices @ rotation.T + translation, faces, camera)
    occluder = _occluder(silhouette, float(rng.uniform(0.25, 0.55)), rng)
    hidden = float((silhouette & occluder).sum() / silhouette.sum())
    return Case(
        name, vertices, faces, camera, rotation, translation, silhouette, silhouette & ~occluder, occluder, hidden
    )


def silhouette_iou(case: Case, object_to_camera: np.ndarray) -> float:
    """IoU of the whole silhouette the object has at ``object_to_camera`` with the true one."""
    matrix = np.asarray(object_to_camera)
    fitted = reference_silhouette(case.vertices @ matrix[:3, :3].T + matrix[:3, 3], case.faces, case.camera)
    return float((fitted & case.silhouette).sum() / (fitted | case.silhouette).sum())


def write_scene(case: Case, folder: Path) -> tuple[Path, dict[str, Path]]:
    """The case as files: its mesh as a GLB, and one view (a plain photo, the target and occluder masks)."""
    folder.mkdir(parents=True, exist_ok=True)
    glb = folder / f"{case.name}.glb"
    trimesh.Trimesh(case.vertices, case.faces, process=False).export(glb)
    view = {"image": folder / "photo.png", "target_mask": folder / "target.png", "occluder_mask": folder / "front.png"}
    Image.new("RGB", (case.camera.width, case.camera.height), (120, 110, 100)).save(view["image"])
    for role, mask in (("target_mask", case.target), ("occluder_mask", case.occluder)):
        Image.fromarray(mask.astype(np.uint8) * 255).save(view[role])
    return glb, view


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Fits on one torch thread: their tensors are small, and on a machine shared with other jobs
    two threads made a fit 15x slower in wall time (95 s against 6 s, spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

"""Fit a reconstructed object's pose to the photo: rotation and translation whose silhouette matches
the visible target mask, occluded pixels counting for nothing.

Convention: ``object_to_camera`` is a 4x4 matrix ``[[R, t], [0, 0, 0, 1]]`` taking a point of the
GLB (glTF frame: +Y up, front +Z, the model's unit cube, centred) to the photo's camera frame in
OpenCV's convention (x right, y down, z forward, in the same units), ``p_cam = R p_glb + t``.
Scale stays 1: the object is as large as the model made it, so its depth follows from its size in
the photo. Intrinsics always describe the full photo (:class:`amodal3r.api.camera.Intrinsics`).

Score of a pose (higher is better, 1 at most):
``IoU(silhouette, target) - PENALTY * |silhouette on background| / |target|``, both over the
pixels the occluder does not cover (what is behind the occluder can be anything) and inside the
photo (beyond its border nothing is known). Background is known non-target. The IoU already counts
background covered once; the extra PENALTY (0.25) makes it count 1.25 times a missed target pixel,
because the true silhouette lies inside target + occluder exactly, while a missed pixel is often a
thin mask edge. It is kept small because it also rewards hiding more of the object behind the
occluder (farther away, smaller), which the IoU alone does not.

Search, coarse to fine, spending pixels and faces where they matter (counts are the constants below):

1. Coarse, exhaustive over the model's training views (upright cameras on a sphere looking at the
   object): 36 yaws x 6 pitches from -10 to 60 degrees (camera above), no roll (the refinement's
   turns about the optical axis take up a small roll). Each view is drawn once, about 48 px across
   the working window, at a depth between "its silhouette covers the target's box" and "it fits in
   the target + occluder box"; the best image shift for each of up to 9 depth factors is then found
   for every shift at once by FFT cross-correlation with the masks rescaled about the drawn centre
   (scaling the masks by k is moving the object k times farther away).
2. Screening: the best 16 views at least 15 degrees apart and with different silhouettes (a
   symmetric object's equivalent views would take every place) get 5 refinement iterations at 64 px.
3. Middle: the best 6, at least 25 degrees apart, are refined at half ``resolution``.
4. Hops: the best 2 are turned +-12 degrees about the object's up axis and about the camera's x
   axis and refined again briefly: a fit can stop a few degrees beside a narrow better one (a handle
   just round the side) where no small step improves it.
5. Final: the best 3 distinct poses are refined at ``resolution``; further candidates are scored there.

Stages 1-4 draw the mesh decimated to 1,000 faces and stage 5 to 2,500: thousands of silhouettes a
few hundred pixels across show no finer detail, and drawing time follows the face count.

Refinement (:func:`_refine`) is a derivative-free trust region: each iteration scores 44 poses
around each pose (all in one rasteriser batch), fits a quadratic with every coupling to them and
tries the model's maxima. A pose moves by a turn (axis-angle, camera axes), an image-plane shift and
a depth change; turns and depth changes pivot on the visible target's centroid at the object's
depth, since the visible part is what pins the pose. Couplings matter: a turn often pays only
together with a shift (a narrow ridge), which coordinate steps and plain slopes crawl along.

Pixels: masks are cut to a window around the target and the occluder near it (with a margin),
and scaled so the window's longer side is ``resolution``; mask pixels are area-averaged (exactly,
via summed-area tables), so a mask pixel half target counts half. Occluder pixels farther from the
target's box than its own size are ignored (taken as background): the hidden part is assumed to lie
within that reach, which keeps a large occluder (a table, a wall) from spreading the window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from amodal3r.api.camera import MAX_CANDIDATES, POSE_SUFFIX, Intrinsics, Pose
from amodal3r.api.errors import Cancelled, InputError
from amodal3r.io.camera import load_mesh_for_placement
from amodal3r.io.inputs import Source, View
from amodal3r.io.results import WrittenVariant
from amodal3r.modules.silhouette import rasterize_silhouette

PENALTY = 0.25
MIN_TARGET_PIXELS = 16
MIN_RESOLUTION = 64
NEAR_OCCLUDER = 1.0  # occluder counts within this many target sizes of the target's box
WINDOW_MARGIN = 0.2  # of the target + occluder box's longer side, on each side
COARSE_SIDE = 48
COARSE_PAD = 0.35  # shift range of the coarse search, in windows
YAWS = 36
PITCHES_DEG = (-10.0, 4.0, 18.0, 32.0, 46.0, 60.0)
MAX_DEPTH_FACTORS = 9
SCREENED, SCREEN_DEG = 16, 15.0  # coarse views screened at 64 px, at least this far apart
HYPOTHESES, DISTINCT_DEG = 6, 25.0  # refined at half resolution
SAME_SILHOUETTE = 0.97
HOPPED, HOP_DEG = 2, 12.0
FINISHED = 3  # refined at full resolution; further candidates are only scored there
SEARCH_FACES, FINAL_FACES = 1000, 2500  # faces drawn by the coarse to middle stages, and the last
POSES_PER_BATCH = 256
MODEL_RADII = (0.5, 1.0, 2.0, 4.0)
MAX_SCALE = 4.0


class PlacementError(InputError):
    """Inputs a pose cannot be fitted to, with what to do."""


@dataclass
class Placement:
    """The fitted pose, its score, and distinct runner-up poses (best first, the best not repeated)."""

    object_to_camera: np.ndarray
    score: float
    candidates: list[tuple[np.ndarray, float]] = field(default_factory=list)

    def pose(self, camera: Intrinsics) -> Pose:
        """As :class:`amodal3r.api.camera.Pose`, to write ``pose.json`` (which keeps 3 candidates)."""
        return Pose(self.object_to_camera, camera, self.score, tuple(self.candidates[:MAX_CANDIDATES]))


@dataclass
class _Masks:
    """Full-resolution masks as summed-area tables over the box that holds them, plus their boxes."""

    table_target: np.ndarray  # [h + 1, w + 1] float64, over ``origin``'s box
    table_occluder: np.ndarray
    origin: tuple[int, int]  # x, y of the tables' box in the photo
    width: int  # the photo's
    height: int
    target_box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    union_box: tuple[int, int, int, int]
    target_pixels: int
    target_centroid: tuple[float, float]  # photo pixels

    def sample(self, x_edges: np.ndarray, y_edges: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Target and known (not occluder, inside the photo) fractions of each cell of a grid.

        ``x_edges`` [w + 1] and ``y_edges`` [h + 1] are cell edges in photo pixels. A summed-area
        table is bilinear within each pixel, so interpolating it gives exact cell areas.
        """
        x0, y0 = self.origin
        area = np.outer(np.diff(y_edges), np.diff(x_edges))
        inside = np.outer(np.diff(np.clip(y_edges, 0, self.height)), np.diff(np.clip(x_edges, 0, self.width)))
        target = _cell_sums(self.table_target, x_edges - x0, y_edges - y0)
        occluder = _cell_sums(self.table_occluder, x_edges - x0, y_edges - y0)
        return (
            torch.from_numpy(target / area).float(),
            torch.from_numpy(np.clip(inside - occluder, 0, None) / area).float(),
        )


def _interpolate(table: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``table`` along ``axis`` at fractional ``coords`` (clamped to it)."""
    size = table.shape[axis] - 1
    coords = np.clip(coords, 0, size)
    low = np.minimum(np.floor(coords).astype(np.int64), max(size - 1, 0))
    high = np.minimum(low + 1, size)
    frac = coords - low
    a, b = np.take(table, low, axis=axis), np.take(table, high, axis=axis)
    shape = (-1, 1) if axis == 0 else (1, -1)
    return a + (b - a) * frac.reshape(shape)


def _cell_sums(table: np.ndarray, x_edges: np.ndarray, y_edges: np.ndarray) -> np.ndarray:
    """Mask sum over each cell between consecutive edges (table coordinates)."""
    corners = _interpolate(_interpolate(table, y_edges, 0), x_edges, 1)
    return np.diff(np.diff(corners, axis=0), axis=1)


@dataclass
class _View:
    """The masks drawn on a pixel grid over part of the photo, with the grid's intrinsics."""

    fx: float
    fy: float
    cx: float
    cy: float
    height: int
    width: int
    weights: torch.Tensor  # [h * w, 2]: each pixel's target fraction, and its known fraction
    target_total: float  # the whole target's area in this grid's pixels

    def scores(self, silhouettes: torch.Tensor) -> torch.Tensor:
        """Score (module notes) of each of ``[B, h, w]`` 0/1 float silhouettes."""
        hit, covered = (silhouettes.view(len(silhouettes), -1) @ self.weights).unbind(1)
        iou = hit / (covered + self.target_total - hit).clamp_min(1e-9)
        return iou - PENALTY * (covered - hit) / self.target_total


def _view(
    masks: _Masks, camera: Intrinsics, box: tuple[float, float, float, float], long_side: int, device: torch.device
) -> _View:
    """A grid with ``long_side`` pixels along the longer side of ``box`` (photo pixels)."""
    x0, y0, x1, y1 = box
    scale = long_side / max(x1 - x0, y1 - y0)
    width, height = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
    sx, sy = width / (x1 - x0), height / (y1 - y0)
    target, known = masks.sample(np.linspace(x0, x1, width + 1), np.linspace(y0, y1, height + 1))
    weights = torch.stack((target.flatten(), known.flatten()), dim=1).to(device)
    return _View(
        camera.fx * sx,
        camera.fy * sy,
        (camera.cx - x0) * sx,
        (camera.cy - y0) * sy,
        height,
        width,
        weights,
        masks.target_pixels * sx * sy,
    )


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 (exclusive) of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _prepare_masks(target: np.ndarray, occluder: np.ndarray) -> _Masks:
    """Visible target, the occluder near it, and their summed-area tables over their common box."""
    target = target & ~occluder
    height, width = target.shape
    tx0, ty0, tx1, ty1 = _bbox(target)
    reach = NEAR_OCCLUDER * max(tx1 - tx0, ty1 - ty0)
    near = np.zeros_like(occluder)
    ny0, ny1 = max(0, math.floor(ty0 - reach)), min(height, math.ceil(ty1 + reach))
    nx0, nx1 = max(0, math.floor(tx0 - reach)), min(width, math.ceil(tx1 + reach))
    near[ny0:ny1, nx0:nx1] = occluder[ny0:ny1, nx0:nx1]
    ux0, uy0, ux1, uy1 = _bbox(target | near)
    tables = []
    for mask in (target, near):
        table = np.zeros((uy1 - uy0 + 1, ux1 - ux0 + 1))
        table[1:, 1:] = mask[uy0:uy1, ux0:ux1].cumsum(axis=0, dtype=np.float64).cumsum(axis=1)
        tables.append(table)
    ys, xs = np.nonzero(target)
    return _Masks(
        tables[0],
        tables[1],
        (ux0, uy0),
        width,
        height,
        (tx0, ty0, tx1, ty1),
        (ux0, uy0, ux1, uy1),
        len(xs),
        (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5),
    )


def _window(masks: _Masks) -> tuple[float, float, float, float]:
    """The target + near occluder box with a margin, kept inside the photo."""
    x0, y0, x1, y1 = masks.union_box
    margin = WINDOW_MARGIN * max(x1 - x0, y1 - y0)
    return (
        max(0.0, x0 - margin),
        max(0.0, y0 - margin),
        min(float(masks.width), x1 + margin),
        min(float(masks.height), y1 + margin),
    )


def _check_inputs(
    vertices: np.ndarray, faces: np.ndarray, target: np.ndarray, occluder: np.ndarray, camera: Intrinsics
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Arrays of the right shapes and types, or a :class:`PlacementError` saying what is wrong."""
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces)
    if faces.size == 0:
        raise PlacementError(
            "the mesh has no faces: placement needs the reconstructed surface (a GLB "
            "with triangles), not points or an empty result"
        )
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise PlacementError(f"vertices must be [V, 3] and faces [F, 3], got {vertices.shape} and {faces.shape}")
    if not np.issubdtype(faces.dtype, np.integer) or faces.min() < 0 or faces.max() >= len(vertices):
        raise PlacementError(f"faces must index the {len(vertices)} vertices")
    if not np.isfinite(vertices).all():
        raise PlacementError("the mesh has non-finite vertex coordinates")
    expected = (camera.height, camera.width)
    masks = []
    for name, mask in (("target", target), ("occluder", occluder)):
        mask = np.asarray(mask).astype(bool)
        if mask.shape != expected:
            raise PlacementError(
                f"the {name} mask is {mask.shape[1::-1] if mask.ndim == 2 else mask.shape} "
                f"(width x height) but the camera is {camera.width}x{camera.height}: masks "
                "must cover the whole photo the intrinsics describe (paste a crop's mask "
                "into a photo-sized one)"
            )
        masks.append(mask)
    visible = int((masks[0] & ~masks[1]).sum())
    if visible == 0:
        raise PlacementError("the target mask is empty (or all under the occluder): mark the object's visible pixels")
    if visible < MIN_TARGET_PIXELS:
        raise PlacementError(
            f"the target mask has {visible} visible pixel(s), too few to fit a pose "
            f"(at least {MIN_TARGET_PIXELS}): mark the whole visible object"
        )
    return vertices, faces.astype(np.int64), masks[0], masks[1]


def _closed(faces: np.ndarray) -> bool:
    """Whether every edge is shared by exactly two faces wound oppositely (so one side draws it all)."""
    edges = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    if (edges[:, 0] == edges[:, 1]).any():
        return False
    base = int(faces.max()) + 1
    forward = edges[:, 0] * base + edges[:, 1]
    backward = edges[:, 1] * base + edges[:, 0]
    unique = np.unique(forward)
    return len(unique) == len(forward) and np.array_equal(unique, np.unique(backward))


def look_rotations(yaw: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
    """Object-to-camera rotations ``[N, 3, 3]`` of upright cameras looking at the object's centre.

    Yaw 0 looks at the front (+Z) and grows as the camera goes round towards +X; pitch is the
    camera's height above the object's equator (positive looks down). Radians.
    """
    direction = torch.stack(
        (torch.sin(yaw) * torch.cos(pitch), torch.sin(pitch), torch.cos(yaw) * torch.cos(pitch)), dim=-1
    )
    forward = -direction
    up = torch.tensor([0.0, 1.0, 0.0], dtype=forward.dtype, device=forward.device).expand_as(forward)
    down = (up * forward).sum(-1, keepdim=True) * forward - up
    down = down / down.norm(dim=-1, keepdim=True)
    right = torch.cross(down, forward, dim=-1)
    return torch.stack((right, down, forward), dim=-2)


def axis_angle(vectors: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` of axis-angle vectors (Rodrigues)."""
    angle = vectors.norm(dim=-1, keepdim=True)
    axis = vectors / angle.clamp_min(1e-12)
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    cross = torch.stack(
        (torch.stack((zero, -z, y), -1), torch.stack((z, zero, -x), -1), torch.stack((-y, x, zero), -1)), dim=-2
    )
    eye = torch.eye(3, dtype=vectors.dtype, device=vectors.device)
    sin, cos = torch.sin(angle)[..., None], torch.cos(angle)[..., None]
    return eye + sin * cross + (1 - cos) * cross @ cross


def rotation_angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Geodesic angle between rotations (broadcasting), degrees."""
    trace = (a * b).sum(dim=(-2, -1))
    return torch.rad2deg(torch.arccos(((trace - 1) / 2).clamp(-1, 1)))


class _Renderer:
    """The mesh, centred, drawn in many poses at once in some view."""

    def __init__(self, vertices: torch.Tensor, faces: torch.Tensor, facing: int) -> None:
        self.vertices, self.faces, self.facing = vertices, faces, facing

    def draw(self, view: _View, rotations: torch.Tensor, translations: torch.Tensor) -> torch.Tensor:
        """Silhouettes ``[N, h, w]``."""
        points = self.vertices @ rotations.transpose(-1, -2) + translations[:, None]
        return rasterize_silhouette(
            points,
            self.faces,
            view.fx,
            view.fy,
            view.cx,
            view.cy,
            view.height,
            view.width,
            facing=self.facing,
            dtype=torch.float32,
        )

    def scores(self, view: _View, rotations: torch.Tensor, translations: torch.Tensor) -> torch.Tensor:
        """Scores of N poses, drawn :data:`POSES_PER_BATCH` at a time."""
        return torch.cat(
            [
                view.scores(self.draw(view, rotations[i : i + POSES_PER_BATCH], translations[i : i + POSES_PER_BATCH]))
                for i in range(0, len(rotations), POSES_PER_BATCH)
            ]
        )


def _depth_range(extents: torch.Tensor, masks: _Masks, camera: Intrinsics) -> tuple[torch.Tensor, torch.Tensor]:
    """Per view, the depths at which its silhouette would just cover the target's box (far) and just
    fit the target + near occluder box (near); a side of that box on the photo's border bounds nothing."""
    focal = torch.tensor([camera.fx, camera.fy], dtype=extents.dtype, device=extents.device)
    tx0, ty0, tx1, ty1 = masks.target_box
    ux0, uy0, ux1, uy1 = masks.union_box
    target = torch.tensor([tx1 - tx0, ty1 - ty0], dtype=extents.dtype, device=extents.device)
    union = torch.tensor([ux1 - ux0, uy1 - uy0], dtype=extents.dtype, device=extents.device)
    far = (focal * extents / target).amin(dim=-1)
    bounded = torch.tensor([ux0 > 0 and ux1 < masks.width, uy0 > 0 and uy1 < masks.height], device=extents.device)
    near = torch.where(bounded, focal * extents / union, torch.zeros_like(extents)).amax(dim=-1)
    near = torch.where(near > 0, near, far / 2)
    return torch.minimum(near, far), torch.maximum(near, far)


def _ray(camera: Intrinsics, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Camera-frame points at depth 1 seen at photo pixel coordinates (u, v)."""
    return torch.stack(((u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, torch.ones_like(u)), dim=-1)


def _coarse(
    renderer: _Renderer,
    masks: _Masks,
    camera: Intrinsics,
    window: tuple[float, float, float, float],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every training view with its best image shift and depth: rotations, translations, scores,
    and the views' coarse silhouettes (all drawn at the same place and about the same size)."""
    yaw, pitch = torch.meshgrid(
        torch.arange(YAWS, dtype=torch.float32) * (2 * math.pi / YAWS),
        torch.deg2rad(torch.tensor(PITCHES_DEG)),
        indexing="ij",
    )
    rotations = look_rotations(yaw.flatten(), pitch.flatten()).to(device)
    turned = renderer.vertices @ rotations.transpose(-1, -2)
    extents = turned[..., :2].amax(dim=1) - turned[..., :2].amin(dim=1)
    extents = extents.clamp_min(0.05 * extents.max().item())  # a flat object seen edge-on
    near, far = _depth_range(extents, masks, camera)
    depth = (near * far).sqrt()
    spread = (far / near).sqrt().amax().item() * 1.15
    steps = min(MAX_DEPTH_FACTORS, max(3, math.ceil(2 * math.log(spread) / math.log(1.12)) + 1))
    factors = torch.exp(torch.linspace(-math.log(spread), math.log(spread), steps)).tolist()

    view = _view(masks, camera, window, COARSE_SIDE, device)
    tx0, ty0, tx1, ty1 = masks.target_box
    centre = _ray(camera, torch.tensor((tx0 + tx1) / 2), torch.tensor((ty0 + ty1) / 2)).to(device)
    drawn = renderer.draw(view, rotations, depth[:, None] * centre)
    return (*_correlate(drawn, view, masks, window, rotations, depth, centre, factors, camera), drawn)


def _correlate(
    drawn: torch.Tensor,
    view: _View,
    masks: _Masks,
    window: tuple[float, float, float, float],
    rotations: torch.Tensor,
    depth: torch.Tensor,
    centre: torch.Tensor,
    factors: list[float],
    camera: Intrinsics,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score every shift of every drawn view against the masks scaled by each depth factor (FFT)."""
    pad_y, pad_x = math.ceil(COARSE_PAD * view.height), math.ceil(COARSE_PAD * view.width)
    size = (view.height + 2 * pad_y, view.width + 2 * pad_x)
    spectrum = torch.fft.rfft2(torch.nn.functional.pad(drawn, (pad_x, pad_x, pad_y, pad_y)), s=size).conj()
    x0, y0, x1, y1 = window
    sx, sy = view.width / (x1 - x0), view.height / (y1 - y0)
    # The view's centre in canvas pixels: where the drawn object's centre projects.
    cu = view.fx * centre[0].item() / centre[2].item() + view.cx + pad_x
    cv = view.fy * centre[1].item() / centre[2].item() + view.cy + pad_y
    best = torch.full((len(drawn),), -math.inf, device=drawn.device)
    best_shift = torch.zeros(len(drawn), 2, device=drawn.device)
    best_factor = torch.ones(len(drawn), device=drawn.device)
    for k in factors:
        # Canvas pixel q shows photo pixel at canvas position c + (q - c) / k.
        xs = x0 + (cu + (np.arange(size[1] + 1) - cu) / k - pad_x) / sx
        ys = y0 + (cv + (np.arange(size[0] + 1) - cv) / k - pad_y) / sy
        target, known = masks.sample(xs, ys)
        stacked = torch.fft.rfft2(torch.stack((target, known)).to(drawn.device), s=size)
        hit, covered = torch.fft.irfft2(spectrum[:, None] * stacked[None], s=size).unbind(1)
        hit, covered = (_shifts(c, pad_y, pad_x) for c in (hit, covered))
        total = view.target_total * k * k
        score = hit / (covered + total - hit).clamp_min(1e-9) - PENALTY * (covered - hit) / total
        value, index = score.flatten(1).max(dim=1)
        better = value > best
        shift = torch.stack((index % score.shape[2] - pad_x, index // score.shape[2] - pad_y), dim=-1) / k
        best = torch.where(better, value, best)
        best_shift = torch.where(better[:, None], shift.float(), best_shift)
        best_factor = torch.where(better, torch.full_like(best_factor, k), best_factor)
    u = x0 + (cu + best_shift[:, 0] - pad_x) / sx
    v = y0 + (cv + best_shift[:, 1] - pad_y) / sy
    translations = (best_factor * depth)[:, None] * _ray(camera, u, v)
    return rotations, translations, best


def _shifts(correlation: torch.Tensor, pad_y: int, pad_x: int) -> torch.Tensor:
    """The part of a circular correlation ``[N, H, W]`` for shifts -pad..pad (index 0 is -pad)."""
    rolled = correlation.roll((pad_y, pad_x), dims=(1, 2))
    return rolled[:, : 2 * pad_y + 1, : 2 * pad_x + 1]


def _distinct(
    rotations: torch.Tensor, scores: torch.Tensor, count: int, min_deg: float, silhouettes: torch.Tensor | None = None
) -> list[int]:
    """Indices of the best-scoring poses whose rotations are at least ``min_deg`` apart, best first.

    With ``silhouettes``, also none whose silhouette is the same as a chosen one's (IoU above
    :data:`SAME_SILHOUETTE`): a symmetric object's equivalent poses would otherwise take every
    place, and they can only converge to the same fit.
    """
    chosen: list[int] = []
    for i in torch.argsort(scores, descending=True).tolist():
        if len(chosen) == count:
            break
        if chosen and rotation_angle_deg(rotations[i], rotations[chosen]).min().item() < min_deg:
            continue
        if chosen and silhouettes is not None:
            overlap = (silhouettes[i] * silhouettes[chosen]).flatten(1).sum(1)
            union = (silhouettes[i] + silhouettes[chosen]).clamp(max=1).flatten(1).sum(1)
            if (overlap / union.clamp_min(1)).max().item() > SAME_SILHOUETTE:
                continue
        chosen.append(i)
    return chosen


def _design() -> torch.Tensor:
    """Points around a pose, in step units, on the unit sphere: a central composite design, +-1 on
    each of the 6 axes and the half of the cube's corners with x6 = x1 x2 x3 x4 x5 (scaled to
    length 1). 44 points that fit a quadratic with every coupling (28 terms) unaliased, and
    symmetric, so that the slope is not biased by the curvature."""
    eye = torch.eye(6)
    signs = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0])] * 5)
    corners = torch.cat((signs, signs.prod(dim=1, keepdim=True)), dim=1) / math.sqrt(6)
    return torch.cat((eye, -eye, corners))


def _quadratic_features(points: torch.Tensor) -> torch.Tensor:
    """1, x_i and x_i x_j (i <= j) of ``[..., 6]`` points: ``[..., 28]``."""
    rows, cols = torch.triu_indices(6, 6)
    products = points[..., rows] * points[..., cols]
    return torch.cat((torch.ones_like(points[..., :1]), points, products), dim=-1)


def _model_steps(points: torch.Tensor, values: torch.Tensor, centre: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Maxima of a least-squares quadratic fit to the scores, within each of ``radii`` (trust region).

    ``points [S, 6]``, ``values [N, S]``, ``centre [N]`` (the score at 0): steps ``[N, R, 6]``.
    Solved on the CPU in float64 (tiny, and MPS has no float64).
    """
    device = values.device
    points, values, centre, radii = points.cpu(), values.cpu(), centre.cpu(), radii.cpu()
    design = _quadratic_features(torch.cat((torch.zeros(1, 6), points))).double()
    scores = torch.cat((centre[:, None], values), dim=1).double()
    coefficients = torch.linalg.lstsq(design[None].expand(len(scores), -1, -1), scores[..., None]).solution[..., 0]
    gradient = coefficients[:, 1:7]
    rows, cols = torch.triu_indices(6, 6)
    hessian = torch.zeros(len(scores), 6, 6, dtype=torch.float64)
    hessian[:, rows, cols] = coefficients[:, 7:]
    hessian = hessian + hessian.transpose(1, 2)  # diagonal doubled: d2/dx2 of c x^2 is 2c
    curvature, basis = torch.linalg.eigh(hessian)
    along = (basis.transpose(1, 2) @ gradient[..., None])[..., 0]  # gradient in the eigenbasis
    # x(lam) = (lam I - H)^-1 g ascends for lam > max curvature; |x| falls as lam grows: bisect for |x| = r.
    low = curvature.amax(dim=1).clamp_min(0)[:, None].expand(-1, len(radii)).clone() + 1e-9
    high = low + along.norm(dim=1, keepdim=True) / radii.double()[None] + 1e-9
    for _ in range(40):
        middle = (low + high) / 2
        norm = (along[:, None] / (middle[..., None] - curvature[:, None])).norm(dim=-1)
        too_long = norm > radii.double()[None]
        low, high = torch.where(too_long, middle, low), torch.where(too_long, high, middle)
    steps = (basis[:, None] @ (along[:, None] / (high[..., None] - curvature[:, None]))[..., None])[..., 0]
    return steps.float().to(device)


def _refine(
    renderer: _Renderer,
    view: _View,
    rotations: torch.Tensor,
    translations: torch.Tensor,
    steps: tuple[float, float, float],
    iterations: int,
    smallest: float,
    anchor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Derivative-free trust-region ascent of every pose at once; returns rotations, translations
    and their scores in ``view``.

    ``steps`` (rotation in radians, shift in view pixels, relative depth) are the unit of each of
    the 6 coordinates. An iteration scores 44 points at distance h around each pose (one batch),
    fits a quadratic to them and scores its maxima within h/2 to 4h (a second batch); the best
    point seen, if better, is the new pose. The fitted couplings matter: along a narrow ridge (a
    turn that only pays together with a shift) single coordinates and the plain slope stall. h
    doubles when the model's longest step won and halves when nothing was better; a pose stops
    when h is below ``smallest``.
    """
    device = rotations.device
    scores = renderer.scores(view, rotations, translations)
    design = _design().to(device)
    radii = torch.tensor(MODEL_RADII, device=device)
    size = torch.ones(len(rotations), device=device)
    for _ in range(iterations):
        active = torch.nonzero(size >= smallest).flatten()
        if not len(active):
            break
        r, t, h, current = rotations[active], translations[active], size[active], scores[active]
        probe_r, probe_t = _moved(r, t, design[None] * h[:, None, None], steps, view, anchor)
        probed = renderer.scores(view, probe_r.flatten(0, 1), probe_t.flatten(0, 1)).view(len(active), -1)
        jumps = _model_steps(design, probed, current, radii) * h[:, None, None]
        jump_r, jump_t = _moved(r, t, jumps, steps, view, anchor)
        jumped = renderer.scores(view, jump_r.flatten(0, 1), jump_t.flatten(0, 1)).view(len(active), -1)
        value, index = torch.cat((probed, jumped), dim=1).max(dim=1)
        better = value > current + 1e-6
        pick = torch.arange(len(active), device=device)
        rotations[active] = torch.where(better[:, None, None], torch.cat((probe_r, jump_r), 1)[pick, index], r)
        translations[active] = torch.where(better[:, None], torch.cat((probe_t, jump_t), 1)[pick, index], t)
        scores[active] = torch.where(better, value, current)
        longest = index == probed.shape[1] + len(MODEL_RADII) - 1
        size[active] = torch.where(better, torch.where(longest, h * 2, h), h / 2).clamp(max=MAX_SCALE)
    return rotations, translations, scores


def _moved(
    rotations: torch.Tensor,
    translations: torch.Tensor,
    moves: torch.Tensor,
    steps: tuple[float, float, float],
    view: _View,
    anchor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Poses ``[N, P]`` moved by ``moves [N, P, 6]``: a rotation in camera axes, an image-plane shift
    in view pixels, a depth change; the rotation and the depth change keep the point ``anchor``
    (a camera-frame ray, scaled to the object's depth) in place, so that the visible part, around
    which the anchor is chosen, stays where it matches instead of swinging about the object's centre."""
    turn, shift, depth = steps
    turned = axis_angle(moves[..., :3] * turn)
    pivot = translations[:, 2:3] * anchor  # [N, 3]
    moved = (turned @ (translations - pivot)[:, None, :, None]).squeeze(-1) + pivot[:, None]
    z = moved[..., 2:3]
    lateral = (
        torch.cat(
            (moves[..., 3:4] * shift / view.fx, moves[..., 4:5] * shift / view.fy, torch.zeros_like(moves[..., :1])),
            dim=-1,
        )
        * z
    )
    moved = moved + lateral + torch.expm1(moves[..., 5:6] * depth) * z * anchor
    return turned @ rotations[:, None], moved


@dataclass(frozen=True)
class _Stage:
    """One refinement pass: the grid's longer side, step units (rotation in radians, shift in
    view pixels, relative depth), iteration cap, and the step fraction at which a pose is done."""

    side: int
    steps: tuple[float, float, float]
    iterations: int
    smallest: float


def _stages(resolution: int) -> dict[str, _Stage]:
    """Screening at 64 px, then half and full ``resolution``; hops use the middle one's grid."""
    return {
        "screen": _Stage(64, (math.radians(8), 1.5, 0.05), 5, 1 / 4),
        "mid": _Stage(max(64, resolution // 2), (math.radians(6), 2.0, 0.04), 12, 1 / 8),
        "hop": _Stage(max(64, resolution // 2), (math.radians(4), 2.0, 0.03), 6, 1 / 4),
        "fine": _Stage(resolution, (math.radians(2), 2.0, 0.015), 8, 1 / 8),
    }


def _hops(rotations: torch.Tensor, translations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pose turned by +-:data:`HOP_DEG` about the object's own up axis and about the camera's
    x axis: a fit stuck beside a narrow better one (a handle a few degrees round) restarts there."""
    angle = math.radians(HOP_DEG)
    turns = torch.tensor([[0, angle, 0], [0, -angle, 0]], device=rotations.device)
    tilts = torch.tensor([[angle, 0, 0], [-angle, 0, 0]], device=rotations.device)
    about_up = rotations[:, None] @ axis_angle(turns)[None]  # object frame: R Ry
    about_x = axis_angle(tilts)[None] @ rotations[:, None]  # camera frame: Rx R
    hopped = torch.cat((about_up, about_x), dim=1).flatten(0, 1)
    return hopped, translations.repeat_interleave(4, dim=0)


def _decimated(vertices: np.ndarray, faces: np.ndarray, most: int) -> tuple[np.ndarray, np.ndarray]:
    """The mesh with about ``most`` faces at most: the search draws thousands of silhouettes a
    few hundred pixels across, which show no finer detail (:data:`SEARCH_FACES`,
    :data:`FINAL_FACES`)."""
    if len(faces) <= most:
        return vertices, faces
    import fast_simplification

    fewer_vertices, fewer_faces = fast_simplification.simplify(vertices, faces, target_count=most)
    if len(fewer_faces) == 0:
        return vertices, faces
    return np.asarray(fewer_vertices, dtype=np.float64), np.asarray(fewer_faces, dtype=np.int64)


def _renderer(vertices: np.ndarray, faces: np.ndarray, device: torch.device) -> _Renderer:
    """A renderer for a centred mesh, one-sided when the mesh is closed."""
    return _Renderer(
        torch.from_numpy(vertices).float().to(device), torch.from_numpy(faces).to(device), 1 if _closed(faces) else 0
    )


def fit_pose(
    vertices: np.ndarray,
    faces: np.ndarray,
    target: np.ndarray,
    occluder: np.ndarray,
    camera: Intrinsics,
    *,
    resolution: int = 256,
    candidates: int = 3,
    device: str | torch.device | None = None,
) -> Placement:
    """The pose (module notes) whose silhouette best matches ``target`` where ``occluder`` is not.

    ``vertices [V, 3]`` are in the GLB frame, ``faces [F, 3]``; ``target`` and ``occluder`` are
    bool masks the size of the full photo that ``camera`` describes. Up to ``candidates`` distinct
    other poses come with the best one.
    """
    if resolution < MIN_RESOLUTION or candidates < 0:
        raise PlacementError(
            f"resolution must be at least {MIN_RESOLUTION} and candidates at least 0, got {resolution} and {candidates}"
        )
    vertices, faces, target, occluder = _check_inputs(vertices, faces, target, occluder, camera)
    device = torch.device(device or "cpu")
    centre = (vertices.min(axis=0) + vertices.max(axis=0)) / 2
    full = _renderer(*_decimated(vertices - centre, faces, FINAL_FACES), device)
    search = _renderer(*_decimated(vertices - centre, faces, SEARCH_FACES), device)
    masks = _prepare_masks(target, occluder)
    window = _window(masks)
    anchor = _ray(camera, *torch.tensor(masks.target_centroid, dtype=torch.float32)).to(device)
    stages = _stages(resolution)

    def refine(
        renderer: _Renderer, stage: _Stage, r: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        view = _view(masks, camera, window, stage.side, device)
        return _refine(renderer, view, r, t, stage.steps, stage.iterations, stage.smallest, anchor)

    r, t, score, silhouettes = _coarse(search, masks, camera, window, device)
    keep = _distinct(r, score, SCREENED, SCREEN_DEG, silhouettes)
    r, t, score = refine(search, stages["screen"], r[keep], t[keep])
    keep = _distinct(r, score, HYPOTHESES, DISTINCT_DEG)
    r, t, score = refine(search, stages["mid"], r[keep], t[keep])
    best = _distinct(r, score, HOPPED, DISTINCT_DEG)
    hop_r, hop_t, hop_score = refine(search, stages["hop"], *_hops(r[best], t[best]))
    r, t, score = torch.cat((r, hop_r)), torch.cat((t, hop_t)), torch.cat((score, hop_score))
    keep = _distinct(r, score, max(candidates + 1, FINISHED), DISTINCT_DEG / 2)
    fine_r, fine_t, fine_score = refine(full, stages["fine"], r[keep[:FINISHED]], t[keep[:FINISHED]])
    rest = keep[FINISHED:]
    if rest:  # the other candidates are only scored on the final grid
        fine_view = _view(masks, camera, window, stages["fine"].side, device)
        fine_r, fine_t = torch.cat((fine_r, r[rest])), torch.cat((fine_t, t[rest]))
        fine_score = torch.cat((fine_score, full.scores(fine_view, r[rest], t[rest])))
    r, t, score = fine_r, fine_t, fine_score
    order = _distinct(r, score, candidates + 1, DISTINCT_DEG / 2)
    poses = [(_matrix(r[i], t[i], centre), float(score[i])) for i in order]
    return Placement(poses[0][0], poses[0][1], poses[1:])


def _matrix(rotation: torch.Tensor, translation: torch.Tensor, centre: np.ndarray) -> np.ndarray:
    """4x4 object-to-camera for the GLB's own origin (the search turned the mesh about ``centre``)."""
    r = rotation.double().cpu().numpy()
    matrix = np.eye(4)
    matrix[:3, :3] = r
    matrix[:3, 3] = translation.double().cpu().numpy() - r @ centre
    return matrix


def fit_glb(mesh: Source, view: View, camera: Intrinsics) -> Pose:
    """The pose of a GLB (a path or uploaded bytes) in ``view``, for every caller alike.

    ``view``'s masks are at its working size (big photos are downscaled when read) while ``camera``
    describes the full photo: the fit uses the camera resized to the masks, the pose keeps the full
    photo's camera (``pose.json`` always describes the photo as the user has it).
    """
    vertices, faces = load_mesh_for_placement(mesh)
    working = camera.resized(*view.image.size) if view.image.size != (camera.width, camera.height) else camera
    return fit_pose(vertices, faces, view.target, view.occluder, working).pose(camera)


def place_variants(
    variants: list[WrittenVariant],
    view: View,
    camera: Intrinsics,
    before_variant: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> None:
    """Write each variant's ``pose.json`` beside its GLB and add it to the variant's files.

    A variant that cannot be placed (a degenerate mesh, too little visible target) keeps its GLB
    and gets a notice saying why it has no pose: the reconstruction is worth more than its
    placement. Only expected failures (:class:`InputError`) are turned into notices; anything else
    is a bug and fails the run. ``cancelled()`` is asked between variants.
    """
    for index, variant in enumerate(variants):
        if cancelled is not None and cancelled():
            raise Cancelled(f"cancelled before placing variant {index + 1} of {len(variants)}")
        if before_variant is not None:
            before_variant(index, len(variants))
        path = variant.glb.with_name(variant.glb.stem + POSE_SUFFIX)
        try:
            fit_glb(variant.glb, view, camera).write(path)
        except InputError as error:
            variant.notes.append(f"{variant.glb.name}: no pose was fitted ({error})")
        else:
            variant.extras.append(path)

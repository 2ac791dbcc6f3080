"""A decoded mesh to a textured GLB that Blender and any glTF viewer open.

Steps: weld, drop small disconnected pieces, optionally decimate (before unwrapping: xatlas's time
grows with the face count, about 19 s for 100k faces on 2 cores), unwrap with xatlas, bake a
base-colour texture on the CPU, write a GLB with trimesh.

Colour: the decoder gives every vertex 6 channels in [0, 1]; the first 3 are the base colour (RGB),
the last 3 an encoded normal that is not used here.

Frame: the decoder works in a Z-up cube ``[-0.5, 0.5]^3`` whose front faces -Y (Blender's front
view). glTF is Y-up with the front facing +Z, so the asset is rotated ``(x, y, z) -> (x, z, -y)``
as the reference's GLB export does: upright, centred on the origin, fitting a unit cube, in
metres. Blender's glTF importer turns it back, so the object lands in Blender exactly in the
decoder's frame. Smooth vertex normals are written (without them viewers shade every face flat).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from amodal3r.api.errors import Cancelled
from amodal3r.api.files import write_atomically
from amodal3r.representations.mesh import Mesh

from .unwrap import UnwrapFailed, unwrap

Z_UP_TO_Y_UP = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=np.float32)  # row vectors: v @ Z_UP_TO_Y_UP
GUTTER_PASSES = 8
UNWRAP_ATTEMPTS = 3
UNWRAP_RETRY_KEEP = 0.7


@dataclass
class ExportReport:
    faces_in: int  # as decoded
    faces_cleaned: int  # after welding and dropping small pieces, before decimation
    faces_out: int  # written: after decimation and any unwrap retry
    texture_size: int
    bytes: int  # size of the GLB file
    seconds: dict[str, float] = field(default_factory=dict)  # per step, in order
    notices: list[str] = field(default_factory=list)

    @property
    def seconds_total(self) -> float:
        return sum(self.seconds.values())


def largest_components(vertices: np.ndarray, faces: np.ndarray, min_fraction: float) -> np.ndarray:
    """Faces of the connected pieces that have at least ``min_fraction`` of the largest's faces."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(len(vertices),) * 2)
    _, labels = connected_components(graph, directed=False)
    face_labels = labels[faces[:, 0]]
    sizes = np.bincount(face_labels)
    return faces[sizes[face_labels] >= min_fraction * sizes.max()]


def decimate(
    vertices: np.ndarray, faces: np.ndarray, colours: np.ndarray, target_faces: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quadric decimation; new vertices take the colour of the nearest original vertex."""
    import fast_simplification
    from scipy.spatial import cKDTree

    reduction = 1 - target_faces / len(faces)
    new_vertices, new_faces = fast_simplification.simplify(vertices, faces, target_reduction=reduction)
    _, nearest = cKDTree(vertices).query(new_vertices, workers=-1)
    return new_vertices.astype(np.float32), new_faces.astype(np.int64), colours[nearest]


def _unwrap_robustly(vertices: np.ndarray, faces: np.ndarray, colours: np.ndarray, notices: list[str]):
    """Unwrap; where xatlas fails on a mesh, decimate it a little (which perturbs the geometry
    that trips it) and try again, saying so."""
    error: UnwrapFailed | None = None
    for attempt in range(UNWRAP_ATTEMPTS):
        if attempt:
            target = int(len(faces) * UNWRAP_RETRY_KEEP)
            notices.append(f"xatlas failed on {len(faces)} faces; retried with {target}")
            vertices, faces, colours = decimate(vertices, faces, colours, target)
        try:
            return (*unwrap(vertices, faces), vertices, faces, colours)
        except UnwrapFailed as e:
            error = e
    raise RuntimeError(
        f"UV unwrapping failed on this mesh ({error}). Export with fewer faces (--faces) or try another seed"
    ) from error


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit area-weighted vertex normals (+Z where a vertex's faces cancel out)."""
    corners = vertices[faces].astype(np.float64)
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    index = faces.reshape(-1)
    summed = np.stack(
        [np.bincount(index, np.repeat(face_normals[:, c], 3), minlength=len(vertices)) for c in range(3)], axis=1
    )
    length = np.linalg.norm(summed, axis=1, keepdims=True)
    normals = np.where(length > 0, summed / np.maximum(length, 1e-300), [0.0, 0.0, 1.0])
    return normals.astype(np.float32)


def _triangle_samples(count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For faces needing ``count`` samples each: the face of each sample and its barycentric
    weights, from the R2 low-discrepancy sequence folded into the triangle."""
    face = np.repeat(np.arange(len(count)), count)
    k = np.arange(len(face)) - np.repeat(np.cumsum(count) - count, count)
    g = 1.32471795724474602596
    u, v = (0.5 + k / g) % 1, (0.5 + k / g**2) % 1
    outside = u + v > 1
    u[outside], v[outside] = 1 - u[outside], 1 - v[outside]
    return face, np.stack([1 - u - v, u, v], axis=1)


def bake_texture(uv: np.ndarray, faces: np.ndarray, colours: np.ndarray, size: int) -> np.ndarray:
    """``uint8 [size, size, 3]``: each texel averages the colours sampled inside it (about two
    samples per covered texel), then the gutter around the charts is filled from its neighbours so
    that filtering at the seams does not bleed background in. ``colours`` is per vertex ``[V, 3]``.
    Row 0 of the image is the top (glTF ``v = 0``, trimesh ``v = 1``)."""
    corners = uv[faces] * size  # [F, 3, 2] in texels
    a, b = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    doubled_area = np.abs(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])
    face, weights = _triangle_samples(np.ceil(doubled_area * 2).astype(np.int64) + 3)
    points = np.einsum("nk,nkc->nc", weights, corners[face])
    values = np.einsum("nk,nkc->nc", weights, colours[faces[face]])
    col = np.clip(points[:, 0].astype(np.int64), 0, size - 1)
    row = np.clip((size - points[:, 1]).astype(np.int64), 0, size - 1)  # image rows run down, v runs up
    index = row * size + col
    counts = np.bincount(index, minlength=size * size)
    texture = np.stack([np.bincount(index, values[:, c], minlength=size * size) for c in range(3)], axis=1)
    filled = counts > 0
    texture[filled] /= counts[filled, None]
    return _fill_gutter(texture.reshape(size, size, 3), filled.reshape(size, size))


def _fill_gutter(texture: np.ndarray, filled: np.ndarray) -> np.ndarray:
    for _ in range(GUTTER_PASSES):
        total, count = np.zeros_like(texture), np.zeros(filled.shape)
        for axis, shift in ((0, 1), (0, -1), (1, 1), (1, -1)):
            total += np.roll(texture * filled[..., None], shift, axis)
            count += np.roll(filled, shift, axis)
        grow = ~filled & (count > 0)
        texture[grow] = total[grow] / count[grow, None]
        filled = filled | grow
    texture[~filled] = texture[filled].mean(axis=0) if filled.any() else 0.5
    return (np.clip(texture, 0, 1) * 255 + 0.5).astype(np.uint8)


def preview_png(mesh: Mesh, path: str | Path, size: int = 512) -> None:
    """A quick look without a GPU: an orthographic front view (from -Y, Z up), vertex colours
    (grey without them) with Lambert shading, depth-tested by drawing surface samples far to near."""
    from PIL import Image

    vertices = mesh.vertices.cpu().numpy().astype(np.float64)
    faces = mesh.faces.cpu().numpy()
    if mesh.vertex_attrs is None:
        colours = np.full((len(vertices), 3), 0.7)
    else:
        colours = mesh.vertex_attrs[:, :3].float().clamp(0, 1).cpu().numpy()
    corners = vertices[faces]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    light = np.array([-0.4, -0.8, 0.45]) / np.linalg.norm([-0.4, -0.8, 0.45])
    shade = 0.35 + 0.65 * np.abs(normals @ light)
    screen = (corners[..., [0, 2]] + 0.5) * size  # x right, z up
    a, b = screen[:, 1] - screen[:, 0], screen[:, 2] - screen[:, 0]
    face, weights = _triangle_samples(np.ceil(np.abs(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]) * 2).astype(np.int64) + 3)
    points = np.einsum("nk,nkc->nc", weights, screen[face])
    depth = np.einsum("nk,nk->n", weights, corners[face][..., 1])
    rgb = np.einsum("nk,nkc->nc", weights, colours[faces[face]]) * shade[face, None]
    col = np.clip(points[:, 0].astype(np.int64), 0, size - 1)
    row = np.clip((size - points[:, 1]).astype(np.int64), 0, size - 1)
    image = np.ones((size, size, 3))
    far_to_near = np.argsort(-depth, kind="stable")
    image[row[far_to_near], col[far_to_near]] = rgb[far_to_near]  # later (nearer) writes win
    Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)).save(path)


def export_glb(
    mesh: Mesh,
    path: str | Path,
    *,
    texture_size: int = 1024,
    target_faces: int | None = None,
    min_component_fraction: float = 0.01,
    cancelled: Callable[[], bool] | None = None,
) -> ExportReport:
    """Write ``mesh`` as a textured GLB (see the module docstring for colours and axes).

    Args:
        mesh: the decoded mesh; its first three attribute channels are the base colour.
        path: the ``.glb`` to write; it appears only when complete, nothing is left on failure.
        texture_size: width and height of the base-colour texture in pixels.
        target_faces: decimate to about this many faces before unwrapping (None: keep all).
        min_component_fraction: drop disconnected pieces with fewer faces than this fraction of
            the largest piece's.
        cancelled: asked after each phase (cleanup, decimate, unwrap, bake); True stops the export.

    Raises:
        ValueError: nothing to export (empty mesh, no colour source) or a bad setting.
        RuntimeError: UV unwrapping failed even on decimated retries.
        Cancelled: ``cancelled()`` said so; nothing was written.
    """
    import trimesh
    from PIL import Image

    if not mesh.success:
        raise ValueError(
            "cannot export an empty mesh: the decoder found no surface; try another seed or check the masks"
        )
    if mesh.vertex_attrs is None:
        raise ValueError("cannot export a mesh without vertex colours: decode it with the mesh decoder's colours")
    if int(texture_size) < 8:
        raise ValueError(f"texture_size must be at least 8 pixels, got {texture_size}")
    if target_faces is not None and target_faces < 4:
        raise ValueError(f"target_faces must be at least 4, got {target_faces}")
    texture_size = int(texture_size)
    seconds: dict[str, float] = {}
    notices: list[str] = []
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = time.perf_counter() - clock
        clock = time.perf_counter()
        if cancelled is not None and cancelled():
            raise Cancelled(f"export cancelled after its {name} phase")

    welded = mesh.welded()
    if welded.faces.shape[0] == 0:
        raise ValueError("cannot export this mesh: all of its faces have zero area")
    vertices = welded.vertices.float().cpu().numpy()
    faces = largest_components(vertices, welded.faces.cpu().numpy(), min_component_fraction)
    colours = welded.vertex_attrs[:, :3].float().clamp(0, 1).cpu().numpy()
    used, faces = np.unique(faces, return_inverse=True)
    vertices, colours, faces = vertices[used], colours[used], faces.reshape(-1, 3)
    faces_cleaned = len(faces)
    lap("cleanup")
    if target_faces is not None and len(faces) > target_faces:
        vertices, faces, colours = decimate(vertices, faces, colours, target_faces)
        lap("decimate")
    mapping, unwrapped_faces, uv, vertices, faces, colours = _unwrap_robustly(vertices, faces, colours, notices)
    lap("unwrap")
    texture = bake_texture(uv, unwrapped_faces, colours[mapping], texture_size)
    lap("bake")
    normals = vertex_normals(vertices, faces)[mapping] @ Z_UP_TO_Y_UP
    material = trimesh.visual.material.PBRMaterial(
        baseColorTexture=Image.fromarray(texture), metallicFactor=0.0, roughnessFactor=1.0, doubleSided=False
    )
    glb = trimesh.Trimesh(
        vertices[mapping] @ Z_UP_TO_Y_UP,
        unwrapped_faces,
        vertex_normals=normals,
        visual=trimesh.visual.TextureVisuals(uv=uv, material=material),
        process=False,
    )
    data = glb.export(file_type="glb", include_normals=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data)
    lap("write")
    return ExportReport(
        faces_in=len(mesh.faces),
        faces_cleaned=faces_cleaned,
        faces_out=len(unwrapped_faces),
        texture_size=texture_size,
        bytes=len(data),
        seconds=seconds,
        notices=notices,
    )

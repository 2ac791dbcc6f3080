"""What placement reads from files: a photo's focal length from its EXIF, and the mesh.

Without a calibration the focal length comes from EXIF ``FocalLengthIn35mmFilm`` (tag 41989),
the focal length a 36 x 24 mm film frame would need for the same field of view. The film's long
side (36 mm) is matched to the photo's long side, whichever way the photo is held: a portrait
photo is a landscape frame turned, so its height, not its width, spans the 36 mm. (Cameras often
compute the tag from the diagonal instead; for a 4:3 sensor the two differ by about 4%, and the
fitted depth scales with the focal length, so by as much.) A photo without the tag is taken as a
50 mm equivalent, the classic "normal" lens; phones' main cameras are wider (about 24-28 mm), so
for a phone photo stripped of its EXIF this guess places the object too far away.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from amodal3r.api.camera import CameraError, Intrinsics
from amodal3r.api.errors import InputError

DEFAULT_FOCAL_35MM = 50.0
EXIF_IFD = 0x8769
TAG_FOCAL_35MM = 41989


class MeshError(InputError):
    """A mesh file placement cannot use."""


def intrinsics_from_exif(image: str | os.PathLike[str] | Image.Image) -> Intrinsics:
    """From the photo's ``FocalLengthIn35mmFilm``, else a 50 mm equivalent; size after EXIF rotation."""
    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as opened:
                return intrinsics_from_exif(opened)
        except (OSError, UnidentifiedImageError) as e:
            raise CameraError(f"{image}: cannot read this image for its focal length ({e})") from e
    width, height = image.size[::-1] if _rotated(image) else image.size
    return Intrinsics.from_focal_35mm(width, height, focal_35mm(image) or DEFAULT_FOCAL_35MM)


def _rotated(image: Image.Image) -> bool:
    """Whether EXIF orientation turns the image a quarter (orientations 5-8 swap width and height)."""
    return image.getexif().get(274, 1) in (5, 6, 7, 8)


def focal_35mm(image: Image.Image) -> float | None:
    """EXIF ``FocalLengthIn35mmFilm`` in mm when present and positive (0 means unknown), else None."""
    exif = image.getexif()
    value = exif.get_ifd(EXIF_IFD).get(TAG_FOCAL_35MM, exif.get(TAG_FOCAL_35MM))
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def load_mesh_for_placement(glb_path: str | os.PathLike[str], max_faces: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Vertices ``float32 [V, 3]`` and faces ``int64 [F, 3]`` of a GLB, welded and decimated.

    Welded by position (UV seams and normals split vertices that a silhouette does not care
    about, and a welded mesh decimates without tearing); decimated with fast_simplification to
    about ``max_faces`` faces (a silhouette at placement's resolution shows no finer detail).
    """
    import trimesh

    path = Path(glb_path)
    if not path.is_file():
        raise MeshError(f"{path}: mesh file not found. Check the path")
    try:
        mesh = trimesh.load(path, force="mesh")
    except Exception as e:  # trimesh raises many kinds for a damaged file
        raise MeshError(f"{path}: cannot read this mesh ({e}). Export it again as GLB") from e
    faces = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))), dtype=np.int64).reshape(-1, 3)
    if len(faces) == 0:
        raise MeshError(
            f"{path}: the file holds no triangles (empty, or only points or lines). "
            "Placement needs the reconstructed surface mesh"
        )
    mesh.merge_vertices(merge_tex=True, merge_norm=True)
    vertices, faces = np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)
    if len(faces) > max_faces:
        import fast_simplification

        vertices, faces = fast_simplification.simplify(vertices, faces, target_count=max_faces)
    return np.ascontiguousarray(vertices, dtype=np.float32), np.ascontiguousarray(faces, dtype=np.int64)

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

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from amodal3r.api.camera import CameraError, Intrinsics
from amodal3r.api.errors import InputError
from amodal3r.api.protocol import IMAGE_FORMATS, PlaceParams

from .inputs import Source, Upload, label, open_file

DEFAULT_FOCAL_35MM = 50.0
EXIF_IFD = 0x8769
TAG_FOCAL_35MM = 41989
TAG_ORIENTATION = 274
ASPECT_TOLERANCE = 0.01  # a given camera's width:height may differ from the photo's by this much (rounding)


class MeshError(InputError):
    """A mesh file placement cannot use."""


def photo_camera(image: Source, place: PlaceParams) -> Intrinsics:
    """The full photo's intrinsics: ``place.camera``, else ``place.fov`` across its upright width,
    else its EXIF 35 mm focal length (else 50 mm). Reads the file's header only."""
    with open_file(image, "image", IMAGE_FORMATS) as photo:
        size = upright_size(photo)
        if place.camera is not None:
            return fitting_camera(Intrinsics.from_dict(place.camera), size, label(image))
        if place.fov is not None:
            return Intrinsics.from_fov(*size, place.fov)
        return intrinsics_from_exif(photo)


def fitting_camera(camera: Intrinsics, size: tuple[int, int], photo: str) -> Intrinsics:
    """``camera`` when its width:height is the photo's (it may describe a scaled copy of it), else a
    :class:`CameraError`: intrinsics of another picture would place the object wrongly."""
    width, height = size
    if abs(camera.width * height / (camera.height * width) - 1) > ASPECT_TOLERANCE:
        raise CameraError(
            f"camera: it is {camera.width}x{camera.height} but {photo} is {width}x{height} (upright): "
            "give the intrinsics of this photo at its full size"
        )
    return camera


def intrinsics_from_exif(image: Image.Image) -> Intrinsics:
    """From the photo's ``FocalLengthIn35mmFilm``, else a 50 mm equivalent; size after EXIF rotation."""
    return Intrinsics.from_focal_35mm(*upright_size(image), focal_35mm(image) or DEFAULT_FOCAL_35MM)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """Width and height after the EXIF orientation (5-8 turn the image a quarter), from the header."""
    return image.size[::-1] if image.getexif().get(TAG_ORIENTATION, 1) in (5, 6, 7, 8) else image.size


def focal_35mm(image: Image.Image) -> float | None:
    """EXIF ``FocalLengthIn35mmFilm`` in mm when present and positive (0 means unknown), else None."""
    exif = image.getexif()
    value = exif.get_ifd(EXIF_IFD).get(TAG_FOCAL_35MM, exif.get(TAG_FOCAL_35MM))
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def load_mesh_for_placement(mesh: Source, max_faces: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Vertices ``float32 [V, 3]`` and faces ``int64 [F, 3]`` of a GLB (a path or uploaded bytes),
    welded and decimated.

    Welded by position (UV seams and normals split vertices that a silhouette does not care
    about, and a welded mesh decimates without tearing); decimated with fast_simplification to
    about ``max_faces`` faces (a silhouette at placement's resolution shows no finer detail).
    """
    import trimesh

    if not isinstance(mesh, Upload) and not Path(mesh).is_file():
        raise MeshError(f"{mesh}: mesh file not found. Check the path")
    try:
        if isinstance(mesh, Upload):
            loaded = trimesh.load(io.BytesIO(mesh.data), file_type="glb", force="mesh")
        else:
            loaded = trimesh.load(mesh, force="mesh")
    except Exception as e:  # noqa: BLE001 - trimesh raises many kinds for a damaged file
        raise MeshError(
            f"{label(mesh)}: cannot read this mesh ({type(e).__name__}: {e}). Export it again as GLB"
        ) from e
    faces = np.asarray(getattr(loaded, "faces", np.zeros((0, 3))), dtype=np.int64).reshape(-1, 3)
    if len(faces) == 0:
        raise MeshError(
            f"{label(mesh)}: the file holds no triangles (empty, or only points or lines). "
            "Placement needs the reconstructed surface mesh"
        )
    loaded.merge_vertices(merge_tex=True, merge_norm=True)
    vertices, faces = np.asarray(loaded.vertices, dtype=np.float64), np.asarray(loaded.faces, dtype=np.int64)
    if not np.isfinite(vertices).all():
        raise MeshError(f"{label(mesh)}: the mesh has non-finite vertex coordinates. Export it again as GLB")
    if len(faces) > max_faces:
        import fast_simplification

        vertices, faces = fast_simplification.simplify(vertices, faces, target_count=max_faces)
    return np.ascontiguousarray(vertices, dtype=np.float32), np.ascontiguousarray(faces, dtype=np.int64)

"""The photo's camera (``camera.json``) and the placed object's pose (``pose.json``), defined once.

Standard library and numpy only: the server writes these files, the add-on reads them.

Intrinsics follow OpenCV: pixels, x right and y down from the image's top-left corner, pixel
(i, j) centred at (j + 0.5, i + 0.5), a camera-frame point (x, y, z) with z forward seen at
``(fx * x / z + cx, fy * y / z + cy)``. They always describe the full photo as the user gave it
(after its EXIF rotation, as the server's ``inputs.load_image`` reads images), even when the masks
were drawn on a crop of it.

``pose.json`` holds where the reconstructed object sits in that camera: ``object_to_camera`` maps
the GLB's coordinates (+Y up, front +Z, metres as the model's unit cube) to the camera frame above,
as a row-major 4x4 matrix. It is written atomically (a temporary file beside it, then
``os.replace``), so a reader never sees half of one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .files import write_atomically

FIELDS = ("width", "height", "fx", "fy", "cx", "cy")
POSE_SUFFIX = ".pose.json"  # a pose.json beside its GLB: chair.glb -> chair.pose.json
FILM_LONG_SIDE_MM = 36.0
MAX_CANDIDATES = 3
POSE_EXPECTED = (
    "expected an object with object_to_camera (4x4), camera (the six intrinsics), score and candidates. "
    "Fit the pose again (Match Photo, or amodal3r place)"
)
HOW_TO_FIX = (
    "Give intrinsics in pixels of the full photo, OpenCV convention: width and height of "
    "the image, fx and fy positive focal lengths, cx and cy the principal point inside it "
    "(or drop the file to use the photo's EXIF focal length)"
)


class CameraError(InputError):
    """A camera description that cannot be used: names the field and the fix."""


def _number(data: Mapping[str, Any], name: str, source: str) -> float:
    """``data[name]`` as a finite float, or a :class:`CameraError` naming what is wrong."""
    if name not in data:
        raise CameraError(f"{source}: '{name}' is missing. {HOW_TO_FIX}")
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CameraError(f"{source}: '{name}' is {value!r}, not a number. {HOW_TO_FIX}")
    if not math.isfinite(value):
        raise CameraError(f"{source}: '{name}' is {value}, not a finite number. {HOW_TO_FIX}")
    return float(value)


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics of the full photo (see the module notes for the convention)."""

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float

    def __post_init__(self) -> None:
        values = self._check(dict(self.__dict__), "camera")
        for name in FIELDS:  # sizes as int, the rest as float, whatever numbers came in
            object.__setattr__(self, name, int(values[name]) if name in ("width", "height") else values[name])

    @staticmethod
    def _check(data: Mapping[str, Any], source: str) -> dict[str, float]:
        """Every field present, finite, positive where it must be, the principal point inside."""
        values = {name: _number(data, name, source) for name in FIELDS}
        for name in ("width", "height"):
            if values[name] < 1 or values[name] != int(values[name]):
                raise CameraError(
                    f"{source}: '{name}' is {data[name]!r}, not a positive whole number of pixels. {HOW_TO_FIX}"
                )
        for name in ("fx", "fy"):
            if values[name] <= 0:
                raise CameraError(
                    f"{source}: '{name}' is {data[name]!r}; a focal length must be positive. {HOW_TO_FIX}"
                )
        for name, size in (("cx", "width"), ("cy", "height")):
            if not 0 <= values[name] <= values[size]:
                raise CameraError(
                    f"{source}: '{name}' is {data[name]!r}, outside the image (0 to "
                    f"{size} {values[size]:g}). {HOW_TO_FIX}"
                )
        return values

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "camera") -> Intrinsics:
        """Intrinsics from a mapping with the six fields (others are ignored)."""
        if not isinstance(data, Mapping):
            raise CameraError(
                f"{source}: expected an object with {', '.join(FIELDS)}, got {type(data).__name__}. {HOW_TO_FIX}"
            )
        cls._check(data, source)
        return cls(*(data[name] for name in FIELDS))

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Intrinsics:
        """Intrinsics from a JSON file holding :meth:`to_dict`'s object."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise CameraError(f"{path}: camera file not found. Check the path") from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CameraError(f"{path}: not a readable JSON file ({e}). {HOW_TO_FIX}") from e
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, int | float]:
        """The six fields, as :meth:`from_dict` and ``pose.json`` take them."""
        return {name: getattr(self, name) for name in FIELDS}

    @classmethod
    def from_fov(cls, width: int, height: int, fov_deg: float) -> Intrinsics:
        """Square pixels, centred principal point, ``fov_deg`` across the image's width."""
        if not isinstance(fov_deg, (int, float)) or not 0 < fov_deg < 180:
            raise CameraError(f"horizontal field of view {fov_deg!r} must be between 0 and 180 degrees")
        focal = width / 2 / math.tan(math.radians(fov_deg) / 2)
        return cls(width, height, focal, focal, width / 2, height / 2)

    @classmethod
    def from_focal_35mm(cls, width: int, height: int, focal_35mm: float) -> Intrinsics:
        """Square pixels, centred principal point, the 36 mm film side matched to the long side."""
        focal = focal_35mm / FILM_LONG_SIDE_MM * max(width, height)
        return cls(width, height, focal, focal, width / 2, height / 2)

    def resized(self, width: int, height: int) -> Intrinsics:
        """The same camera for the photo resampled to ``width`` x ``height`` pixels."""
        sx, sy = width / self.width, height / self.height
        return Intrinsics(width, height, self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy)

    @property
    def matrix(self) -> np.ndarray:
        """The 3x3 camera matrix K."""
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1]], dtype=np.float64)


def _matrix(value: Any, what: str) -> np.ndarray:
    """A finite 4x4 float64 matrix, or ``ValueError`` naming ``what``."""
    matrix = np.asarray(value, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise ValueError(f"{what} must be a finite 4x4 matrix, got shape {matrix.shape}")
    return matrix


@dataclass(frozen=True)
class Pose:
    """An object's pose in a photo's camera, its fit score, and the runner-up poses, for ``pose.json``."""

    object_to_camera: np.ndarray
    camera: Intrinsics
    score: float
    candidates: Sequence[tuple[np.ndarray, float]] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _matrix(self.object_to_camera, "object_to_camera")
        if len(self.candidates) > MAX_CANDIDATES:
            raise ValueError(f"pose.json holds at most {MAX_CANDIDATES} candidates, got {len(self.candidates)}")
        for i, (matrix, _) in enumerate(self.candidates):
            _matrix(matrix, f"candidate {i}")

    def to_dict(self) -> dict[str, Any]:
        """The ``pose.json`` object: matrices as row-major nested lists."""
        return {
            "object_to_camera": _matrix(self.object_to_camera, "object_to_camera").tolist(),
            "camera": self.camera.to_dict(),
            "score": float(self.score),
            "candidates": [
                {"object_to_camera": _matrix(m, "candidate").tolist(), "score": float(s)} for m, s in self.candidates
            ],
        }

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write ``pose.json`` atomically: a reader sees the old file or the new one, never a part."""
        return write_atomically(path, json.dumps(self.to_dict(), indent=1).encode())

    @classmethod
    def from_dict(cls, data: Any, source: str = "pose") -> Pose:
        """A ``pose.json`` object; anything malformed is a :class:`CameraError` naming ``source``."""
        if not isinstance(data, dict):
            raise CameraError(f"{source}: {POSE_EXPECTED}")
        try:
            candidates = data.get("candidates", [])
            return cls(
                _matrix(data["object_to_camera"], "object_to_camera"),
                Intrinsics.from_dict(data["camera"], f"{source}: camera"),
                float(data["score"]),
                tuple((_matrix(c["object_to_camera"], "a candidate"), float(c["score"])) for c in candidates),
            )
        except CameraError:
            raise
        except KeyError as error:
            raise CameraError(f"{source}: {error} is missing; {POSE_EXPECTED}") from None
        except (AttributeError, TypeError, ValueError) as error:
            raise CameraError(f"{source}: {error}; {POSE_EXPECTED}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Pose:
        """Read a ``pose.json`` back (as :meth:`write` left it); a missing file is FileNotFoundError."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CameraError(f"{path}: not a readable pose.json ({error})") from None
        return cls.from_dict(data, str(path))

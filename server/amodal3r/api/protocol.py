"""The HTTP protocol between the reconstruction server and its clients, defined once.

Standard library only: Blender's Python imports this module (and ``client.py``) from the wheel the
extension bundles, the server imports it next to FastAPI. Every route lives under ``/v1/``; a change
that breaks a client bumps ``PROTOCOL_VERSION`` and the prefix.

Routes (all but the OpenAPI document need ``Authorization: Bearer <token>``):

=======  =============================  ==========================================================
GET      /v1/health                     ``{"status": "ok", "protocol": 1, "version": ...}``
GET      /v1/info                       version, protocol, device, dtype, model_dir, models
                                        present and loaded, memory, queue length
POST     /v1/jobs                       multipart: ``params`` (JSON ``JobParams``) and per view i
                                        ``view{i}_image`` with ``view{i}_target_mask`` [+
                                        ``view{i}_occluder_mask``] or ``view{i}_mask`` (PNG files)
                                        -> 202 ``JobStatus``
GET      /v1/jobs                       ``{"jobs": [JobStatus, ...]}``, newest first
GET      /v1/jobs/{id}                  ``JobStatus``
POST     /v1/jobs/{id}/cancel           ``JobStatus``
GET      /v1/jobs/{id}/results/{name}   a file named in ``JobStatus.results``
POST     /v1/images                     multipart ``image`` -> ``{"image_id": ...}`` (for segment)
POST     /v1/segment                    multipart ``params`` (JSON ``SegmentParams``) and either
                                        ``image`` or ``params.image_id`` -> ``SegmentReply``
                                        (the mask as a base64 PNG, white = inside)
GET      /v1/models                     ``{"model_dir": ..., "components": [...]}``
POST     /v1/models/download            JSON ``{"components": [...]}`` -> download status
GET      /v1/models/download            state, component, file, bytes done/total, error
=======  =============================  ==========================================================

Errors are JSON ``{"detail": "<what went wrong and what to do>"}`` with a 4xx/5xx status.
Masks travel as PNGs in the formats of ``api/masks.py``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ProtocolError

PROTOCOL_VERSION = 1
API_PREFIX = "/v1"
LISTENING_PREFIX = "listening on "  # the stdout line a parent process waits for
STATE_FILE = "server.json"  # in the data folder: url, pid, protocol of the running server

MAX_VIEWS = 8
MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # one request body
MAX_IMAGE_PIXELS = 100_000_000

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINAL_STATES = (DONE, FAILED, CANCELLED)

VIEW_FILES = ("image", "target_mask", "occluder_mask", "mask")
MULTIVIEW_MODES = ("stochastic", "multidiffusion")

# The range of each run setting, for the server and the command line alike.
SEED_RANGE = (0, 2**31 - 1)
VARIANTS_RANGE = (1, 8)
STEPS_RANGE = (1, 500)
CFG_RANGE = (0.0, 100.0)
TEXTURE_SIZE_RANGE = (64, 8192)
FACES_RANGE = (100, 10_000_000)
SAM_KINDS = ("vit_h", "vit_l", "vit_b")


def view_field(index: int, kind: str) -> str:
    """Multipart field name of one file of one view, e.g. ``view0_target_mask``."""
    if kind not in VIEW_FILES:
        raise ProtocolError(f"unknown view file {kind!r}; expected one of {', '.join(VIEW_FILES)}")
    return f"view{index}_{kind}"


def parse_view_field(name: str) -> tuple[int, str]:
    """Inverse of ``view_field``; a malformed name is a ProtocolError."""
    head, _, kind = name.partition("_")
    if not head.startswith("view") or not head[4:].isdigit() or kind not in VIEW_FILES:
        raise ProtocolError(f"unexpected upload field {name!r}: expected view<i>_<{'|'.join(VIEW_FILES)}>")
    return int(head[4:]), kind


def check_int(name: str, value: Any, bounds: tuple[int, int], optional: bool = False) -> None:
    low, high = bounds
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(f"{name} must be an integer in {low}..{high}, got {value!r}")


def check_float(name: str, value: Any, bounds: tuple[float, float]) -> None:
    low, high = bounds
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise ProtocolError(f"{name} must be a number in {low}..{high}, got {value!r}")


def _from_dict(cls: type, data: Any, what: str):
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProtocolError(f"unknown {what} field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return cls(**data)
    except TypeError as error:
        raise ProtocolError(f"bad {what}: {error}") from None


@dataclass
class JobParams:
    """The run settings of ``amodal3r reconstruct``; None means the pipeline's default."""

    seed: int = 0
    variants: int = 1
    multiview: str = "stochastic"
    structure_steps: int | None = None
    structure_cfg: float | None = None
    slat_steps: int | None = None
    slat_cfg: float | None = None
    texture_size: int = 1024
    faces: int | None = None
    gaussians: bool = False
    preview: bool = True
    name: str = ""  # shown in job lists; the object name on the Blender side

    def validate(self) -> JobParams:
        check_int("seed", self.seed, SEED_RANGE)
        check_int("variants", self.variants, VARIANTS_RANGE)
        if self.multiview not in MULTIVIEW_MODES:
            raise ProtocolError(f"multiview must be one of {', '.join(MULTIVIEW_MODES)}, got {self.multiview!r}")
        check_int("structure_steps", self.structure_steps, STEPS_RANGE, optional=True)
        check_int("slat_steps", self.slat_steps, STEPS_RANGE, optional=True)
        check_float("structure_cfg", self.structure_cfg, CFG_RANGE)
        check_float("slat_cfg", self.slat_cfg, CFG_RANGE)
        check_int("texture_size", self.texture_size, TEXTURE_SIZE_RANGE)
        check_int("faces", self.faces, FACES_RANGE, optional=True)
        if not isinstance(self.gaussians, bool) or not isinstance(self.preview, bool):
            raise ProtocolError("gaussians and preview must be true or false")
        if not isinstance(self.name, str) or len(self.name) > 200:
            raise ProtocolError("name must be a string of at most 200 characters")
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> JobParams:
        return _from_dict(cls, _loads(text, "params"), "job params").validate()


@dataclass
class SegmentParams:
    """Clicks in pixel coordinates of the image (x right, y down); labels 1 add, 0 remove."""

    points: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box: list[float] | None = None  # x0, y0, x1, y1
    image_id: str | None = None  # from POST /v1/images or an earlier segment reply
    model: str = "vit_h"

    def validate(self) -> SegmentParams:
        if self.model not in SAM_KINDS:
            raise ProtocolError(f"model must be one of {', '.join(SAM_KINDS)}, got {self.model!r}")
        if not isinstance(self.points, list) or not isinstance(self.labels, list):
            raise ProtocolError("points and labels must be lists")
        if len(self.points) != len(self.labels):
            raise ProtocolError(f"{len(self.points)} points but {len(self.labels)} labels: give one label per point")
        if not self.points and self.box is None:
            raise ProtocolError("give at least one point or a box")
        for point in self.points:
            if not isinstance(point, list) or len(point) != 2:
                raise ProtocolError(f"a point is [x, y], got {point!r}")
            for v in point:
                check_float("a point coordinate", v, (-1e9, 1e9))
        if any(label not in (0, 1) or isinstance(label, bool) for label in self.labels):
            raise ProtocolError("labels must be 1 (add) or 0 (remove)")
        if self.box is not None and (not isinstance(self.box, list) or len(self.box) != 4):
            raise ProtocolError(f"box is [x0, y0, x1, y1], got {self.box!r}")
        if self.image_id is not None and not (isinstance(self.image_id, str) and _is_hex_id(self.image_id)):
            raise ProtocolError("image_id must be the id the server returned for an upload")
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> SegmentParams:
        return _from_dict(cls, _loads(text, "params"), "segment params").validate()


def _is_hex_id(text: str) -> bool:
    return 8 <= len(text) <= 64 and all(c in "0123456789abcdef" for c in text)


def _loads(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise ProtocolError(f"{what} is not valid JSON: {error}") from None


@dataclass
class JobStatus:
    id: str
    state: str
    created: float  # unix time
    params: dict
    views: list[str]  # the uploaded image names, in the order given
    stage: str = ""  # queued, loading, encoding, structure, slat, decoding, exporting
    step: int = 0
    total: int = 0
    progress: float = 0.0  # 0..1 over the whole job
    started: float | None = None
    finished: float | None = None
    elapsed: float = 0.0  # seconds running
    eta: float | None = None  # seconds left, once it can be estimated
    error: str = ""
    results: list[str] = field(default_factory=list)  # names for GET .../results/{name}
    notices: list[str] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> JobStatus:
        return _from_dict(cls, data, "job status")


@dataclass
class SegmentReply:
    mask_png: str  # base64 of a greyscale PNG the size of the image, 255 inside
    score: float  # SAM's predicted IoU of the mask
    image_id: str  # send it back with the next click to reuse the cached embedding
    embedding_cached: bool
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SegmentReply:
        return _from_dict(cls, data, "segment reply")


def result_name(variant: int, suffix: str) -> str:
    """Result files of one job: ``variant0.glb``, ``variant0.ply``, ``variant0.png``."""
    return f"variant{variant}{suffix}"

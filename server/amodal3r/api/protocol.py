"""The HTTP protocol between the reconstruction server and its clients, defined once.

Standard library only: Blender's Python imports this module (and ``client.py``) from the wheel the
extension bundles, the server imports it next to FastAPI. Every route lives under ``/v1/``; a change
that breaks a client bumps ``PROTOCOL_VERSION`` and the prefix.

Routes (every one, the OpenAPI document ``/v1/openapi.json`` included, needs
``Authorization: Bearer <token>``; the scheme is case-insensitive):

=======  =============================  ==========================================================
GET      /v1/health                     ``{"status": "ok", "worker": "alive", "protocol": 1, ...}``;
                                        503 when the job worker has stopped
GET      /v1/info                       version, protocol, device, dtype, model_dir, models
                                        present and loaded, memory, queue length
POST     /v1/jobs                       multipart: ``params`` (JSON ``JobParams``) and per view i
                                        ``view{i}_image`` with ``view{i}_target_mask`` [+
                                        ``view{i}_occluder_mask``] or ``view{i}_mask``
                                        -> 202 ``JobStatus``
GET      /v1/jobs                       ``{"jobs": [JobStatus, ...]}``, newest first
GET      /v1/jobs/{id}                  ``JobStatus``
POST     /v1/jobs/{id}/cancel           ``JobStatus``
GET      /v1/jobs/{id}/results/{name}   a file named in ``JobStatus.results``
POST     /v1/place                      multipart ``params`` (JSON ``PlaceParams``), ``mesh`` (a
                                        GLB) and ``view0_*`` files as for a job -> the ``pose.json``
                                        object (see ``api/camera.py``)
POST     /v1/images                     multipart ``image`` -> ``{"image_id": ...}`` (for segment)
POST     /v1/segment                    multipart ``params`` (JSON ``SegmentParams``) and either
                                        ``image`` or ``params.image_id`` -> ``SegmentReply``
                                        (the mask as a base64 PNG, white = inside)
GET      /v1/models                     ``{"model_dir": ..., "components": [...]}``
POST     /v1/models/download            JSON ``{"components": [...]}`` -> download status
GET      /v1/models/download            state, component, file, bytes done/total, error
=======  =============================  ==========================================================

Errors are JSON ``{"detail": "<what went wrong and what to do>"}``: 400 a malformed request (a
multipart body that does not parse, two ``Authorization`` headers, a ``Host`` that is not this
server), 401/403 a missing/wrong token, 404 an unknown job, result or image, 408 a body that
stalls, 409 a missing SAM checkpoint or a download already running, 413 a body over the upload
limit, 422 input the server cannot use (the field is named), 503 a stopped job worker, 507 a full
data disk. A 500 is a bug.

Limits: images are PNG, JPEG, WebP, TIFF or BMP and masks PNG (the decoded format counts, not the
name); all views of one request hold at most ``MAX_REQUEST_PIXELS`` image pixels together (masks
are the size of their image); a request body is at most ``MAX_UPLOAD_BYTES`` (the server's
``--max-upload-mb``); a segment request has at most ``MAX_SEGMENT_POINTS`` clicks. A client that
has not sent its headers ``HEADER_TIMEOUT_S`` seconds after connecting (or after the previous
reply), or that sends no body bytes for ``BODY_IDLE_TIMEOUT_S`` seconds, is dropped. Images
uploaded for click-to-mask are kept for the most recent ``KEEP_SEGMENT_IMAGES`` of them, at most
``KEEP_SEGMENT_IMAGE_BYTES`` together; an older ``image_id`` answers 404 (upload the image again).
Masks travel as PNGs in the formats of ``api/masks.py``.
"""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .camera import POSE_SUFFIX, CameraError, Intrinsics
from .errors import ProtocolError

PROTOCOL_VERSION = 1
API_PREFIX = "/v1"
LISTENING_PREFIX = "listening on "  # the stdout line a parent process waits for
STATE_FILE = "server.json"  # in the data folder: url, pid, protocol of the running server

MAX_VIEWS = 8
MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # one request body
MAX_IMAGE_PIXELS = 100_000_000  # one image
MAX_REQUEST_PIXELS = 100_000_000  # the images of all views of one request together
MAX_SEGMENT_POINTS = 64  # clicks of one segment request
MAX_COORDINATE = 1e6  # |x| and |y| of a click or box corner, in pixels
HEADER_TIMEOUT_S = 10.0  # seconds from connecting (or from the last reply) to the end of the headers
BODY_IDLE_TIMEOUT_S = 30.0  # seconds a request body may stall before the request gets 408
KEEP_SEGMENT_IMAGES = 32  # images uploaded for click-to-mask, least recently used dropped first
KEEP_SEGMENT_IMAGE_BYTES = 512 * 1024 * 1024

# Decoded file formats (Pillow's names) the server and the command line accept.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")
MASK_FORMATS = ("PNG",)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
FINAL_STATES = (DONE, FAILED, CANCELLED)
RESULT_SUFFIXES = (".glb", POSE_SUFFIX, ".png", ".ply")  # in the order clients fetch them: meshes and poses first

# How a job's notice that its model folder holds tiny random weights begins (the add-on offers real ones).
RANDOM_WEIGHTS_NOTICE_START = "NOTE: the model folder holds tiny RANDOM weights"

VIEW_FILES = ("image", "target_mask", "occluder_mask", "mask")
MULTIVIEW_MODES = ("stochastic", "multidiffusion")
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


def _range(low: float, high: float | None = None) -> dict[str, float]:
    """Field metadata: JSON Schema bounds, read by validation and by the OpenAPI document alike."""
    return {"minimum": low} if high is None else {"minimum": low, "maximum": high}


def _scalar(hint: Any) -> type | None:
    """``int``, ``float``, ``bool`` or ``str`` for a field typed so (or ``X | None``); None otherwise."""
    origin = typing.get_origin(hint)
    if origin is None:
        args = [hint]
    elif origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
    else:
        return None
    return args[0] if len(args) == 1 and args[0] in (int, float, bool, str) else None


def _describe(kind: type, meta: Mapping[str, Any]) -> str:
    if "enum" in meta:
        return f"one of {', '.join(meta['enum'])}"
    if kind is bool:
        return "true or false"
    if kind is str:
        return f"a string of at most {meta['maxLength']} characters" if "maxLength" in meta else "a string"
    noun = "an integer" if kind is int else "a number"
    low, high = meta.get("minimum"), meta.get("maximum")
    if high is not None:
        return f"{noun} in {low}..{high}"
    return f"{noun} >= {low}" if low is not None else noun


def _valid_scalar(kind: type, value: Any, meta: Mapping[str, Any]) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is str:
        return (
            isinstance(value, str)
            and value in meta.get("enum", (value,))
            and len(value) <= meta.get("maxLength", len(value))
        )
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        return False
    if not math.isfinite(value):
        return False
    return meta.get("minimum", value) <= value <= meta.get("maximum", value)


def check_setting(cls: type, name: str, value: Any) -> None:
    """One field of ``cls`` (e.g. ``JobParams.texture_size``) against its type and bounds, alone: for
    a command line that checks its options before any work."""
    spec = next(f for f in fields(cls) if f.name == name)
    kind = _scalar(typing.get_type_hints(cls)[name])
    if kind is not None and not _valid_scalar(kind, value, spec.metadata):
        raise ProtocolError(f"must be {_describe(kind, spec.metadata)}, got {value!r}")


def setting_range(cls: type, name: str) -> tuple[Any, Any]:
    """``(minimum, maximum)`` of a bounded field of ``cls``: a client's controls offer what the server takes."""
    meta = next(f for f in fields(cls) if f.name == name).metadata
    return meta["minimum"], meta["maximum"]


def _check_fields(record: Any) -> None:
    """Each scalar field against its type and metadata; lists of strings item by item."""
    hints = typing.get_type_hints(type(record))
    for f in fields(record):
        value, hint = getattr(record, f.name), hints[f.name]
        if value is None and f.default is None:
            continue
        kind = _scalar(hint)
        if kind is not None and not _valid_scalar(kind, value, f.metadata):
            raise ProtocolError(f"{f.name} must be {_describe(kind, f.metadata)}, got {value!r}")
        if hint == list[str] and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ProtocolError(f"{f.name} must be a list of strings")
        if hint is dict and not isinstance(value, dict):
            raise ProtocolError(f"{f.name} must be a JSON object")


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


FOV_RANGE = _range(1.0, 179.0)  # a horizontal field of view, degrees


def _check_camera(camera: Any) -> None:
    """A ``camera`` field holds the six ``camera.json`` intrinsics of the full photo."""
    if camera is None:
        return
    try:
        Intrinsics.from_dict(camera, "camera")
    except CameraError as error:
        raise ProtocolError(str(error)) from None


@dataclass
class PlaceParams:
    """How to see the photo when fitting a pose: its intrinsics, else a horizontal field of view,
    else (neither) the photo's EXIF focal length or a 50 mm equivalent."""

    camera: dict | None = None  # camera.json: width, height, fx, fy, cx, cy of the full photo
    fov: float | None = field(default=None, metadata=FOV_RANGE)

    def validate(self) -> PlaceParams:
        _check_fields(self)
        _check_camera(self.camera)
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> PlaceParams:
        return _from_dict(cls, _loads(text, "params"), "place params").validate()


@dataclass
class JobParams:
    """The run settings of ``amodal3r reconstruct``; None means the pipeline's default."""

    seed: int = field(default=0, metadata=_range(0, 2**31 - 1))
    variants: int = field(default=1, metadata=_range(1, 8))
    multiview: str = field(default="stochastic", metadata={"enum": MULTIVIEW_MODES})
    structure_steps: int | None = field(default=None, metadata=_range(1, 500))
    structure_cfg: float | None = field(default=None, metadata=_range(0.0, 100.0))
    slat_steps: int | None = field(default=None, metadata=_range(1, 500))
    slat_cfg: float | None = field(default=None, metadata=_range(0.0, 100.0))
    texture_size: int = field(default=1024, metadata=_range(64, 8192))
    faces: int | None = field(default=None, metadata=_range(100, 10_000_000))
    gaussians: bool = False
    preview: bool = True
    name: str = field(default="", metadata={"maxLength": 200})  # shown in job lists; the Blender object name
    place: bool = False  # also fit each variant's pose to the first view's photo: variant<i>.pose.json
    camera: dict | None = None  # with place: as PlaceParams.camera
    fov: float | None = field(default=None, metadata=FOV_RANGE)  # with place: as PlaceParams.fov

    def validate(self) -> JobParams:
        _check_fields(self)
        _check_camera(self.camera)
        return self

    @property
    def placement(self) -> PlaceParams:
        return PlaceParams(self.camera, self.fov)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> JobParams:
        return _from_dict(cls, _loads(text, "params"), "job params").validate()


def _coordinates_schema(count: int) -> dict[str, Any]:
    coordinate = {"type": "number", "minimum": -MAX_COORDINATE, "maximum": MAX_COORDINATE}
    return {"type": "array", "items": coordinate, "minItems": count, "maxItems": count}


@dataclass
class SegmentParams:
    """Clicks in pixel coordinates of the image (x right, y down); labels 1 add, 0 remove."""

    points: list[list[float]] = field(
        default_factory=list, metadata={"maxItems": MAX_SEGMENT_POINTS, "items": _coordinates_schema(2)}
    )
    labels: list[int] = field(
        default_factory=list, metadata={"maxItems": MAX_SEGMENT_POINTS, "items": {"type": "integer", "enum": [0, 1]}}
    )
    box: list[float] | None = field(
        default=None, metadata={"anyOf": [_coordinates_schema(4), {"type": "null"}]}
    )  # x0, y0, x1, y1
    image_id: str | None = field(default=None, metadata={"pattern": "^[0-9a-f]{8,64}$"})  # from POST /v1/images
    model: str = field(default="vit_h", metadata={"enum": SAM_KINDS})

    def validate(self) -> SegmentParams:
        _check_fields(self)
        if not isinstance(self.points, list) or not isinstance(self.labels, list):
            raise ProtocolError("points and labels must be lists")
        if len(self.points) > MAX_SEGMENT_POINTS:
            raise ProtocolError(f"{len(self.points)} points: give at most {MAX_SEGMENT_POINTS} clicks per request")
        if len(self.points) != len(self.labels):
            raise ProtocolError(f"{len(self.points)} points but {len(self.labels)} labels: give one label per point")
        if not self.points and self.box is None:
            raise ProtocolError("give at least one point or a box")
        for point in self.points:
            _check_coordinates("a point", point, 2)
        if any(label not in (0, 1) or isinstance(label, bool) for label in self.labels):
            raise ProtocolError("labels must be 1 (add) or 0 (remove)")
        if self.box is not None:
            _check_coordinates("box", self.box, 4)
            if not (self.box[0] < self.box[2] and self.box[1] < self.box[3]):
                raise ProtocolError(f"box {self.box} is empty: give [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
        if self.image_id is not None and not _is_hex_id(self.image_id):
            raise ProtocolError("image_id must be the id the server returned for an upload")
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> SegmentParams:
        return _from_dict(cls, _loads(text, "params"), "segment params").validate()


def _check_coordinates(what: str, value: Any, count: int) -> None:
    """``count`` finite pixel coordinates within ``MAX_COORDINATE``."""
    names = "[x, y]" if count == 2 else "[x0, y0, x1, y1]"
    if not isinstance(value, list) or len(value) != count:
        raise ProtocolError(f"{what} is {names}, got {value!r}")
    for v in value:
        if not _valid_scalar(float, v, _range(-MAX_COORDINATE, MAX_COORDINATE)):
            raise ProtocolError(
                f"{what} is {names} of numbers in -{MAX_COORDINATE:,.0f}..{MAX_COORDINATE:,.0f}, got {value!r}"
            )


def _is_hex_id(text: str) -> bool:
    return 8 <= len(text) <= 64 and all(c in "0123456789abcdef" for c in text)


def _loads(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise ProtocolError(f"{what} is not valid JSON: {reason}") from None


@dataclass
class JobStatus:
    id: str
    state: str = field(metadata={"enum": STATES})
    created: float = field(metadata=_range(0))  # unix time
    params: dict
    views: list[str]  # the uploaded image names, in the order given
    stage: str = ""  # queued, loading, encoding, structure, slat, decoding, exporting, placing
    step: int = field(default=0, metadata=_range(0))
    total: int = field(default=0, metadata=_range(0))
    progress: float = field(default=0.0, metadata=_range(0.0, 1.0))  # over the whole job
    started: float | None = None
    finished: float | None = None
    elapsed: float = field(default=0.0, metadata=_range(0.0))  # seconds running
    eta: float | None = field(default=None, metadata=_range(0.0))  # seconds left, once it can be estimated
    error: str = ""
    results: list[str] = field(default_factory=list)  # names for GET .../results/{name}
    notices: list[str] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def validate(self) -> JobStatus:
        """A record read back from disk: every field typed and in range, its params valid, its results
        plain result names (a record must never make the server serve another path)."""
        _check_fields(self)
        _from_dict(JobParams, self.params, "job params").validate()
        bad = [name for name in self.results if not is_result_name(name)]
        if bad:
            raise ProtocolError(f"results must be result file names like {result_name(0, '.glb')}, got {bad[0]!r}")
        return self

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


def json_schema(cls: type) -> dict[str, Any]:
    """JSON Schema of a protocol dataclass, from its type hints and field metadata (for OpenAPI)."""
    hints = typing.get_type_hints(cls)
    properties = {f.name: {**_type_schema(hints[f.name]), **f.metadata} for f in fields(cls)}
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    return {**schema, "required": required} if required else schema


def _type_schema(hint: Any) -> dict[str, Any]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        return {"anyOf": [_type_schema(inner[0]), {"type": "null"}]}
    if typing.get_origin(hint) is list:
        return {"type": "array", "items": _type_schema(args[0])}
    return {"type": _JSON_TYPES[hint]}


_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string", dict: "object"}


def result_name(variant: int, suffix: str) -> str:
    """Result files of one job: ``variant0.glb``, ``variant0.ply``, ``variant0.png``, ``variant0.pose.json``."""
    return f"variant{variant}{suffix}"


def is_result_name(name: str) -> bool:
    """Whether ``name`` is one that :func:`result_name` makes (and so a plain file name)."""
    stem, dot, suffix = name.partition(".")
    return stem.startswith("variant") and stem[7:].isdigit() and f"{dot}{suffix}" in RESULT_SUFFIXES

"""What ``/v1/openapi.json`` says of each route: its request body and every status it answers.

The routes read their bodies themselves (multipart with JSON ``params``, files per view), so FastAPI
cannot infer them; these descriptions are built from the protocol's own schemas and limits, which
lets a schema-driven fuzzer (the test suite runs one) exercise every route and check every reply.
"""

from __future__ import annotations

from typing import Any

from amodal3r.api.camera import FIELDS as CAMERA_FIELDS
from amodal3r.api.camera import MAX_CANDIDATES
from amodal3r.api.protocol import (
    MAX_VIEWS,
    VIEW_FILES,
    JobParams,
    JobStatus,
    PlaceParams,
    SegmentParams,
    SegmentReply,
    json_schema,
    view_field,
)

ERROR = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
FILE = {"type": "string", "format": "binary"}
REASONS = {
    400: "malformed request: a multipart body that does not parse, two Authorization headers, a foreign Host",
    401: "no bearer token",
    403: "wrong token",
    404: "no such job, result or image",
    408: "the request body stalled",
    409: "a missing SAM checkpoint, or a download already running",
    413: "the request body is over the upload limit",
    422: "input the server cannot use; the detail names the field",
    503: "the job worker has stopped",
    507: "the data folder's disk is full",
}
GUARDED = (400, 401, 403, 408, 413)  # any route: the request guard answers these before the route runs
HEALTH = {
    "type": "object",
    "properties": {
        "status": {"type": "string"},
        "worker": {"type": "string"},
        "protocol": {"type": "integer"},
        "version": {"type": "string"},
    },
    "required": ["status", "protocol", "version"],
}
JOB_LIST = {"type": "object", "properties": {"jobs": {"type": "array", "items": json_schema(JobStatus)}}}
IMAGE_ID = {"type": "object", "properties": {"image_id": {"type": "string"}}, "required": ["image_id"]}
OBJECT = {"type": "object"}
RESULT_TYPES = {
    ".glb": "model/gltf-binary",
    ".png": "image/png",
    ".ply": "application/octet-stream",
    ".json": "application/json",
}
_ROW = {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4}
MATRIX = {"type": "array", "items": _ROW, "minItems": 4, "maxItems": 4}
POSE = {  # api/camera.py's Pose.to_dict
    "type": "object",
    "properties": {
        "object_to_camera": MATRIX,
        "camera": {
            "type": "object",
            "properties": {name: {"type": "number"} for name in CAMERA_FIELDS},
            "required": list(CAMERA_FIELDS),
        },
        "score": {"type": "number"},
        "candidates": {
            "type": "array",
            "maxItems": MAX_CANDIDATES,
            "items": {
                "type": "object",
                "properties": {"object_to_camera": MATRIX, "score": {"type": "number"}},
                "required": ["object_to_camera", "score"],
            },
        },
    },
    "required": ["object_to_camera", "camera", "score", "candidates"],
}


def route(
    ok: dict[str, Any] | None,
    *codes: int,
    status: int = 200,
    body: dict[str, Any] | None = None,
    media: dict[str, dict] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of a FastAPI route decorator: the success reply (JSON ``ok`` or ``media``
    types), the error statuses ``codes`` besides the guard's, and the request ``body``."""
    content = media or {"application/json": {"schema": ok}}
    responses: dict[int | str, Any] = {status: {"description": "success", "content": content}}
    for code in sorted(set(GUARDED + codes)):
        responses[code] = {"description": REASONS[code], "content": {"application/json": {"schema": ERROR}}}
    extra = {"requestBody": body} if body is not None else {}
    return {"status_code": status, "response_model": None, "responses": responses, "openapi_extra": extra}


def multipart(properties: dict[str, Any], required: list[str], json_fields: tuple[str, ...]) -> dict[str, Any]:
    """A multipart/form-data request body; ``json_fields`` are parts holding JSON text."""
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    encoding = {name: {"contentType": "application/json"} for name in json_fields}
    return {"required": True, "content": {"multipart/form-data": {"schema": schema, "encoding": encoding}}}


def job_body() -> dict[str, Any]:
    files = {view_field(i, kind): FILE for i in range(MAX_VIEWS) for kind in VIEW_FILES}
    return multipart({"params": json_schema(JobParams), **files}, ["params", view_field(0, "image")], ("params",))


def place_body() -> dict[str, Any]:
    files = {view_field(0, kind): FILE for kind in VIEW_FILES}
    return multipart(
        {"params": json_schema(PlaceParams), "mesh": FILE, **files},
        ["params", "mesh", view_field(0, "image")],
        ("params",),
    )


def image_body() -> dict[str, Any]:
    return multipart({"image": FILE}, ["image"], ())


def segment_body() -> dict[str, Any]:
    return multipart({"params": json_schema(SegmentParams), "image": FILE}, ["params"], ("params",))


def download_body(components: list[str]) -> dict[str, Any]:
    schema = {
        "type": "object",
        "properties": {"components": {"type": "array", "items": {"type": "string", "enum": components}, "minItems": 1}},
        "required": ["components"],
    }
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def result_media() -> dict[str, dict]:
    """Each result type's reply; ``pose.json`` is the pose object."""
    return {
        media: {"schema": POSE if media == "application/json" else FILE} for media in sorted(set(RESULT_TYPES.values()))
    }


def job_status() -> dict[str, Any]:
    return json_schema(JobStatus)


def segment_reply() -> dict[str, Any]:
    return json_schema(SegmentReply)


def finish(document: dict[str, Any]) -> dict[str, Any]:
    """The generated document made true: every route (this document's included) takes the bearer
    token, and a 422 FastAPI adds for its own parameter checks answers the protocol's error form."""
    components = document.setdefault("components", {})
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    document["security"] = [{"bearer": []}]
    for path in document.get("paths", {}).values():
        for operation in path.values():
            if "422" in operation.get("responses", {}):
                operation["responses"]["422"] = {
                    "description": REASONS[422],
                    "content": {"application/json": {"schema": ERROR}},
                }
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    if not components.get("schemas", True):
        del components["schemas"]
    return document

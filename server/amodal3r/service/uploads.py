"""Multipart uploads: parsed, then checked, decoded and stored off the event loop, each view exactly once.

A job's views are refused as a whole, before anything is stored, when their images hold more than
``MAX_REQUEST_PIXELS`` together (read from the headers, before decoding) or when any file fails a
check of ``io.inputs``. The checked, downscaled views are what the job store keeps for the worker.
At most ``DECODE_SLOTS`` requests decode at once, which bounds the memory decoding can take.

A job that asks for placement gets its camera here, while the uploaded photo (its EXIF, its full
upright size) is at hand: the worker only sees the working-size copy. The resolved intrinsics go
into the job's ``params.camera``, so the job record shows the camera its poses were fitted in.
A ``POST /v1/place`` request is checked the same way (one view) and fitted under ``PLACE_SLOTS``.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import HTTPException, Request

from amodal3r.api.protocol import (
    MAX_REQUEST_PIXELS,
    MAX_VIEWS,
    JobParams,
    JobStatus,
    PlaceParams,
    ProtocolError,
    parse_view_field,
)
from amodal3r.io.camera import photo_camera
from amodal3r.io.inputs import Upload, View, image_size, load_view, read_rgb
from amodal3r.pipelines.placement import fit_glb

from .job_store import JobStore

DECODE_SLOTS = 2
PLACE_SLOTS = 1  # POST /v1/place fits at once: each takes a few CPU seconds, the others wait their turn
PLACE_FIELDS = ("params", "mesh")  # a place form's fields besides view0's files
_decoding = threading.BoundedSemaphore(DECODE_SLOTS)


@dataclass
class ViewUpload:
    """The files of one view, by kind (``image``, ``target_mask``, ...), and the image's file name."""

    files: dict[str, Upload]
    filename: str


async def read_form(request: Request):
    """The multipart form; a body that does not parse is the client's 400, the guard's 408/413 pass on."""
    try:
        return await request.form(max_files=4 * MAX_VIEWS + 1, max_fields=8)
    except HTTPException:
        raise
    except Exception as error:  # noqa: BLE001 - any parse failure is the client's malformed body
        reason = str(error) or type(error).__name__
        raise HTTPException(400, f"malformed multipart body ({reason}): send multipart/form-data fields") from None


async def view_uploads(form, other: tuple[str, ...] = ("params",)) -> list[ViewUpload]:
    """The ``view{i}_{kind}`` files of a form (whose ``other`` fields are read elsewhere), numbered
    from 0 without gaps, each view with an image."""
    views: dict[int, ViewUpload] = {}
    for key, value in form.multi_items():
        if key in other:
            continue
        index, kind = parse_view_field(key)
        if isinstance(value, str):
            raise ProtocolError(f"{key} must be a file upload")
        if index >= MAX_VIEWS:
            raise ProtocolError(f"at most {MAX_VIEWS} views per job")
        view = views.setdefault(index, ViewUpload({}, ""))
        if kind in view.files:
            raise ProtocolError(f"{key} given twice")
        filename = Path(value.filename or key).name
        view.files[kind] = Upload(f"{key} ({filename})", await value.read())
        if kind == "image":
            view.filename = filename
    if not views:
        raise ProtocolError("no views: upload view0_image with view0_target_mask (or view0_mask)")
    if sorted(views) != list(range(len(views))):
        raise ProtocolError(f"views must be numbered 0..{len(views) - 1} without gaps, got {sorted(views)}")
    for index, view in views.items():
        if "image" not in view.files:
            raise ProtocolError(f"view {index} has masks but no view{index}_image")
    return [views[i] for i in range(len(views))]


def store_job(store: JobStore, params: JobParams, uploads: list[ViewUpload]) -> JobStatus:
    """Check the pixel budget, decode and check every view once, store the views as a queued job
    (run it in a thread: it takes seconds for large images). Nothing is stored for a refused job."""
    check_budget(uploads)
    with _decoding:
        try:
            if params.place:
                camera = photo_camera(uploads[0].files["image"], params.placement)
                params = replace(params, camera=camera.to_dict())
            return store.create(params, check_views(uploads), [upload.filename for upload in uploads])
        finally:
            give_back_memory()


async def mesh_upload(form) -> Upload:
    """The ``mesh`` file of a place form (a GLB; its content is checked when it is read)."""
    value = form.get("mesh")
    if value is None or isinstance(value, str):
        raise ProtocolError("upload the reconstructed GLB as the multipart file field 'mesh'")
    return Upload(f"mesh ({Path(value.filename or 'mesh.glb').name})", await value.read())


def place(params: PlaceParams, mesh: Upload, uploads: list[ViewUpload]) -> dict:
    """The ``pose.json`` object of ``mesh`` in the one view of a place request (run it in a thread;
    the caller holds a place slot)."""
    if len(uploads) != 1:
        raise ProtocolError(f"placement takes one view (view0_*), got {len(uploads)}: send only the photo's view")
    check_budget(uploads)
    with _decoding:
        try:
            camera = photo_camera(uploads[0].files["image"], params)
            view = check_views(uploads)[0]
        finally:
            give_back_memory()
    return fit_glb(mesh, view, camera).to_dict()


def check_budget(uploads: list[ViewUpload]) -> None:
    """All images of one request together within ``MAX_REQUEST_PIXELS``, read from their headers."""
    sizes = [image_size(view.files["image"]) for view in uploads]
    total = sum(width * height for width, height in sizes)
    if total > MAX_REQUEST_PIXELS:
        listed = ", ".join(f"{w}x{h}" for w, h in sizes)
        raise ProtocolError(
            f"the views hold {total:,} pixels together ({listed}), more than {MAX_REQUEST_PIXELS:,} per request: "
            "downscale the images (the model sees 518 pixels) or send fewer views"
        )


def check_views(uploads: list[ViewUpload]) -> list[View]:
    """Every view decoded and checked once, named after its image file."""
    views = []
    for index, upload in enumerate(uploads):
        files = upload.files
        view = load_view(files["image"], files.get("target_mask"), files.get("occluder_mask"), files.get("mask"))
        view.name = Path(upload.filename).stem or f"view{index}"
        views.append(view)
    return views


def give_back_memory() -> None:
    """Return freed decoder buffers to the OS. glibc keeps them in the arena of the thread that
    decoded (Pillow allocates images in 16 MiB blocks, below its mmap threshold): without this,
    every large upload left the server's resident memory higher for good."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # another C library: nothing to trim this way
        pass


def check_image(data: bytes) -> None:
    """An image for click-to-mask must decode (run it in a thread)."""
    with _decoding:
        try:
            read_rgb(Upload("image", data))
        finally:
            give_back_memory()


def decode_rgb(path: Path):
    """The stored pixels of an uploaded image, for SAM (run it in a thread)."""
    with _decoding:
        return read_rgb(path)

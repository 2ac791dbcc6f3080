# SPDX-License-Identifier: GPL-3.0-or-later
"""Click-to-mask in the Image Editor: clicks on the photo become SAM prompts on the server.

Click adds a positive point, Ctrl+click a negative one, Backspace drops the last point. Each
request is a ``Task`` in a worker thread (the first sends the photo, later ones its ``image_id`` so
the server reuses the cached embedding); the mask layer changes on the main thread only. Enter
keeps the result, Esc puts the layer back as it was. The editor shows the green/red overlay
meanwhile. The pieces (coordinates, the session, the request) are plain functions and classes so
tests can drive them: Blender never runs ``modal()`` without a user interface.
"""

from __future__ import annotations

from typing import ClassVar

import bpy
import numpy as np
from bpy.props import BoolProperty

from amodal3r.api.client import ServerError, ServerUnavailable
from amodal3r.api.errors import InputError
from amodal3r.api.protocol import SegmentParams, SegmentReply

from ..core import masks
from ..core.backend import Backend, BackendError, get_backend
from ..core.tasks import Task
from ..ui.preferences import backend_settings
from ..ui.properties import active_view, get_settings
from .images import (
    LAYER_SUFFIXES,
    UserError,
    encode_source,
    image_size,
    layer_image,
    overlay_image,
    read_layer,
    read_pixels,
    view_image,
    write_layer,
    write_pixels,
)

TIMER_SECONDS = 0.1
PASS_THROUGH = {
    "MIDDLEMOUSE",
    "WHEELUPMOUSE",
    "WHEELDOWNMOUSE",
    "TRACKPADPAN",
    "TRACKPADZOOM",
    "MOUSEMOVE",
    "NDOF_MOTION",
    "NUMPAD_PLUS",
    "NUMPAD_MINUS",
    "NUMPAD_PERIOD",
    "HOME",
}


def view_to_pixel(view_x: float, view_y: float, width: int, height: int) -> tuple[float, float] | None:
    """Image Editor view coordinates (0..1 from the bottom left) as pixel coordinates of the image
    (x right, y down, as the server counts), or None outside the image."""
    if not (0.0 <= view_x <= 1.0 and 0.0 <= view_y <= 1.0):
        return None
    return min(view_x * width, width - 0.5), min((1.0 - view_y) * height, height - 0.5)


class SegmentSession:
    """The clicks of one click-to-mask session and the layer they build on."""

    def __init__(self, before: np.ndarray, model: str, subtract: bool = False):
        self.before = np.asarray(before, bool).copy()  # the layer when the session began (Esc restores it)
        self.model = model
        self.subtract = subtract
        self.points: list[list[float]] = []
        self.labels: list[int] = []
        self.image_id: str | None = None
        self.revision = 0  # counts changes of the clicks, so a late answer can be told from a current one

    def add_click(self, x: float, y: float, positive: bool) -> None:
        self.points.append([float(x), float(y)])
        self.labels.append(1 if positive else 0)
        self.revision += 1

    def drop_last(self) -> None:
        if self.points:
            self.points.pop()
            self.labels.pop()
            self.revision += 1

    def params(self) -> SegmentParams:
        return SegmentParams(
            points=[list(p) for p in self.points], labels=list(self.labels), image_id=self.image_id, model=self.model
        ).validate()

    def apply(self, mask_png: bytes, reply: SegmentReply) -> np.ndarray:
        """The layer with SAM's mask for all clicks so far added to (or cut from) the starting layer."""
        height, width = self.before.shape
        segment = masks.decode_layer(mask_png, width, height)
        self.image_id = reply.image_id
        return masks.combine(self.before, segment, self.subtract)

    def reset(self) -> np.ndarray:
        """The layer with no clicks left: as it began."""
        return self.before.copy()


def request_mask(backend: Backend, params: SegmentParams, image_png: bytes) -> Task[tuple[bytes, SegmentReply]]:
    """One segment call in a worker thread; the modal operator's timer polls the task."""
    return Task(
        "Click-to-mask",
        lambda task: segment(backend, params, image_png),
        expected=(BackendError,),
        explain=segment_error_text,
    ).start()


def segment(backend: Backend, params: SegmentParams, image_png: bytes) -> tuple[bytes, SegmentReply]:
    """Ask the server for a mask; a server that forgot the image (it restarted) gets it again."""
    client = backend.client()
    if params.image_id is None:
        return client.segment(params, image_png)
    try:
        return client.segment(params)
    except ServerError as error:
        if error.status != 404:
            raise
        params.image_id = None
        return client.segment(params, image_png)


def segment_error_text(error: Exception) -> str:
    """What went wrong with a click, in words, whatever the error."""
    if isinstance(error, ServerError):
        return f"Click-to-mask failed: {error.detail}"
    if isinstance(error, ServerUnavailable):
        return f"Click-to-mask could not reach the server ({error}): restart it in the Amodal3R panel"
    if isinstance(error, InputError):
        return f"Click-to-mask got an unusable mask: {error}"
    return f"Click-to-mask failed unexpectedly: {error!r}"


def show_overlay(
    source: bpy.types.Image, preview: bpy.types.Image, target: bpy.types.Image, occluder: bpy.types.Image | None
) -> None:
    """Redraw the green/red overlay image from the current layers."""
    width, height = image_size(source)
    empty = masks.empty_layer(width, height)
    write_pixels(
        preview,
        masks.overlay(
            read_pixels(source),
            width,
            height,
            read_layer(target),
            read_layer(occluder) if occluder is not None else empty,
        ),
    )


class AMODAL3R_OT_click_mask(bpy.types.Operator):
    """Click the object to mask it with the segmentation model: click adds, Ctrl+click removes,
    Backspace undoes a click, Enter keeps the mask, Esc restores it"""

    bl_idname = "amodal3r.click_mask"
    bl_label = "Click to Mask"
    bl_options: ClassVar[set[str]] = {"REGISTER", "UNDO"}

    subtract: BoolProperty(  # type: ignore[valid-type]
        name="Subtract", default=False, description="Cut the clicked region out of the layer instead of adding it"
    )

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return context.area is not None and context.area.type == "IMAGE_EDITOR" and hasattr(context.scene, "amodal3r")

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        try:
            self._begin(context)
        except (UserError, InputError, BackendError) as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        self._timer = context.window_manager.event_timer_add(TIMER_SECONDS, window=context.window)
        context.window_manager.modal_handler_add(self)
        self._status(context, "click the object")
        return {"RUNNING_MODAL"}

    def execute(self, context: bpy.types.Context) -> set[str]:
        self.report({"ERROR"}, "Click to Mask needs mouse clicks: start it from the Image Editor's Amodal3R tab")
        return {"CANCELLED"}

    def _begin(self, context: bpy.types.Context) -> None:
        settings = get_settings(context)
        view = active_view(settings)
        self._source = view_image(view)
        self._layer_name = settings.segment_layer
        self._target = layer_image(view, self._layer_name, create=True)
        other = "OCCLUDER" if self._layer_name == "TARGET" else "TARGET"
        self._other = layer_image(view, other, create=True)
        self._image_png = encode_source(self._source)
        self._backend = get_backend(backend_settings(context))
        self._pixels_before = read_pixels(self._target)  # Esc puts these back exactly
        self._session = SegmentSession(read_layer(self._target), settings.sam_model, self.subtract)
        self._request: Task[tuple[bytes, SegmentReply]] | None = None
        self._request_revision = 0  # the session's clicks the request is for
        self._space = context.space_data
        self._shown_before = self._space.image
        self._preview = overlay_image(self._source)
        self._refresh()
        self._space.image = self._preview

    def _refresh(self) -> None:
        target, occluder = (self._target, self._other) if self._layer_name == "TARGET" else (self._other, self._target)
        show_overlay(self._source, self._preview, target, occluder)

    def _status(self, context: bpy.types.Context, state: str) -> None:
        layer = LAYER_SUFFIXES[self._layer_name]
        context.area.header_text_set(
            f"Click to mask ({layer}, {len(self._session.points)} points): {state}. "
            "Click adds, Ctrl+click removes, Backspace undoes, Enter keeps, Esc cancels"
        )

    def modal(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        if event.type == "TIMER":
            self._poll(context)
            return {"RUNNING_MODAL"}
        if event.type in {"RET", "NUMPAD_ENTER"} and event.value == "PRESS":
            return self._end(context, keep=True)
        if event.type == "ESC" and event.value == "PRESS":
            return self._end(context, keep=False)
        if event.type == "BACK_SPACE" and event.value == "PRESS":
            self._session.drop_last()
            self._send(context)
            return {"RUNNING_MODAL"}
        if event.type == "LEFTMOUSE" and event.value == "PRESS":
            return self._click(context, event)
        return {"PASS_THROUGH"} if event.type in PASS_THROUGH else {"RUNNING_MODAL"}

    def _click(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        region = context.region
        if region is None or region.type != "WINDOW":
            return {"PASS_THROUGH"}
        width, height = image_size(self._source)
        pixel = view_to_pixel(*region.view2d.region_to_view(event.mouse_region_x, event.mouse_region_y), width, height)
        if pixel is None:
            return {"RUNNING_MODAL"}
        self._session.add_click(*pixel, positive=not event.ctrl)
        self._send(context)
        return {"RUNNING_MODAL"}

    def _send(self, context: bpy.types.Context) -> None:
        """Ask for the mask of all clicks, unless a request is out (its answer triggers the next)."""
        if self._request is not None and not self._request.done:
            self._status(context, "waiting for the server")
            return
        if not self._session.points:
            write_layer(self._target, self._session.reset())
            self._refresh()
            self._status(context, "click the object")
            return
        self._request = request_mask(self._backend, self._session.params(), self._image_png)
        self._request_revision = self._session.revision
        self._status(context, "waiting for the server")

    def _poll(self, context: bpy.types.Context) -> None:
        request = self._request
        if request is None or not request.done:
            return
        self._request = None
        if request.error:
            self.report({"ERROR"}, request.error)
            self._status(context, "the last click failed, click again")
            return
        try:
            write_layer(self._target, self._session.apply(*request.result))
        except InputError as error:
            self.report({"ERROR"}, segment_error_text(error))
            return
        self._refresh()
        if self._request_revision != self._session.revision:
            self._send(context)
        else:
            self._status(context, f"mask score {request.result[1].score:.2f}")

    def _end(self, context: bpy.types.Context, keep: bool) -> set[str]:
        context.window_manager.event_timer_remove(self._timer)
        context.area.header_text_set(None)
        if not keep:
            write_pixels(self._target, self._pixels_before)
        self._space.image = self._shown_before
        if keep:
            self.report({"INFO"}, f"Kept the {LAYER_SUFFIXES[self._layer_name]} mask")
            return {"FINISHED"}
        return {"CANCELLED"}


classes = (AMODAL3R_OT_click_mask,)
register, unregister = bpy.utils.register_classes_factory(classes)

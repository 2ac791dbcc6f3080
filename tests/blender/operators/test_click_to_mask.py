# SPDX-License-Identifier: GPL-3.0-or-later
"""Click-to-mask's pieces in the bpy module (Blender never runs ``modal()`` here): view coordinates,
the session of clicks, the request as a background task, its errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from addon_helpers import H, W, addon_of, layer, module, override

from amodal3r.api.errors import InputError
from amodal3r_blender.core import masks


class FakeClient:
    """Answers segment requests with a fixed mask; forgets images on request (a restarted server)."""

    def __init__(self, mask_png: bytes):
        self.mask_png = mask_png
        self.calls: list[tuple[object, bool]] = []
        self.forget = False

    def segment(self, params, image=None):
        from amodal3r.api.client import ServerError
        from amodal3r.api.protocol import SegmentReply

        self.calls.append((params, image is not None))
        if image is None and self.forget:
            raise ServerError(404, "no image: upload it again")
        return self.mask_png, SegmentReply("", 0.9, "ab" * 8, image is None, 0.01)


def test_view_to_pixel(clean_scene):
    segment = module(clean_scene, "operators.segment")
    assert segment.view_to_pixel(0.0, 1.0, 100, 50) == (0.0, 0.0)  # top left
    assert segment.view_to_pixel(0.5, 0.25, 100, 50) == (50.0, 37.5)
    assert segment.view_to_pixel(1.0, 0.0, 100, 50) == (99.5, 49.5)
    assert segment.view_to_pixel(1.2, 0.5, 100, 50) is None
    assert segment.view_to_pixel(0.5, -0.1, 100, 50) is None


def test_segment_session_adds_subtracts_and_resets(with_masks, settings):
    segment = module(addon_of(settings), "operators.segment")
    images = module(addon_of(settings), "operators.images")
    sam = np.zeros((H, W), bool)
    sam[4:6, 0:3] = True
    client = FakeClient(masks.encode_layer(sam))
    backend = SimpleNamespace(client=lambda: client)
    session = segment.SegmentSession(layer(with_masks.view.target_mask), "vit_b")
    session.add_click(1.0, 1.0, positive=True)
    session.add_click(6.0, 2.0, positive=False)
    params = session.params()
    assert params.points == [[1.0, 1.0], [6.0, 2.0]] and params.labels == [1, 0] and params.model == "vit_b"
    request = segment.request_mask(backend, params, b"png")
    assert request.wait(10) and not request.error
    images.write_layer(with_masks.view.target_mask, session.apply(*request.result))
    assert np.array_equal(layer(with_masks.view.target_mask), with_masks.target | sam)
    assert session.image_id == "ab" * 8 and client.calls[0][1]  # the first request sent the image
    client.forget = True  # the server restarted: it gets the image again
    request = segment.request_mask(backend, session.params(), b"png")
    assert request.wait(10) and not request.error
    assert [sent for _, sent in client.calls[1:]] == [False, True]
    subtract = segment.SegmentSession(with_masks.target, "vit_b", subtract=True)
    cut = np.zeros((H, W), bool)
    cut[1, 4] = True
    assert np.array_equal(subtract.apply(masks.encode_layer(cut), request.result[1]), with_masks.target & ~cut)
    assert np.array_equal(session.reset(), with_masks.target)


def test_segment_errors_are_plain(clean_scene):
    segment = module(clean_scene, "operators.segment")
    from amodal3r.api.client import ServerError, ServerUnavailable

    def failing():
        raise ServerUnavailable("no reconstruction server answers at http://127.0.0.1:9")

    session = segment.SegmentSession(np.zeros((H, W), bool), "vit_h")
    session.add_click(1, 1, positive=True)
    request = segment.request_mask(SimpleNamespace(client=failing), session.params(), b"png")
    assert request.wait(10) and "could not reach the server" in request.error
    assert "checkpoint missing" in segment.segment_error_text(ServerError(422, "checkpoint missing"))
    wrong = segment.SegmentSession(np.zeros((3, 3), bool), "vit_h")
    with pytest.raises(InputError, match="returned mask"):
        wrong.apply(masks.encode_layer(np.zeros((H, W), bool)), SimpleNamespace(image_id="ab" * 8))


def test_click_mask_without_clicks_reports(with_masks):
    import bpy

    with override("IMAGE_EDITOR"), pytest.raises(RuntimeError, match="needs mouse clicks"):
        bpy.ops.amodal3r.click_mask()  # the module has no events: invoke() never runs

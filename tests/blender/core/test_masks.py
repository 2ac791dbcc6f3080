# SPDX-License-Identifier: GPL-3.0-or-later
"""Mask logic on Blender-style buffers (flat float32 RGBA, bottom row first), without bpy; the mask
formats and checks themselves are the server's (``amodal3r.api.masks``), used here through the
add-on's file encoders."""

from __future__ import annotations

import numpy as np
import pytest

from amodal3r.api.errors import InputError
from amodal3r.api.masks import GREY_BACKGROUND, GREY_OCCLUDER, GREY_TARGET
from amodal3r_blender.core import masks, png

W, H = 6, 4


def _buffer(rgba_rows_bottom_up: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgba_rows_bottom_up, np.float32).reshape(-1)


def _layer(*cells: tuple[int, int]) -> np.ndarray:
    """A Blender-order layer with the given (row from the bottom, column) cells set."""
    layer = np.zeros((H, W), bool)
    for row, column in cells:
        layer[row, column] = True
    return layer


def test_layer_from_pixels_reads_the_red_channel():
    pixels = np.zeros((H, W, 4), np.float32)
    pixels[0, 1, 0] = 1.0  # bottom row
    pixels[2, 3, 0] = 0.51
    pixels[3, 0, 0] = 0.5  # not above one half
    pixels[3, 5, 1:3] = 1.0  # green and blue only: outside
    layer = masks.layer_from_pixels(_buffer(pixels), W, H)
    assert layer.shape == (H, W)
    assert np.argwhere(layer).tolist() == [[0, 1], [2, 3]]


def test_pixels_from_layer_is_opaque_white_on_black():
    buffer = masks.pixels_from_layer(_layer((1, 2)))
    assert buffer.dtype == np.float32 and buffer.shape == (W * H * 4,)
    pixels = buffer.reshape(H, W, 4)
    assert pixels[1, 2].tolist() == [1, 1, 1, 1]
    assert pixels[0, 0].tolist() == [0, 0, 0, 1]
    assert np.array_equal(masks.layer_from_pixels(buffer, W, H), _layer((1, 2)))


def test_buffer_of_the_wrong_length_is_refused():
    with pytest.raises(InputError, match="6x4"):
        masks.layer_from_pixels(np.zeros(W * H * 3, np.float32), W, H)


def test_invert_clear_and_combine():
    layer = _layer((0, 0), (1, 1))
    assert masks.invert(layer).sum() == W * H - 2
    assert not masks.empty_layer(W, H).any() and masks.empty_layer(W, H).shape == (H, W)
    added = masks.combine(layer, _layer((1, 1), (2, 2)))
    assert np.argwhere(added).tolist() == [[0, 0], [1, 1], [2, 2]]
    cut = masks.combine(layer, _layer((1, 1), (2, 2)), subtract=True)
    assert np.argwhere(cut).tolist() == [[0, 0]]
    with pytest.raises(InputError, match="size"):
        masks.combine(layer, np.zeros((2, 2), bool))


def test_alpha_layer_and_its_errors():
    pixels = np.ones((H, W, 4), np.float32)
    pixels[:, :3, 3] = 0.0
    assert np.array_equal(masks.alpha_layer(_buffer(pixels), W, H)[:, 3:], np.ones((H, 3), bool))
    with pytest.raises(InputError, match="no transparent pixels"):
        masks.alpha_layer(_buffer(np.ones((H, W, 4))), W, H)
    with pytest.raises(InputError, match="fully transparent"):
        masks.alpha_layer(_buffer(np.zeros((H, W, 4))), W, H)


def test_flip_rows_swaps_bottom_up_and_top_down():
    layer = _layer((0, 0))
    flipped = masks.flip_rows(layer)
    assert flipped[H - 1, 0] and flipped.sum() == 1
    assert np.array_equal(masks.flip_rows(flipped), layer)


def _grey_file(values: np.ndarray) -> bytes:
    """A grey PNG of Blender-order values (the file holds them top row first)."""
    return png.encode_png(masks.flip_rows(np.asarray(values, np.uint8)))


def test_grey_format_values_are_exact():
    target = _layer((0, 0), (0, 1))
    occluder = _layer((0, 1), (3, 5))  # overlapping at (0, 1): the occluder is in front
    grey = masks.flip_rows(png.decode_png(masks.encode_grey(target, occluder))[:, :, 0])
    assert grey.dtype == np.uint8
    assert grey[0, 0] == 188 == GREY_TARGET
    assert grey[0, 1] == 0 == GREY_OCCLUDER
    assert grey[3, 5] == 0
    assert grey[2, 2] == 255 == GREY_BACKGROUND
    assert set(np.unique(grey).tolist()) == {0, 188, 255}


def test_grey_file_round_trip_and_orientation():
    target, occluder = _layer((0, 0), (1, 4)), _layer((3, 2))
    data = masks.encode_grey(target, occluder)
    pixels = png.decode_png(data)
    assert pixels.shape == (H, W, 1)
    assert pixels[H - 1, 0, 0] == 188  # Blender's bottom row is the file's last row
    assert pixels[0, 2, 0] == 0
    back_target, back_occluder = masks.decode_grey(data, W, H)
    assert np.array_equal(back_target, target) and np.array_equal(back_occluder, occluder)


def test_grey_thresholds_follow_the_reference():
    values = np.array([[0, 126, 127, 188, 230, 231, 255]], np.uint8)
    target, occluder = masks.decode_grey(_grey_file(values), 7, 1)
    assert occluder.tolist() == [[True, True, False, False, False, False, False]]
    assert target.tolist() == [[False, False, True, True, True, False, False]]


def test_label_images_are_understood():
    labels = np.array([[0, 1, 2, 1]], np.uint8)
    target, occluder = masks.decode_grey(_grey_file(labels), 4, 1)
    assert target.tolist() == [[False, True, False, True]]
    assert occluder.tolist() == [[False, False, True, False]]


def test_grey_file_of_another_size_is_refused():
    data = png.encode_png(np.full((3, 3), 188, np.uint8))
    with pytest.raises(InputError, match="3x3 but the image is 6x4"):
        masks.decode_grey(data, W, H)


def test_grey_file_with_alpha_uses_the_alpha():
    pixels = np.zeros((H, W, 2), np.uint8)
    pixels[:, :, 1] = 255
    pixels[0, 0, 1] = 188
    target, occluder = masks.decode_grey(png.encode_png(pixels), W, H)
    assert np.argwhere(target).tolist() == [[H - 1, 0]] and not occluder.any()


def test_binary_layer_png_round_trip():
    layer = _layer((0, 5), (2, 1))
    data = masks.encode_layer(layer)
    pixels = png.decode_png(data)
    assert pixels.shape == (H, W, 1) and set(np.unique(pixels).tolist()) == {0, 255}
    assert pixels[H - 1, 5, 0] == 255
    assert np.array_equal(masks.decode_layer(data, W, H), layer)
    with pytest.raises(InputError, match="returned mask"):
        masks.decode_layer(data, H, W)


def test_image_encoding_converts_linear_floats_to_srgb():
    pixels = np.zeros((H, W, 4), np.float32)
    pixels[0, 0, :3] = 0.5  # bottom-left
    pixels[H - 1, 0, :3] = 1.5  # top-left, over-bright
    linear = masks.rgb8_from_pixels(_buffer(pixels), W, H, linear=True)
    assert linear.shape == (H, W, 3)
    assert linear[H - 1, 0].tolist() == [188, 188, 188]  # sRGB of linear 0.5
    assert linear[0, 0].tolist() == [255, 255, 255]
    display = masks.rgb8_from_pixels(_buffer(pixels), W, H, linear=False)
    assert display[H - 1, 0].tolist() == [128, 128, 128]
    decoded = png.decode_png(masks.encode_image(_buffer(pixels), W, H, linear=False))
    assert np.array_equal(decoded, display)


def test_overlay_tints_target_green_and_occluders_red():
    pixels = np.full((H, W, 4), 0.2, np.float32)
    target, occluder = _layer((0, 0), (1, 1)), _layer((1, 1), (2, 2))
    out = masks.overlay(_buffer(pixels), W, H, target, occluder, opacity=0.5).reshape(H, W, 4)
    assert out[0, 0].tolist() == pytest.approx([0.1, 0.6, 0.1, 1.0])
    assert out[1, 1].tolist() == pytest.approx([0.6, 0.1, 0.1, 1.0])  # the occluder wins
    assert out[3, 3].tolist() == pytest.approx([0.2, 0.2, 0.2, 1.0])
    assert pixels[0, 0, 1] == pytest.approx(0.2)  # the source buffer is left alone


def test_validate_view_errors():
    target, occluder = _layer((1, 1)), _layer((1, 1))
    masks.validate_view(target, None, W, H)
    masks.validate_view(target, _layer((0, 0)), W, H)
    with pytest.raises(InputError, match="'mug': the target mask is empty"):
        masks.validate_view(np.zeros((H, W), bool), None, W, H, "'mug'")
    with pytest.raises(InputError, match="covers the whole target"):
        masks.validate_view(target, occluder, W, H)
    with pytest.raises(InputError, match="target mask .* is 4x6 but the image is 6x4"):
        masks.validate_view(np.ones((W, H), bool), None, W, H)
    with pytest.raises(InputError, match="occluder mask .* is 2x2"):
        masks.validate_view(target, np.zeros((2, 2), bool), W, H)

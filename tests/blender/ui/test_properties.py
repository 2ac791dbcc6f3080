# SPDX-License-Identifier: GPL-3.0-or-later
"""``scene.amodal3r`` in the bpy module: a source file loads into an image, and the ``use_``
switches of the sampler settings and the face count decide what reaches the server."""

from __future__ import annotations

import numpy as np
from addon_helpers import addon_of, module

from amodal3r_blender.core import png

SWITCHED = ("structure_steps", "structure_guidance", "slat_steps", "slat_guidance", "faces")


def test_source_file_loads_into_an_image(settings, tmp_path):
    path = tmp_path / "shot.png"
    path.write_bytes(png.encode_png(np.full((5, 7, 3), 90, np.uint8)))
    settings.source_kind = "FILE"
    settings.source_filepath = str(path)
    assert settings.source_image is not None and tuple(settings.source_image.size) == (7, 5)
    assert settings.views[0].image == settings.source_image
    settings.source_filepath = str(tmp_path / "missing.png")
    assert "Cannot open" in settings.last_error


def test_editing_a_value_switches_it_on(settings):
    assert not any(getattr(settings, f"use_{name}") for name in SWITCHED)  # the model's own values at first
    settings.slat_guidance = 4.5
    assert settings.use_slat_guidance and not settings.use_slat_steps
    settings.use_slat_guidance = False
    assert settings.slat_guidance == 4.5  # switched off, the value waits for the next time


def test_switched_off_values_are_left_to_the_model(settings):
    reconstruct = module(addon_of(settings), "operators.reconstruct")
    params = reconstruct.job_params(settings, "mug")
    left = [params.structure_steps, params.structure_cfg, params.slat_steps, params.slat_cfg, params.faces]
    assert left == [None] * 5
    settings.structure_steps, settings.faces = 2, 5000
    params = reconstruct.job_params(settings, "mug")
    assert (params.structure_steps, params.faces, params.slat_steps) == (2, 5000, None)

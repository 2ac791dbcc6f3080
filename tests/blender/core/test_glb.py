# SPDX-License-Identifier: GPL-3.0-or-later
"""The GLB writer Match Photo sends meshes with: read back by the chunk layout and accessors."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from amodal3r_blender.core import glb


def _read(data: bytes) -> tuple[dict, bytes]:
    magic, version, length = struct.unpack_from("<4sII", data)
    assert (magic, version, length) == (b"glTF", 2, len(data))
    json_length, kind = struct.unpack_from("<I4s", data, 12)
    assert kind == b"JSON" and json_length % 4 == 0
    document = json.loads(data[20 : 20 + json_length])
    bin_length, kind = struct.unpack_from("<I4s", data, 20 + json_length)
    assert kind == b"BIN\x00" and bin_length % 4 == 0
    return document, data[28 + json_length : 28 + json_length + bin_length]


def test_positions_and_triangles_read_back():
    positions = np.array([[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, -3]], dtype=np.float64)
    triangles = np.array([[0, 1, 2], [0, 2, 3], [0, 3, 1]])
    document, binary = _read(glb.mesh_glb(positions, triangles))
    points, indices = document["accessors"]
    views = document["bufferViews"]
    read_points = np.frombuffer(binary, "<f4", points["count"] * 3, views[0]["byteOffset"]).reshape(-1, 3)
    read_indices = np.frombuffer(binary, "<u4", indices["count"], views[1]["byteOffset"]).reshape(-1, 3)
    np.testing.assert_array_equal(read_points, positions)
    np.testing.assert_array_equal(read_indices, triangles)
    assert points["min"] == [0, 0, -3] and points["max"] == [1, 2, 0]  # required for POSITION
    assert document["buffers"][0]["byteLength"] == len(binary)
    primitive = document["meshes"][0]["primitives"][0]
    assert primitive == {"attributes": {"POSITION": 0}, "indices": 1, "mode": 4}


def test_no_triangles_or_a_bad_index_is_refused():
    with pytest.raises(ValueError, match="at least one triangle"):
        glb.mesh_glb(np.zeros((3, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="vertex 3 of 3"):
        glb.mesh_glb(np.zeros((3, 3)), np.array([[0, 1, 3]]))

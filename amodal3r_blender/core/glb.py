# SPDX-License-Identifier: GPL-3.0-or-later
"""A triangle mesh as a binary glTF (GLB), with the standard library and numpy only.

Match Photo sends the server the active mesh's surface, and a silhouette needs nothing but
positions and triangles. Writing that small file here, rather than through Blender's glTF
exporter, leaves the scene's selection alone, and avoids a crash of the bpy 4.2 module on exit
that follows any use of the exporter (its UI classes are freed after Python has shut down).
"""

from __future__ import annotations

import json
import struct

import numpy as np

MAGIC, VERSION = b"glTF", 2
JSON_CHUNK, BIN_CHUNK = b"JSON", b"BIN\x00"
FLOAT, UNSIGNED_INT = 5126, 5125  # accessor component types
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963  # buffer view targets
TRIANGLES = 4


def mesh_glb(positions: np.ndarray, triangles: np.ndarray) -> bytes:
    """One mesh, one node, one scene: ``positions`` ``[V, 3]`` (glTF's frame) and ``triangles`` ``[F, 3]``."""
    points = np.ascontiguousarray(positions, dtype="<f4").reshape(-1, 3)
    indices = np.ascontiguousarray(triangles, dtype="<u4").reshape(-1, 3)
    if len(points) == 0 or len(indices) == 0:
        raise ValueError("a GLB for placement needs at least one triangle")
    if indices.max() >= len(points):
        raise ValueError(f"a triangle refers to vertex {indices.max()} of {len(points)}")
    binary = points.tobytes() + indices.tobytes()  # both multiples of 4 bytes: no padding between
    document = {
        "asset": {"version": "2.0", "generator": "amodal3r-blender"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0}, "indices": 1, "mode": TRIANGLES}]}],
        "accessors": [
            {
                "bufferView": 0,
                "componentType": FLOAT,
                "count": len(points),
                "type": "VEC3",
                "min": points.min(axis=0).tolist(),
                "max": points.max(axis=0).tolist(),
            },
            {"bufferView": 1, "componentType": UNSIGNED_INT, "count": indices.size, "type": "SCALAR"},
        ],
        "bufferViews": [
            {"buffer": 0, "byteOffset": 0, "byteLength": points.nbytes, "target": ARRAY_BUFFER},
            {"buffer": 0, "byteOffset": points.nbytes, "byteLength": indices.nbytes, "target": ELEMENT_ARRAY_BUFFER},
        ],
        "buffers": [{"byteLength": len(binary)}],
    }
    text = json.dumps(document, separators=(",", ":")).encode()
    chunks = _chunk(JSON_CHUNK, text, b" ") + _chunk(BIN_CHUNK, binary, b"\x00")
    return struct.pack("<4sII", MAGIC, VERSION, 12 + len(chunks)) + chunks


def _chunk(kind: bytes, data: bytes, pad: bytes) -> bytes:
    """A GLB chunk, padded to a multiple of 4 bytes as the format requires."""
    data += pad * (-len(data) % 4)
    return struct.pack("<I4s", len(data), kind) + data

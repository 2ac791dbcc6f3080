"""Reading GLB files back for the tests: the Khronos validator, raw glTF parsing, trimesh."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import trimesh
from conftest import REPO_ROOT
from PIL import Image

VALIDATOR = REPO_ROOT / "tests" / "gltf"


def gltf_issues(path: Path) -> dict:
    """The Khronos validator's summary (npm package gltf-validator pinned in tests/gltf/package.json)."""
    if shutil.which("node") is None or not (VALIDATOR / "node_modules" / "gltf-validator").is_dir():
        pytest.fail(f"the glTF validator is not installed: run `npm ci --prefix {VALIDATOR}`")
    out = subprocess.run(
        ["node", str(VALIDATOR / "validate.cjs"), str(path)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def read_glb(path: Path) -> tuple[dict, dict[str, np.ndarray], np.ndarray]:
    """The glTF JSON, the first primitive's attributes and indices, and the base-colour image,
    read straight from the file (so the test does not rely on trimesh's own conventions)."""
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<4sII", data)
    assert magic == b"glTF" and version == 2 and length == len(data)
    (json_length,) = struct.unpack_from("<I", data, 12)
    gltf = json.loads(data[20 : 20 + json_length])
    binary = data[20 + json_length + 8 :]

    def view(index: int) -> bytes:
        v = gltf["bufferViews"][index]
        return binary[v.get("byteOffset", 0) : v.get("byteOffset", 0) + v["byteLength"]]

    def accessor(index: int) -> np.ndarray:
        a = gltf["accessors"][index]
        dtype = {5126: np.float32, 5125: np.uint32, 5123: np.uint16}[a["componentType"]]
        width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3}[a["type"]]
        raw = view(a["bufferView"])[a.get("byteOffset", 0) :]
        return np.frombuffer(raw, dtype=dtype, count=a["count"] * width).reshape(a["count"], width)

    primitive = gltf["meshes"][0]["primitives"][0]
    arrays = {name: accessor(i) for name, i in primitive["attributes"].items()}
    arrays["indices"] = accessor(primitive["indices"]).reshape(-1, 3)
    texture = gltf["materials"][primitive["material"]]["pbrMetallicRoughness"]["baseColorTexture"]["index"]
    image = gltf["images"][gltf["textures"][texture]["source"]]
    pixels = np.asarray(Image.open(io.BytesIO(view(image["bufferView"]))).convert("RGB"), dtype=np.float32) / 255
    return gltf, arrays, pixels


def sample_texture(pixels: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Nearest texel at glTF texture coordinates (origin at the image's top-left, v down)."""
    h, w, _ = pixels.shape
    return pixels[np.clip((uv[:, 1] * h).astype(int), 0, h - 1), np.clip((uv[:, 0] * w).astype(int), 0, w - 1)]


def load_glb(path: Path) -> trimesh.Trimesh:
    scene = trimesh.load(path, force="scene")
    assert len(scene.geometry) == 1
    return next(iter(scene.geometry.values()))

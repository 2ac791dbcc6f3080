"""UV unwrapping with xatlas in a child process.

xatlas can crash the whole process on some meshes (a segmentation fault, seen here on a regular
82k-face icosphere; upstream jpcy/xatlas#151 is open). A crash must never take the server or
Blender with it, so the unwrap runs as ``python -m amodal3r.io.unwrap IN.npz OUT.npz``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


class UnwrapFailed(RuntimeError):
    """xatlas died or failed on this mesh."""


def unwrap(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(vertex_mapping, faces, uv)`` of the unwrapped mesh, computed in a separate process."""
    with tempfile.TemporaryDirectory(prefix="amodal3r-unwrap-") as folder:
        source, result = Path(folder) / "in.npz", Path(folder) / "out.npz"
        np.savez(source, vertices=vertices.astype(np.float32), faces=faces.astype(np.uint32))
        done = subprocess.run(
            [sys.executable, "-m", "amodal3r.io.unwrap", str(source), str(result)], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise UnwrapFailed(f"xatlas failed with exit code {done.returncode}: {done.stderr.strip()[-300:]}")
        with np.load(result) as out:
            return out["mapping"], out["faces"].astype(np.int64), out["uv"]


def _main(source: str, result: str) -> None:
    import xatlas

    with np.load(source) as data:
        mapping, faces, uv = xatlas.parametrize(data["vertices"], data["faces"])
    np.savez(result, mapping=mapping, faces=faces, uv=uv)


if __name__ == "__main__":
    _main(*sys.argv[1:3])

# SPDX-License-Identifier: GPL-3.0-or-later
"""The add-on's layers, read from its sources: core never imports bpy, and of the server package the
add-on imports only ``amodal3r.api``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ADDON = Path(__file__).resolve().parents[3] / "amodal3r_blender"
BLENDER_MODULES = ("bpy", "bmesh", "mathutils", "gpu", "blf")


def _imported(path: Path) -> set[str]:
    """Every absolute module name a file imports, anywhere in it (lazy imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("path", sorted((ADDON / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_has_no_bpy(path):
    assert not {n for n in _imported(path) if _top(n) in BLENDER_MODULES}


@pytest.mark.parametrize("path", sorted(ADDON.rglob("*.py")), ids=lambda p: str(p.relative_to(ADDON)))
def test_only_the_server_api(path):
    server = {n for n in _imported(path) if _top(n) == "amodal3r"}
    assert all(n.startswith("amodal3r.api.") or n == "amodal3r.api" for n in server), server
    assert "torch" not in {_top(n) for n in _imported(path)}

# SPDX-License-Identifier: GPL-3.0-or-later
"""Bring a reconstructed GLB into the scene as one named, selected object.

Main thread only (bpy.ops). The importer's own names (geometry_0, Material_0, Image_0) become the
object's name, so several results stay tellable apart; other objects are only deselected.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import bpy


class ResultImportError(RuntimeError):
    """The GLB could not be imported; the message says what to do."""


def _import_gltf(glb_path: Path) -> list[bpy.types.Object]:
    before = set(bpy.data.objects)
    try:
        result = bpy.ops.import_scene.gltf(filepath=str(glb_path), import_pack_images=True)
    except RuntimeError as error:
        raise ResultImportError(f"Blender could not import {glb_path}: {error}") from None
    if "FINISHED" not in result:
        raise ResultImportError(f"Blender could not import {glb_path}: the glTF importer gave up")
    return [obj for obj in bpy.data.objects if obj not in before]


def _only_mesh(created: list[bpy.types.Object], glb_path: Path) -> bpy.types.Object:
    """The mesh of the result; empties the importer made around it are removed."""
    meshes = [obj for obj in created if obj.type == "MESH"]
    if len(meshes) != 1:
        for obj in created:
            bpy.data.objects.remove(obj)
        raise ResultImportError(f"{glb_path} holds {len(meshes)} meshes, expected one reconstructed object")
    mesh = meshes[0]
    if mesh.parent is not None:
        world = mesh.matrix_world.copy()
        mesh.parent = None
        mesh.matrix_world = world
    for obj in created:
        if obj is not mesh:
            bpy.data.objects.remove(obj)
    return mesh


def _rename(obj: bpy.types.Object, name: str) -> None:
    """Name the object, its mesh, materials and textures after ``name`` (Blender adds .001 on clashes)."""
    obj.name = name
    obj.data.name = name
    for index, material in enumerate(m for m in obj.data.materials if m is not None):
        material.name = name if index == 0 else f"{name}.{index}"
        if material.node_tree is None:
            continue
        for node in material.node_tree.nodes:
            if node.type == "TEX_IMAGE" and node.image is not None:
                node.image.name = f"{name}_texture"


def _link_to(obj: bpy.types.Object, collection: bpy.types.Collection) -> None:
    if obj.name not in collection.objects:
        collection.objects.link(obj)
    for other in list(obj.users_collection):
        if other != collection:
            other.objects.unlink(obj)


def import_result(
    context: bpy.types.Context, glb_path: str | Path, name: str, location: Sequence[float] = (0.0, 0.0, 0.0)
) -> bpy.types.Object:
    """Import a result GLB as one object named ``name`` at ``location``, selected and active."""
    glb_path = Path(glb_path)
    if not glb_path.is_file():
        raise ResultImportError(f"The result file {glb_path} is missing: run the reconstruction again")
    obj = _only_mesh(_import_gltf(glb_path), glb_path)
    _rename(obj, name or glb_path.stem)
    _link_to(obj, context.collection or context.scene.collection)
    obj.location = tuple(location)
    for other in context.view_layer.objects:
        if other is not obj and other.select_get():
            other.select_set(False)
    obj.select_set(True)
    context.view_layer.objects.active = obj
    return obj


def push_undo(message: str) -> None:
    """An undo step after changes made outside an operator's own undo (e.g. from a timer)."""
    try:
        bpy.ops.ed.undo_push(message=message)
    except RuntimeError:
        pass  # no undo stack in background mode

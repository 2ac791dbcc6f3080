# SPDX-License-Identifier: GPL-3.0-or-later
"""Render the shipped example: a mug partly hidden behind a box, with its masks.

    blender -b --python scripts/render_example.py -- --out examples/mug_behind_box
    python scripts/render_example.py -- --out examples/mug_behind_box      (with the bpy module)

The masks come from the renderer itself: a second pass renders every object as flat emission of a
distinct colour without anti-aliasing, a third hides the occluder to get the target's full outline.
"""

from __future__ import annotations

import argparse
import math
import struct
import sys
import zlib
from pathlib import Path

import bpy
import numpy as np

SIZE = 512
TARGET_RGB, OCCLUDER_RGB = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)


def arguments() -> argparse.Namespace:
    argv = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/mug_behind_box"))
    parser.add_argument("--samples", type=int, default=32)
    return parser.parse_args(argv)


def material(name: str, rgb: tuple[float, float, float], roughness: float = 0.5) -> bpy.types.Material:
    mat = bpy.data.materials.new(name)
    bsdf = mat.node_tree.nodes["Principled BSDF"]
    bsdf.inputs["Base Color"].default_value = (*rgb, 1.0)
    bsdf.inputs["Roughness"].default_value = roughness
    return mat


def build_scene() -> tuple[list[bpy.types.Object], bpy.types.Object]:
    """A red mug (cylinder and handle) behind a blue box, seen slightly from above."""
    import bmesh  # here, not at the top: the bpy module from PyPI provides bmesh only after bpy is imported

    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.mesh.primitive_cylinder_add(vertices=64, radius=0.5, depth=1.0, location=(0, 0, 0.5))
    body = bpy.context.object
    mesh = bmesh.new()
    mesh.from_mesh(body.data)
    top = [face for face in mesh.faces if face.calc_center_median().z > 0.49]  # local z: the top cap
    bmesh.ops.delete(mesh, geom=top, context="FACES_ONLY")  # an open mug
    mesh.to_mesh(body.data)
    mesh.free()
    body.modifiers.new("wall", "SOLIDIFY").thickness = 0.05
    bpy.ops.mesh.primitive_torus_add(
        major_radius=0.3, minor_radius=0.07, location=(0.55, 0, 0.5), rotation=(math.pi / 2, 0, 0)
    )
    handle = bpy.context.object
    red = material("mug", (0.8, 0.1, 0.08), 0.3)
    for part in (body, handle):
        part.data.materials.append(red)
        bpy.ops.object.select_all(action="DESELECT")
        part.select_set(True)
        bpy.context.view_layer.objects.active = part
        bpy.ops.object.shade_smooth()
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=(0.1, -1.1, 0.4), scale=(0.75, 0.3, 0.8))
    box = bpy.context.object
    box.data.materials.append(material("box", (0.1, 0.25, 0.8), 0.6))

    bpy.ops.object.camera_add(location=(0.0, -4.2, 2.0))
    camera = bpy.context.object
    camera.rotation_euler = (math.radians(70), 0, 0)
    camera.data.lens = 45
    bpy.context.scene.camera = camera
    bpy.ops.object.light_add(type="AREA", location=(-2.0, -3.0, 4.0))
    light = bpy.context.object
    light.data.energy = 450
    light.data.size = 3.0
    light.rotation_euler = (math.radians(40), math.radians(-25), 0)
    bpy.context.scene.world = make_world()
    return [body, handle], box


def make_world() -> bpy.types.World:
    """Light grey to the camera, dim as lighting. Worlds are node trees in Blender 5: ``world.color`` is ignored."""
    world = bpy.data.worlds.new("world")
    nodes, links = world.node_tree.nodes, world.node_tree.links
    ambient = nodes["Background"]
    ambient.inputs["Color"].default_value = (0.25, 0.25, 0.25, 1.0)
    backdrop = nodes.new("ShaderNodeBackground")
    backdrop.inputs["Color"].default_value = (0.8, 0.8, 0.8, 1.0)
    camera_ray = nodes.new("ShaderNodeLightPath")
    mix = nodes.new("ShaderNodeMixShader")
    links.new(camera_ray.outputs["Is Camera Ray"], mix.inputs["Fac"])
    links.new(ambient.outputs["Background"], mix.inputs[1])
    links.new(backdrop.outputs["Background"], mix.inputs[2])
    links.new(mix.outputs["Shader"], nodes["World Output"].inputs["Surface"])
    return world


def configure_render(samples: int, flat: bool) -> None:
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.seed = 0
    scene.cycles.samples = 1 if flat else samples
    scene.cycles.use_denoising = False
    scene.cycles.filter_width = 0.01 if flat else 1.5
    scene.render.resolution_x = scene.render.resolution_y = SIZE
    scene.render.resolution_percentage = 100
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGB"
    scene.view_settings.view_transform = "Standard"


def render(path: Path) -> np.ndarray:
    """Render to ``path`` and return the pixels as 8-bit RGB, top row first."""
    bpy.context.scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    image = bpy.data.images.load(str(path))
    pixels = np.empty(SIZE * SIZE * 4, np.float32)
    image.pixels.foreach_get(pixels)
    bpy.data.images.remove(image)
    path.unlink()
    return np.rint(pixels.reshape(SIZE, SIZE, 4)[::-1, :, :3] * 255).astype(np.uint8)


def flatten(objects: list[bpy.types.Object], rgb: tuple[float, float, float]) -> None:
    """Replace the objects' materials by unlit emission of one colour."""
    mat = bpy.data.materials.new(f"flat{rgb}")
    nodes = mat.node_tree.nodes
    nodes.clear()
    emission = nodes.new("ShaderNodeEmission")
    emission.inputs["Color"].default_value = (*rgb, 1.0)
    output = nodes.new("ShaderNodeOutputMaterial")
    mat.node_tree.links.new(emission.outputs["Emission"], output.inputs["Surface"])
    for obj in objects:
        obj.data.materials.clear()
        obj.data.materials.append(mat)


def save_png(values: np.ndarray, path: Path) -> None:
    """An 8-bit greyscale (H, W) or RGB (H, W, 3) PNG with the standard library alone (Blender's Python
    has no PIL), and no metadata: Blender's own PNGs carry the date and render time, so they never repeat."""
    height, width = values.shape[:2]
    raw = b"".join(b"\x00" + row.tobytes() for row in values.astype(np.uint8))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2 if values.ndim == 3 else 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    )


def main() -> None:
    args = arguments()
    args.out.mkdir(parents=True, exist_ok=True)
    target, occluder = build_scene()
    configure_render(args.samples, flat=False)
    save_png(render(args.out / "_image.png"), args.out / "image.png")

    configure_render(args.samples, flat=True)
    for node in bpy.context.scene.world.node_tree.nodes:  # a black background
        if node.bl_idname == "ShaderNodeBackground":
            node.inputs["Strength"].default_value = 0.0
    flatten(target, TARGET_RGB)
    flatten([occluder], OCCLUDER_RGB)
    ids = render(args.out / "_ids.png")
    visible, in_front = ids[..., 0] > 127, ids[..., 2] > 127
    occluder.hide_render = True
    full = render(args.out / "_amodal.png")[..., 0] > 127

    for name, mask in (("target_mask", visible), ("occluder_mask", in_front), ("amodal_target_mask", full)):
        save_png(mask.astype(np.uint8) * 255, args.out / f"{name}.png")
    grey = np.full(visible.shape, 255, np.uint8)
    grey[visible], grey[in_front] = 188, 0
    save_png(grey, args.out / "mask.png")
    hidden = 1 - visible.sum() / max(full.sum(), 1)
    print(f"wrote {args.out}: target {full.sum()} px, {hidden:.1%} of it hidden by the occluder (amodal vs visible)")


if __name__ == "__main__":
    main()

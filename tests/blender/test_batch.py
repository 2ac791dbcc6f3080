# SPDX-License-Identifier: GPL-3.0-or-later
"""batch.py end to end (tiny weights, 2 sampler steps), its input checks, and importing results."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import bpy
import pytest

from amodal3r_blender import batch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "amodal3r_blender" / "batch.py"
FAST = ["--steps", "2", "--texture-size", "256", "--faces", "5000", "--device", "cpu"]


def run_batch(
    *args: str, server_python: str | None = None, model: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    extra = (["--server-python", server_python] if server_python else []) + (["--model", str(model)] if model else [])
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--", *args, *extra, *FAST],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_glb(path: Path) -> dict:
    """The JSON chunk of a binary glTF, after checking its header."""
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert (magic, version, length) == (b"glTF", 2, len(data))
    chunk_length, chunk_type = struct.unpack_from("<I4s", data, 12)
    assert chunk_type == b"JSON"
    return json.loads(data[20 : 20 + chunk_length])


def _copy_view(example: Path, folder: Path, name: str, single_mask: bool) -> None:
    shutil.copyfile(example / "image.png", folder / f"{name}.png")
    if single_mask:
        shutil.copyfile(example / "mask.png", folder / f"{name}_mask.png")
    else:
        shutil.copyfile(example / "target_mask.png", folder / f"{name}_target.png")
        shutil.copyfile(example / "occluder_mask.png", folder / f"{name}_occluder.png")


@pytest.fixture(scope="module")
def batch_run(example_dir, server_python, tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch-in")
    _copy_view(example_dir, folder, "mug", single_mask=False)
    _copy_view(example_dir, folder, "cup", single_mask=True)
    out = tmp_path_factory.mktemp("batch-out")
    result = run_batch("--batch", str(folder), "--out-dir", str(out), server_python=server_python, model=tiny_model_dir)
    return result, out


def test_batch_folder_writes_one_glb_per_image(batch_run):
    result, out = batch_run
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["cup.glb", "mug.glb"]
    for glb in out.iterdir():
        document = read_glb(glb)
        assert len(document["meshes"]) == 1 and document["images"]
    assert "[1/2] cup: structure 2/2" in result.stdout and "2 result(s) written" in result.stdout


def test_missing_mask_fails_before_the_server(tmp_path, example_dir):
    started = time.monotonic()
    result = run_batch(
        "--image",
        str(example_dir / "image.png"),
        "--target-mask",
        str(tmp_path / "gone.png"),
        "--out",
        str(tmp_path / "out.glb"),
        server_python="/nonexistent/python",
    )
    assert result.returncode == 2
    assert f"target mask {tmp_path / 'gone.png'} does not exist" in result.stderr
    assert time.monotonic() - started < 20 and not (tmp_path / "out.glb").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "{ex}/image.png", "--out", "{tmp}/o.glb"], "no mask"),
        (
            ["--image", "{ex}/nope.png", "--mask", "{ex}/mask.png", "--out", "{tmp}/o.glb"],
            "image {ex}/nope.png does not",
        ),
        (["--image", "{ex}/image.png", "--mask", "{ex}/mask.png", "--out", "{tmp}/o.obj"], ".glb or .blend"),
        (
            [
                "--image",
                "{ex}/image.png",
                "--mask",
                "{ex}/mask.png",
                "--target-mask",
                "{ex}/target_mask.png",
                "--out",
                "{tmp}/o.glb",
            ],
            "give --mask alone",
        ),
        (["--batch", "{tmp}", "--out-dir", "{tmp}/out"], "holds no images"),
        (
            ["--image", "{ex}/image.png", "--mask", "{ex}/mask.png", "--out", "{tmp}/o.glb", "--model", "{tmp}"],
            "no model folder with pipeline.json",
        ),
    ],
)
def test_bad_inputs_are_one_clear_line(tmp_path, example_dir, server_python, args, message):
    filled = [a.format(ex=example_dir, tmp=tmp_path) for a in args]
    model = None if "--model" in args else tmp_path
    result = run_batch(*filled, server_python=server_python, model=model)
    assert result.returncode == 2
    assert message.format(ex=example_dir, tmp=tmp_path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_server_that_cannot_start_fails_the_run(tmp_path, example_dir, tiny_model_dir):
    # Blender's Python has no server package: the server exits at once and the whole batch stops.
    folder = tmp_path / "in"
    folder.mkdir()
    _copy_view(example_dir, folder, "a", single_mask=True)
    _copy_view(example_dir, folder, "b", single_mask=True)
    result = run_batch(
        "--batch", str(folder), "--out-dir", str(tmp_path / "out"), server_python=sys.executable, model=tiny_model_dir
    )
    assert result.returncode == 1
    assert "[1/2] a: FAILED: The reconstruction server did not start" in result.stderr
    assert "[2/2]" not in result.stderr and "2 of 2 reconstruction(s) failed" in result.stderr


def test_batch_csv_paths_are_relative_to_it(tmp_path, example_dir):
    (tmp_path / "views").mkdir()
    _copy_view(example_dir, tmp_path / "views", "a", single_mask=False)
    shutil.copyfile(example_dir / "mask.png", tmp_path / "grey.png")
    table = tmp_path / "jobs.csv"
    table.write_text("image,target_mask,occluder_mask,mask\nviews/a.png,views/a_target.png,,\nviews/a.png,,,grey.png\n")
    items = batch.csv_items(table, tmp_path / "out")
    assert [i.name for i in items] == ["a", "a_2"]
    assert items[0].view == {
        "image": str(tmp_path / "views/a.png"),
        "target_mask": str(tmp_path / "views/a_target.png"),
    }
    assert list(items[1].view) == ["image", "mask"] and items[1].out == tmp_path / "out" / "a_2.glb"
    table.write_text("image,target_mask,occluder_mask,mask\nviews/a.png,,,\n")
    with pytest.raises(batch.InputError, match="line 2: .*no mask"):
        batch.csv_items(table, tmp_path / "out")


def test_script_argv_after_the_separator():
    assert batch.script_argv(["blender", "-b", "--python", "batch.py", "--", "--image", "x"]) == ["--image", "x"]
    assert batch.script_argv(["batch.py", "--image", "x"]) == ["--image", "x"]


def test_blend_output_holds_the_object(tmp_path, example_dir, server_python, tiny_model_dir):
    out = tmp_path / "scene.blend"
    result = run_batch(
        "--image",
        str(example_dir / "image.png"),
        "--mask",
        str(example_dir / "mask.png"),
        "--out",
        str(out),
        server_python=server_python,
        model=tiny_model_dir,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with bpy.data.libraries.load(str(out)) as (data_from, _):
        assert data_from.objects == ["image"] and data_from.meshes == ["image"]
        assert "image_texture" in data_from.images


# --- importing a result into the open scene ------------------------------------------------------


def test_import_result_is_one_named_selected_object(clean_scene, batch_run):
    from amodal3r_blender.operators import scene_import

    _, out = batch_run
    bpy.ops.mesh.primitive_cube_add()
    cube = bpy.context.active_object
    cube_state = (cube.name, tuple(cube.location), len(cube.data.vertices))
    obj = scene_import.import_result(bpy.context, out / "mug.glb", "Mug", (1.0, 2.0, 3.0))
    assert obj.name == "Mug" and obj.data.name == "Mug" and obj.type == "MESH"
    assert tuple(obj.location) == (1.0, 2.0, 3.0)
    assert bpy.context.view_layer.objects.active == obj and list(bpy.context.selected_objects) == [obj]
    assert obj.name in bpy.context.collection.objects
    assert obj.active_material.name == "Mug"
    image = next(n.image for n in obj.active_material.node_tree.nodes if n.type == "TEX_IMAGE")
    assert image.name == "Mug_texture" and image.packed_file is not None
    assert (cube.name, tuple(cube.location), len(cube.data.vertices)) == cube_state and not cube.select_get()
    again = scene_import.import_result(bpy.context, out / "mug.glb", "Mug", (0.0, 0.0, 0.0))
    assert again.name == "Mug.001" and obj.name == "Mug"
    assert len([o for o in bpy.data.objects if o.type == "MESH"]) == 3


def test_import_missing_result_says_so(clean_scene, tmp_path):
    from amodal3r_blender.operators import scene_import

    with pytest.raises(scene_import.ResultImportError, match="run the reconstruction again"):
        scene_import.import_result(bpy.context, tmp_path / "gone.glb", "X")

# SPDX-License-Identifier: GPL-3.0-or-later
"""batch.py end to end (tiny weights, 2 sampler steps): a CSV with a two-view object, the exit codes
(0, 1, 2; no server starts on bad input), and importing results."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import bpy
import numpy as np
import pytest

from amodal3r_blender import batch
from amodal3r_blender.core import png

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


@pytest.fixture
def fake_server(tmp_path) -> tuple[str, Path]:
    """A "server Python" that only records that something started it: (its path, the record)."""
    record = tmp_path / "server-started"
    script = tmp_path / "fake-python"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{record}"\nexit 3\n')
    script.chmod(0o755)
    return str(script), record


@pytest.fixture(scope="module")
def batch_run(example_dir, server_python, tiny_model_dir, tmp_path_factory):
    """A CSV of one object seen twice (a mask in each format): one job of two views (a job takes a
    minute here, so the other rows and objects are checked without a server, in core/)."""
    folder = tmp_path_factory.mktemp("batch-in")
    _copy_view(example_dir, folder, "front", single_mask=False)
    _copy_view(example_dir, folder, "side", single_mask=True)
    table = folder / "objects.csv"
    table.write_text(
        "object,image,target_mask,occluder_mask,mask\n"
        "mug,front.png,front_target.png,front_occluder.png,\n"
        "mug,side.png,,,side_mask.png\n"
    )
    out = tmp_path_factory.mktemp("batch-out")
    result = run_batch("--batch", str(table), "--out-dir", str(out), server_python=server_python, model=tiny_model_dir)
    return result, out


def test_batch_csv_object_is_one_job_of_its_views(batch_run):
    result, out = batch_run
    assert result.returncode == 0, result.stdout + result.stderr
    assert [p.name for p in out.iterdir()] == ["mug.glb"]
    document = read_glb(out / "mug.glb")
    assert len(document["meshes"]) == 1 and document["images"]
    assert "[1/1] mug: submitted with 2 view(s)" in result.stdout  # the server's count of the job's views
    assert "[1/1] mug: structure 2/2" in result.stdout and "1 result(s) written" in result.stdout
    assert result.stdout.count("tiny RANDOM weights") == 1  # after the result it belongs to


def test_missing_mask_fails_before_the_server(tmp_path, example_dir, tiny_model_dir, fake_server):
    python, record = fake_server
    started = time.monotonic()
    result = run_batch(
        "--image",
        str(example_dir / "image.png"),
        "--target-mask",
        str(tmp_path / "gone.png"),
        "--out",
        str(tmp_path / "out.glb"),
        server_python=python,
        model=tiny_model_dir,
    )
    assert result.returncode == 2
    assert result.stderr == f"batch.py: error: image: target mask {tmp_path / 'gone.png'} does not exist\n"
    assert time.monotonic() - started < 20 and not (tmp_path / "out.glb").exists() and not record.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "{ex}/image.png", "--out", "{tmp}/o.glb"], "image: image.png has no mask"),
        (
            ["--image", "{ex}/nope.png", "--mask", "{ex}/mask.png", "--out", "{tmp}/o.glb"],
            "nope: image {ex}/nope.png does not exist",
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
            "give one or the other",
        ),
        (
            ["--image", "{ex}/image.png", "--mask", "{ex}/occluder_mask.png", "--out", "{tmp}/o.glb"],
            "image: {ex}/occluder_mask.png: the target mask is empty",
        ),
        (["--batch", "{tmp}", "--out-dir", "{tmp}/out"], "holds no images"),
        (["--batch", "{tmp}/x.csv", "--out-dir", "{tmp}/out"], "unknown column(s) 'target'"),
        (
            ["--image", "{ex}/image.png", "--mask", "{ex}/mask.png", "--out", "{tmp}/o.glb", "--model", "{tmp}"],
            "no model folder with pipeline.json",
        ),
    ],
)
def test_bad_inputs_are_one_clear_line(tmp_path, example_dir, tiny_model_dir, fake_server, args, message):
    python, record = fake_server
    (tmp_path / "x.csv").write_text("image,target\na.png,b.png\n")
    filled = [a.format(ex=example_dir, tmp=tmp_path) for a in args]
    result = run_batch(*filled, server_python=python, model=None if "--model" in args else tiny_model_dir)
    assert result.returncode == 2
    assert message.format(ex=example_dir, tmp=tmp_path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not record.exists()


def test_every_bad_input_is_reported_before_any_server(tmp_path, example_dir, tiny_model_dir, fake_server):
    python, record = fake_server
    small = tmp_path / "small.png"
    small.write_bytes(png.encode_png(np.full((4, 4), 255, np.uint8)))
    table = tmp_path / "jobs.csv"
    table.write_text(
        "object,image,target_mask,occluder_mask,mask\n"
        f"chair,{example_dir}/image.png,{example_dir}/target_mask.png,,\n"
        f"chair,{example_dir}/image.png,small.png,,\n"
        f"chair,gone.png,{example_dir}/target_mask.png,,\n"
        f"table,{example_dir}/image.png,,,{example_dir}/occluder_mask.png\n"
        f",{example_dir}/image.png,,,{example_dir}/mask.png\n"
    )
    result = run_batch(
        "--batch", str(table), "--out-dir", str(tmp_path / "out"), server_python=python, model=tiny_model_dir
    )
    assert result.returncode == 2 and not record.exists() and not (tmp_path / "out").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, result.stderr
    assert (
        lines[0].startswith("batch.py: error: chair (jobs.csv line 3): target mask ") and "is 4x4 but image" in lines[0]
    )
    assert lines[1] == f"batch.py: error: chair (jobs.csv line 4): image {tmp_path / 'gone.png'} does not exist"
    assert lines[2].startswith("batch.py: error: table (jobs.csv line 5): ") and "the target mask is empty" in lines[2]


def test_server_that_cannot_start_fails_the_run(tmp_path, example_dir, tiny_model_dir, fake_server):
    # The inputs are fine, so the server starts (the record shows it): it exits at once and the batch stops.
    python, record = fake_server
    folder = tmp_path / "in"
    folder.mkdir()
    _copy_view(example_dir, folder, "a", single_mask=True)
    _copy_view(example_dir, folder, "b", single_mask=True)
    result = run_batch(
        "--batch", str(folder), "--out-dir", str(tmp_path / "out"), server_python=python, model=tiny_model_dir
    )
    assert result.returncode == 1
    assert "amodal3r.cli serve" in record.read_text()
    assert "[1/2] a: FAILED: The reconstruction server did not start" in result.stderr
    assert "[2/2]" not in result.stderr and "2 of 2 reconstruction(s) failed" in result.stderr


def test_script_argv_after_the_separator():
    assert batch.script_argv(["blender", "-b", "--python", "batch.py", "--", "--image", "x"]) == ["--image", "x"]
    assert batch.script_argv(["batch.py", "--image", "x"]) == ["--image", "x"]


def test_blend_output_holds_the_placed_object_and_its_camera(
    tmp_path, example_dir, server_python, tiny_model_dir, addon
):
    """The .blend is read back here with the add-on enabled: its placement properties are registered."""
    out = tmp_path / "scene.blend"
    result = run_batch(
        "--image",
        str(example_dir / "image.png"),
        "--mask",
        str(example_dir / "mask.png"),
        "--out",
        str(out),
        "--place",
        "--fov",
        "40",
        server_python=server_python,
        model=tiny_model_dir,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with bpy.data.libraries.load(str(out)) as (data_from, data_to):
        assert sorted(data_from.objects) == ["image", "image camera"] and data_from.meshes == ["image"]
        assert {"image_texture", "image.png"} <= set(data_from.images)
        data_to.objects = data_from.objects
    placed, camera = sorted(data_to.objects, key=lambda obj: obj.type != "MESH")
    assert camera.type == "CAMERA" and camera.data.show_background_images
    assert camera.data.background_images[0].image.packed_file is not None
    assert placed.amodal3r_placement.camera == camera and len(placed.amodal3r_placement.poses) >= 1
    # 40 degrees across the 512 px photo: the camera's lens says so
    assert camera.data.lens == pytest.approx(36 / 2 / math.tan(math.radians(20)), rel=1e-4)
    for obj in data_to.objects:
        bpy.data.objects.remove(obj)


def test_camera_without_place_is_refused(tmp_path, example_dir, tiny_model_dir, fake_server):
    python, record = fake_server
    result = run_batch(
        "--image",
        str(example_dir / "image.png"),
        "--mask",
        str(example_dir / "mask.png"),
        "--out",
        str(tmp_path / "o.glb"),
        "--fov",
        "40",
        server_python=python,
        model=tiny_model_dir,
    )
    assert result.returncode == 2 and "they go with --place" in result.stderr and not record.exists()


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

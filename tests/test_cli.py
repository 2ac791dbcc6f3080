"""The amodal3r command line: photos with masks to GLB files, and its failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gltf_checks import gltf_issues, load_glb
from PIL import Image

from amodal3r.api.camera import Intrinsics, Pose
from amodal3r.cli import main
from amodal3r.pipelines.conditioning import masks_to_grey


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photo")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((160, 200, 3)) * 255).astype(np.uint8)).save(folder / "photo.jpg")
    target = np.zeros((160, 200), bool)
    target[40:120, 50:120] = True
    occluder = np.zeros((160, 200), bool)
    occluder[30:140, 100:150] = True
    Image.fromarray((target & ~occluder).astype(np.uint8) * 255).save(folder / "target.png")
    Image.fromarray(occluder.astype(np.uint8) * 255).save(folder / "occluder.png")
    Image.fromarray(masks_to_grey(target & ~occluder, occluder)).save(folder / "grey.png")
    return {
        "image": folder / "photo.jpg",
        "target": folder / "target.png",
        "occluder": folder / "occluder.png",
        "grey": folder / "grey.png",
    }


def run(model: Path, out: Path, *views: str, extra: tuple[str, ...] = ()) -> int:
    return main(
        [
            "reconstruct",
            *views,
            "--model",
            str(model),
            "--out",
            str(out),
            "--steps",
            "1",
            "--texture-size",
            "128",
            *extra,
        ]
    )


def test_one_view_to_glb(photo: dict, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "chair.glb"
    assert (
        run(
            tiny_model_dir,
            out,
            "--image",
            str(photo["image"]),
            "--target-mask",
            str(photo["target"]),
            "--occluder-mask",
            str(photo["occluder"]),
            extra=("--gaussians", "--preview"),
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "tiny RANDOM weights" in printed and "structure   1/1" in printed and "time: encode" in printed
    assert load_glb(out).visual.material.baseColorTexture.size == (128, 128)
    assert gltf_issues(out)["numErrors"] == 0
    assert out.with_suffix(".ply").is_file() and out.with_suffix(".png").is_file()


def test_three_views_two_variants(photo: dict, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "obj.glb"
    assert (
        run(
            tiny_model_dir,
            out,
            "--image",
            str(photo["image"]),
            "--mask",
            str(photo["grey"]),
            "--image",
            str(photo["image"]),
            "--target-mask",
            str(photo["target"]),
            "--image",
            str(photo["image"]),
            "--target-mask",
            str(photo["target"]),
            "--occluder-mask",
            str(photo["occluder"]),
            extra=("--variants", "2", "--place", "--fov", "50"),
        )
        == 0
    )
    names = ["obj_0.glb", "obj_0.pose.json", "obj_1.glb", "obj_1.pose.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    for path in tmp_path.glob("*.glb"):
        assert load_glb(path).visual.material.baseColorTexture.size == (128, 128)
        assert gltf_issues(path)["numErrors"] == 0
    assert Pose.from_json(tmp_path / "obj_1.pose.json").camera == Intrinsics.from_fov(200, 160, 50)


def test_bad_input_fails_cleanly(
    photo: dict, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((160, 200), np.uint8)).save(empty)
    out = tmp_path / "never.glb"
    assert run(tiny_model_dir, out, "--image", str(photo["image"]), "--target-mask", str(empty)) == 2
    assert "empty.png: the target mask is empty" in capsys.readouterr().err
    assert not out.exists()
    assert run(tiny_model_dir, out, "--target-mask", str(photo["target"]), "--image", str(photo["image"])) == 2
    assert "--target-mask must follow the --image it belongs to" in capsys.readouterr().err


class PickledObject:
    """Saved into a .pth: loading it back needs unpickling code, which the loader refuses."""


def never_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any model load fail the test: the checks must come first."""
    from amodal3r.pipelines.amodal3r import Amodal3RPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model folder was opened before the arguments were checked")

    monkeypatch.setattr(Amodal3RPipeline, "from_pretrained", refuse)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--steps", "0", "argument --steps: must be an integer in 1..500, got 0"),
        ("--texture-size", "0", "argument --texture-size: must be an integer in 64..8192, got 0"),
        ("--variants", "9", "argument --variants: must be an integer in 1..8, got 9"),
        ("--cfg", "-1", "argument --cfg: must be a number in 0.0..100.0, got -1.0"),
        ("--faces", "many", "argument --faces: not an integer: 'many'"),
        ("--fov", "0", "argument --fov: must be a number in 1.0..179.0, got 0.0"),
    ],
)
def test_option_ranges_are_checked_first(
    photo: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch, option: str, value: str, message: str
) -> None:
    never_loaded(monkeypatch)
    assert (
        run(
            tmp_path,
            tmp_path / "x.glb",
            "--image",
            str(photo["image"]),
            "--target-mask",
            str(photo["target"]),
            extra=(option, value),
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize(
    ("out", "extra", "message"),
    [
        ("x.obj", (), "x.obj: the result is a binary glTF, so the name must end in .glb"),
        ("blocked/x.glb", (), "cannot write into"),
        ("x.glb", ("--device", "cuda"), "device 'cuda' is not available here; available: cpu"),
    ],
)
def test_output_and_device_are_checked_before_any_model_loads(
    photo: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch, out: str, extra: tuple, message: str
) -> None:
    (tmp_path / "blocked").write_text("a file where the output folder should be")
    never_loaded(monkeypatch)
    view = ("--image", str(photo["image"]), "--target-mask", str(photo["target"]))
    assert run(tmp_path, tmp_path / out, *view, extra=extra) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked"]


def test_interrupt_after_the_first_variant_leaves_no_partial_set(
    photo: dict, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    from amodal3r.io import results

    real_write, calls = results.write_variant, []

    def interrupt_on_the_second(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(results, "write_variant", interrupt_on_the_second)
    view = ("--image", str(photo["image"]), "--target-mask", str(photo["target"]))
    assert run(tiny_model_dir, tmp_path / "obj.glb", *view, extra=("--variants", "2", "--preview")) == 130
    assert "interrupted: no output of this run was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_pickled_image_encoder_is_one_line(
    photo: dict, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    import torch

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for old in model.glob("dinov2_vitl14_reg4_pretrain.*"):
        old.unlink()
    torch.save({"weights": PickledObject()}, model / "dinov2_vitl14_reg4_pretrain.pth")
    view = ("--image", str(photo["image"]), "--target-mask", str(photo["target"]))
    assert run(model, tmp_path / "x.glb", *view) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds pickled Python objects" in err
    assert "use the official dinov2_vitl14_reg4_pretrain.pth" in err


def test_place_writes_the_pose_of_a_glb_seen_in_a_photo(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The command's plumbing: GLB, photo, masks and camera.json in, a pose.json whose silhouette matches out
    (the fit's accuracy on many objects is tests/pipelines/test_placement.py's)."""
    import json
    import math

    import torch
    import trimesh

    from amodal3r.api.camera import Pose
    from amodal3r.modules.silhouette import rasterize_silhouette

    parts = [trimesh.creation.box((0.8, 0.2, 0.3)), trimesh.creation.box((0.2, 0.6, 0.3))]
    parts[1].apply_translation((0.3, 0.4, 0.0))
    shape = trimesh.util.concatenate(parts)
    shape.export(tmp_path / "object.glb")
    camera = {"width": 240, "height": 200, "fx": 260.0, "fy": 260.0, "cx": 120.0, "cy": 100.0}
    (tmp_path / "camera.json").write_text(json.dumps(camera))
    c, s = math.cos(0.6), math.sin(0.6)
    rotation = np.array([[c, 0, s], [0, -1, 0], [s, 0, -c]])  # the object turned and upright (y down)
    pose = rotation, np.array([0.05, 0.0, 2.6])

    def silhouette(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
        points = torch.from_numpy(np.asarray(shape.vertices) @ rotation.T + translation).float()
        faces = torch.from_numpy(np.asarray(shape.faces))
        return rasterize_silhouette(points, faces, 260.0, 260.0, 120.0, 100.0, 200, 240)[0].numpy()

    truth = silhouette(*pose)
    occluder = np.zeros_like(truth)
    occluder[:, 140:] = True
    Image.fromarray(np.full((200, 240, 3), 128, np.uint8)).save(tmp_path / "photo.png")
    Image.fromarray(((truth & ~occluder) * 255).astype(np.uint8)).save(tmp_path / "target.png")
    Image.fromarray((occluder * 255).astype(np.uint8)).save(tmp_path / "occluder.png")
    out = tmp_path / "pose.json"
    args = ["place", "--mesh", str(tmp_path / "object.glb"), "--image", str(tmp_path / "photo.png")]
    args += ["--target-mask", str(tmp_path / "target.png"), "--occluder-mask", str(tmp_path / "occluder.png")]
    assert main([*args, "--camera", str(tmp_path / "camera.json"), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    fitted = Pose.from_json(out)
    assert fitted.camera.to_dict() == camera
    matrix = np.asarray(fitted.object_to_camera)
    found = silhouette(matrix[:3, :3], matrix[:3, 3])
    assert (found & truth).sum() / (found | truth).sum() >= 0.85

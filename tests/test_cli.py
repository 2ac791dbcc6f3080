"""The amodal3r command line: photos with masks to GLB files, and its failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gltf_checks import gltf_issues, load_glb
from PIL import Image

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
            extra=("--variants", "2"),
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obj_0.glb", "obj_1.glb"]
    for path in tmp_path.iterdir():
        assert load_glb(path).visual.material.baseColorTexture.size == (128, 128)
        assert gltf_issues(path)["numErrors"] == 0


def test_bad_input_fails_cleanly(
    photo: dict, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((160, 200), np.uint8)).save(empty)
    out = tmp_path / "never.glb"
    assert run(tiny_model_dir, out, "--image", str(photo["image"]), "--target-mask", str(empty)) == 2
    assert "empty.png: the target mask is empty" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        run(tiny_model_dir, out, "--target-mask", str(photo["target"]), "--image", str(photo["image"]))

"""Every file of ``tests/data/bad_inputs/`` (see ``cases.json`` there) through the command line and
through ``POST /v1/jobs`` of a real server process: a one-line error naming the file and the
problem (exit 2; HTTP 422), nothing written, the server healthy and its next valid job done."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

from amodal3r.api.client import ServerError, launch_server
from amodal3r.api.protocol import DONE, MAX_REQUEST_PIXELS, JobParams
from amodal3r.cli import main

CORPUS = REPO_ROOT / "tests" / "data" / "bad_inputs"
CASES = json.loads((CORPUS / "cases.json").read_text())
FAST = JobParams(structure_steps=1, slat_steps=1, texture_size=128, faces=2000, preview=False)


def view_of(case: dict) -> dict[str, Path]:
    """The good view with the case's file in its role (a combined mask replaces the target mask)."""
    view = {role: CORPUS / name for role, name in CASES["good"].items()}
    if case["role"] == "mask":
        del view["target_mask"]
    view[case["role"]] = CORPUS / case["file"]
    return view


def cli_arguments(view: dict[str, Path]) -> list[str]:
    return [item for role, path in view.items() for item in (f"--{role.replace('_', '-')}", str(path))]


def test_the_corpus_is_small_and_complete() -> None:
    listed = {case["file"] for case in CASES["cases"]} | set(CASES["good"].values())
    on_disk = {path.name for path in CORPUS.iterdir()} - {"cases.json"}
    assert listed == on_disk
    assert max(path.stat().st_size for path in CORPUS.iterdir()) < 32 * 1024


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the real stderr: next test
@pytest.mark.parametrize("case", CASES["cases"], ids=lambda case: f"{case['role']}-{case['file']}")
def test_the_command_line_refuses_each_with_one_line(
    case: dict, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    code = main(
        ["reconstruct", *cli_arguments(view_of(case)), "--model", str(tiny_model_dir)]
        + [
            "--out",
            str(out / "never.glb"),
        ]
    )
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith("amodal3r: error: ") and case["error"] in lines[0], lines[0]
    assert case["file"] in lines[0] or case["role"] == "occluder_mask", lines[0]
    assert not out.exists()


def test_a_bomb_is_one_line_on_the_real_stderr(tiny_model_dir: Path, tmp_path: Path) -> None:
    """pytest records warnings itself; a real process shows whether Pillow's bomb warning gets printed."""
    view = view_of({"file": "image_bomb.png", "role": "image"})
    done = subprocess.run(
        [sys.executable, "-m", "amodal3r.cli", "reconstruct", *cli_arguments(view), "--model", str(tiny_model_dir)]
        + ["--out", str(tmp_path / "never.glb")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"amodal3r: error: {view['image']}: 12000x12000 is more than 100,000,000 pixels. "
        f"Downscale it below 4096 pixels a side first"
    ], done.stderr


def test_the_good_view_of_the_corpus_is_accepted(tiny_model_dir: Path, tmp_path: Path) -> None:
    view = {role: CORPUS / name for role, name in CASES["good"].items()}
    out = tmp_path / "good.glb"
    assert (
        main(
            ["reconstruct", *cli_arguments(view), "--model", str(tiny_model_dir), "--out", str(out)]
            + [
                "--steps",
                "1",
                "--texture-size",
                "128",
            ]
        )
        == 0
    )
    assert out.is_file()


def test_the_server_refuses_each_stores_nothing_and_stays_healthy(tiny_model_dir: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = launch_server(
        sys.executable,
        tiny_model_dir,
        data_dir,
        token="t",
        extra_args=["--device", "cpu"],
        env={"OMP_NUM_THREADS": "2"},
    )
    try:
        client = server.client()
        for case in CASES["cases"]:
            with pytest.raises(ServerError) as error:
                client.submit([view_of(case)], FAST)
            detail = error.value.detail
            assert error.value.status == 422 and "\n" not in detail, (case, detail)
            assert case["error"] in detail, (case, detail)
            assert case["file"] in detail or case["role"] == "occluder_mask", (case, detail)
        assert list((data_dir / "jobs").iterdir()) == [] and client.jobs() == []
        assert client.health()["worker"] == "alive"
        job = client.submit([{role: CORPUS / name for role, name in CASES["good"].items()}], FAST)
        deadline = time.monotonic() + 300
        while not (status := client.job(job.id)).final and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status.state == DONE, status.error
        assert not any("Traceback" in line for line in server.output), server.tail()
    finally:
        server.stop()


def one_bit_png(size: tuple[int, int], box: tuple[int, int, int, int] | None = None) -> bytes:
    """A uniform 1-bit PNG of ``size``: millions of pixels in a few KiB."""
    image = Image.new("1", size, 0)
    if box is not None:
        image.paste(1, box)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def big_view(folder: Path, size: tuple[int, int], target: tuple[int, int, int, int]) -> dict[str, Path]:
    name = f"big_{size[0]}x{size[1]}"
    (folder / f"{name}.png").write_bytes(one_bit_png(size))
    (folder / f"{name}_target.png").write_bytes(one_bit_png(size, target))
    return {"image": folder / f"{name}.png", "target_mask": folder / f"{name}_target.png"}


def test_big_views_share_a_pixel_budget_and_are_stored_downscaled(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two 8000x7000 views are 112 M pixels: refused from their headers, before any decoding. One
    8000x6000 view is accepted, decoded once and kept at 4096 pixels a side for the worker."""
    refused = big_view(tmp_path, (8000, 7000), (100, 100, 4000, 4000))
    assert 2 * 8000 * 7000 > MAX_REQUEST_PIXELS >= 8000 * 7000
    accepted = big_view(tmp_path, (8000, 6000), (2000, 2000, 5000, 5000))
    data = tmp_path / "data"
    server = launch_server(sys.executable, tiny_model_dir, data, extra_args=["--device", "cpu"])
    try:
        client = server.client()
        started = time.monotonic()
        with pytest.raises(ServerError) as error:
            client.submit([refused, refused], FAST)
        assert error.value.status == 422 and "112,000,000 pixels together (8000x7000, 8000x7000)" in error.value.detail
        assert time.monotonic() - started < 10 and list((data / "jobs").iterdir()) == []
        job = client.submit([accepted], JobParams(structure_steps=500))
        assert job.notices == ["view0_image (big_8000x6000.png): downscaled from 8000x6000 to 4096x3072"]
        client.cancel(job.id)
        inputs = data / "jobs" / job.id / "inputs"
        assert Image.open(inputs / "view0_image.png").size == (4096, 3072)
        labels = np.asarray(Image.open(inputs / "view0_labels.png"))
        assert labels.shape == (3072, 4096) and set(np.unique(labels)) == {0, 1}
        assert client.health()["status"] == "ok"
    finally:
        server.stop()

"""``amodal3r batch`` in this process: results, summary, resume, progress, and the refusals (exit 2)."""

from __future__ import annotations

import io
import socket
import sys
from pathlib import Path

import pytest
from batch_pictures import FAST, H, W, summary, write_picture
from gltf_checks import gltf_issues

from amodal3r.cli import main
from amodal3r.service.batch import DONE, FAILED, Outcome, ProgressBar, format_eta


def test_local_batch_writes_reports_and_resumes(
    sparse_tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source, out = tmp_path / "in", tmp_path / "out"
    write_picture(source, "good", "pair")
    write_picture(source, "nomask", "none")
    args = ["batch", str(source), "--out-dir", str(out), "--model", str(sparse_tiny_model_dir), "--preview", *FAST]
    assert main(args) == 1
    rows = summary(out)
    assert rows["good"]["status"] == DONE and float(rows["good"]["seconds"]) > 0
    assert rows["nomask"]["status"] == FAILED and "nomask_target.png" in rows["nomask"]["error"]
    assert gltf_issues(out / "good.glb")["numErrors"] == 0 and (out / "good.png").is_file()
    printed = capsys.readouterr()
    assert "1 written, 0 already there, 1 failed of 2" in printed.out
    assert "[1/1] good: done in" in printed.err
    stamp = (out / "good.glb").stat().st_mtime_ns

    assert main(args) == 1  # the bad item is still bad; the good one is not redone
    printed = capsys.readouterr()
    assert "2 item(s): 0 to run, 1 already done, 1 refused" in printed.err
    assert summary(out)["good"]["status"] == "skipped" and (out / "good.glb").stat().st_mtime_ns == stamp


def test_batch_place_writes_a_pose_beside_each_glb(
    sparse_tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from amodal3r.api.camera import Intrinsics, Pose

    source, out = tmp_path / "in", tmp_path / "out"
    write_picture(source, "good", "pair")
    args = ["batch", str(source), "--out-dir", str(out), "--model", str(sparse_tiny_model_dir), *FAST]
    assert main([*args, "--place", "--fov", "50"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["good.glb", "good.pose.json", "summary.csv"]
    assert Pose.from_json(out / "good.pose.json").camera == Intrinsics.from_fov(W, H, 50)
    assert main([*args, "--place"]) == 0  # a rerun finds every output there
    assert summary(out)["good"]["status"] == "skipped"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "case",
    ["replicas without ray", "missing input", "texture size", "out-dir is input", "no ray installed", "unreachable"],
)
def test_bad_arguments_exit_2_with_one_line(
    case: str, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "in"
    write_picture(source, "good", "pair")
    args = ["batch", str(source), "--out-dir", str(tmp_path / "out"), "--model", str(tiny_model_dir)]
    extra, expected = {
        "replicas without ray": (["--replicas", "2"], "--replicas only apply with --ray"),
        "missing input": ([], "nowhere: expected a folder of pictures with masks or a .csv file"),
        "texture size": (["--texture-size", "1"], "--texture-size: must be an integer in 64..8192"),
        "out-dir is input": ([], "is the input folder"),
        "no ray installed": (["--ray"], "pip install 'amodal3r[ray]'"),
        "unreachable": (["--ray", f"127.0.0.1:{free_port()}"], "no Ray cluster answers at 127.0.0.1:"),
    }[case]
    if case == "missing input":
        args[1] = str(tmp_path / "nowhere")
    if case == "out-dir is input":
        args[3] = str(source)
    if case == "no ray installed":
        monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "out" / "good.glb").exists()


@pytest.mark.parametrize("case", ["replicas without ray", "unreachable"])
def test_serve_refusals_exit_2(case: str, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    args = ["serve", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path)]
    extra, expected = {
        "replicas without ray": (["--replicas", "2"], "--replicas only apply with --ray"),
        "unreachable": (["--ray", f"127.0.0.1:{free_port()}"], "no Ray cluster answers at 127.0.0.1:"),
    }[case]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_progress_lines_in_a_log_and_eta() -> None:
    stream = io.StringIO()
    bar = ProgressBar(3, stream)
    bar.finished("chair", Outcome(DONE, 2.0))
    bar.finished("lamp", Outcome(FAILED, 0.5, "mask is 30x20 but lamp.png is 60x40"))
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[1/3] chair: done in 2.0 s (1 done, 0 failed, ETA ")
    assert lines[1].startswith("[2/3] lamp: FAILED: mask is 30x20 but lamp.png is 60x40 (1 done, 1 failed, ETA ")
    assert [format_eta(s) for s in (None, 7, 75, 3725)] == ["?", "7s", "1m15s", "1h02m"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_redraws_one_line() -> None:
    stream = Terminal()
    bar = ProgressBar(4, stream)
    bar.finished("chair", Outcome(DONE, 2.0))
    bar.draw()
    bar.close()
    text = stream.getvalue()
    assert "\r\033[Kchair: done in 2.0 s\n" in text  # the message above the bar, the bar below
    assert text.count("\r\033[K[######..................] 1/4 1 done, 0 failed, ETA ") == 2
    assert text.endswith("\n") and text.count("\n") == 2
    assert W == 60  # the pictures above are the helper's size; the mask message names it

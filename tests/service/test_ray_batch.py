"""``amodal3r batch --ray`` on a local Ray cluster (2 CPUs, 2 logical GPUs): spread, resume, faults."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from batch_pictures import FAST, summary, write_picture
from gltf_checks import gltf_issues

from amodal3r.api.protocol import JobParams
from amodal3r.io.batch_inputs import check_items, read_batch
from amodal3r.service.batch import DONE, BatchItem, BatchSpec, Outcome, output_paths
from amodal3r.service.ray_batch import RayExecutor
from amodal3r.service.ray_cluster import Replicas

pytestmark = pytest.mark.ray
RUN_LIMIT = 110  # seconds for one batch run: each test stays under two minutes


def batch(source: Path, out: Path, model: Path, address: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "amodal3r.cli", "batch", str(source), "--out-dir", str(out)]
    command += ["--model", str(model), "--ray", address, "--replicas", "2", *FAST]
    return subprocess.run(command, capture_output=True, text=True, timeout=RUN_LIMIT)


def test_six_items_over_two_replicas_then_a_rerun_does_nothing(
    ray_address: str, sparse_tiny_model_dir: Path, tmp_path: Path
) -> None:
    source, out = tmp_path / "in", tmp_path / "out"
    names = [f"item{i}" for i in range(5)]
    for seed, name in enumerate(names):
        write_picture(source, name, "pair", seed=seed)
    write_picture(source, "bad", "pair", mask_size=(30, 20))
    run = batch(source, out, sparse_tiny_model_dir, ray_address)
    assert run.returncode == 1, run.stderr
    assert run.stderr.count("Ray actor ready on") == 2, run.stderr
    rows = summary(out)
    assert [row["status"] for row in rows.values()].count(DONE) == 5
    assert rows["bad"]["status"] == "failed" and "mask is 30x20 but bad.png is 60x40" in rows["bad"]["error"]
    for name in names:
        assert gltf_issues(out / f"{name}.glb")["numErrors"] == 0
    assert not list(out.glob(".*.tmp*")), "a partial file was left behind"
    stamps = {name: (out / f"{name}.glb").stat().st_mtime_ns for name in names}

    rerun = batch(source, out, sparse_tiny_model_dir, ray_address)
    assert rerun.returncode == 1, rerun.stderr
    assert "6 item(s): 0 to run, 5 already done, 1 refused" in rerun.stderr
    assert "Ray actor" not in rerun.stderr, "a rerun with nothing to do started actors"
    assert {name: (out / f"{name}.glb").stat().st_mtime_ns for name in names} == stamps
    assert [row["status"] for row in summary(out).values()] == ["failed"] + ["skipped"] * 5


class KillOneActor:
    """A reporter that kills the first actor to start (its process, by pid) while it runs an item."""

    DELAY = 1.5  # seconds after the actor is ready: its first item is under way by then

    def __init__(self) -> None:
        self.finished_items: dict[str, Outcome] = {}
        self.messages: list[str] = []
        self.victim: tuple[int, float] | None = None
        self.killed = False

    def finished(self, item: BatchItem, outcome: Outcome) -> None:
        self.finished_items[item.name] = outcome

    def say(self, text: str) -> None:
        self.messages.append(text)
        pid = re.search(r"pid (\d+)", text)
        if pid and self.victim is None:
            self.victim = (int(pid.group(1)), time.monotonic())

    def tick(self) -> None:
        if self.victim and not self.killed and time.monotonic() - self.victim[1] > self.DELAY:
            os.kill(self.victim[0], signal.SIGKILL)  # a Ray worker process this test's cluster started
            self.killed = True


def test_an_actor_killed_mid_item_is_replaced_and_its_item_runs_again(
    ray_address: str, sparse_tiny_model_dir: Path, tmp_path: Path
) -> None:
    import ray

    source, out = tmp_path / "in", tmp_path / "out"
    for seed in range(2):
        write_picture(source, f"item{seed}", "pair", seed=seed)
    out.mkdir()
    items = check_items(read_batch(source))
    params = JobParams(structure_steps=1, slat_steps=1, texture_size=64, faces=2000, preview=False)
    executor = RayExecutor(ray, BatchSpec(str(sparse_tiny_model_dir), params), Replicas(2, 1.0, 1.0), out)
    report = KillOneActor()
    started = time.monotonic()
    executor.run(items, report)
    assert time.monotonic() - started < RUN_LIMIT
    assert report.killed
    assert {name: o.status for name, o in report.finished_items.items()} == {"item0": DONE, "item1": DONE}
    assert any("its Ray actor died" in m and "running it again" in m for m in report.messages), report.messages
    assert len(executor.actors) == 3, "no replacement actor was started"
    for item in items:
        assert all(path.is_file() for path in output_paths(out, item.name, params))

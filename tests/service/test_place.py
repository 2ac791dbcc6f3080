"""Placement on an in-process server. ``POST /v1/place``: a synthetic object photographed in a known
pose is found again from its GLB and masks; bad requests answer 422 naming the problem, and the
server goes on. Jobs with ``place``: each variant's pose.json in the camera asked for, and a GLB kept
when its placement fails."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trimesh
from conftest import REPO_ROOT
from inprocess import Running, serving
from PIL import Image
from placement_scenes import Case, bracket, make_case, one_torch_thread, silhouette_iou, write_scene

from amodal3r.api.camera import Intrinsics, Pose
from amodal3r.api.client import GLB_TYPE, Client, ServerError, Upload, view_uploads
from amodal3r.api.protocol import DONE, JobParams, JobStatus, PlaceParams
from amodal3r.pipelines import placement
from amodal3r.pipelines.placement import PlacementError


@pytest.fixture(scope="module")
def running(sparse_tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with one_torch_thread(), serving(sparse_tiny_model_dir, tmp_path_factory.mktemp("data")) as running:
        yield running


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Case, Path, dict[str, Path]]:
    case = make_case("bracket", bracket(), 11)
    glb, view = write_scene(case, tmp_path_factory.mktemp("scene"))
    return case, glb, view


def test_a_known_pose_is_found_again(running: Running, scene: tuple[Case, Path, dict[str, Path]]) -> None:
    case, glb, view = scene
    reply = running.client().place(glb, view, PlaceParams(camera=case.camera.to_dict()))
    assert set(reply) == {"object_to_camera", "camera", "score", "candidates"}
    assert reply["camera"] == case.camera.to_dict()
    assert silhouette_iou(case, np.asarray(reply["object_to_camera"])) >= 0.85
    assert Pose(np.asarray(reply["object_to_camera"]), case.camera, reply["score"]).score == reply["score"]


def _refused(client: Client, params: str, mesh: bytes, view: list[Upload]) -> str:
    with pytest.raises(ServerError) as error:
        client.post_multipart("/place", {"params": params}, [Upload("mesh", "object.glb", mesh, GLB_TYPE), *view])
    assert error.value.status == 422 and "\n" not in error.value.detail, error.value.detail
    return error.value.detail


def test_bad_requests_answer_422_and_the_server_goes_on(
    running: Running, scene: tuple[Case, Path, dict[str, Path]], tmp_path: Path
) -> None:
    case, glb, view = scene
    client, mesh, files = running.client(), glb.read_bytes(), view_uploads([view])
    camera = case.camera.to_dict()
    good = PlaceParams(camera=camera).to_json()
    assert "mesh (object.glb): cannot read this mesh" in _refused(client, good, b"glTF junk", files)
    points = trimesh.Scene(trimesh.PointCloud(np.random.default_rng(0).random((10, 3)))).export(file_type="glb")
    assert "holds no triangles" in _refused(client, good, points, files)
    assert "fx" in _refused(client, json.dumps({"camera": {**camera, "fx": -1}}), mesh, files)
    tall = {**camera, "width": camera["height"], "height": camera["width"], "cx": 1, "cy": 1}
    assert "give the intrinsics of this photo" in _refused(client, json.dumps({"camera": tall}), mesh, files)
    assert "fov must be a number in 1.0..179.0" in _refused(client, json.dumps({"fov": 0}), mesh, files)
    Image.new("L", (case.camera.width, case.camera.height)).save(tmp_path / "empty.png")
    empty = view_uploads([{**view, "target_mask": tmp_path / "empty.png"}])
    assert "target mask is empty" in _refused(client, good, mesh, empty)
    Image.new("L", (32, 32), 255).save(tmp_path / "small.png")
    small = view_uploads([{**view, "target_mask": tmp_path / "small.png"}])
    assert "Masks must be the size of their image" in _refused(client, good, mesh, small)
    assert "placement takes one view" in _refused(client, good, mesh, view_uploads([view, view]))
    with pytest.raises(ServerError, match="as the multipart file field 'mesh'"):
        client.post_multipart("/place", {"params": good}, files)
    assert client.health()["status"] == "ok"


EXAMPLE = REPO_ROOT / "examples" / "mug_behind_box"
JOB = {"structure_steps": 1, "slat_steps": 1, "texture_size": 128, "faces": 2000, "preview": False, "place": True}


def _finished(client: Client, job_id: str) -> JobStatus:
    deadline = time.monotonic() + 600
    while not (status := client.job(job_id)).final and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status.state == DONE, status.error
    return status


def _exif_jpeg(path: Path, focal_35mm: int) -> Path:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[41989] = focal_35mm
    Image.open(EXAMPLE / "image.png").convert("RGB").save(path, exif=exif)
    return path


def test_jobs_that_place_write_a_pose_in_the_camera_asked_for(running: Running, tmp_path: Path) -> None:
    """The camera of a job: given intrinsics, else a field of view over the photo, else its EXIF."""
    client = running.client()
    view = {"image": EXAMPLE / "image.png", "target_mask": EXAMPLE / "target_mask.png"}
    given = {"width": 1024, "height": 1024, "fx": 900.0, "fy": 900.0, "cx": 500.0, "cy": 520.0}
    jpeg = {**view, "image": _exif_jpeg(tmp_path / "phone.jpg", 28)}
    expected = [
        ({"camera": given}, view, Intrinsics(**given)),
        ({"fov": 60.0}, view, Intrinsics.from_fov(512, 512, 60.0)),
        ({}, jpeg, Intrinsics.from_focal_35mm(512, 512, 28)),
    ]
    jobs = [client.submit([files], JobParams(**JOB, **settings)) for settings, files, _ in expected]
    for job, (_, _, camera) in zip(jobs, expected, strict=True):
        assert job.params["camera"] == camera.to_dict()  # the job record shows the camera used
        status = _finished(client, job.id)
        assert "variant0.pose.json" in status.results and "variant0.glb" in status.results, status.notices
        pose = Pose.from_json(client.download_result(job.id, "variant0.pose.json", tmp_path / f"{job.id}.json"))
        assert pose.camera == camera and np.isfinite(pose.object_to_camera).all()


def test_a_job_whose_placement_fails_keeps_its_glb(
    running: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def degenerate(*_args: object, **_kwargs: object) -> None:
        raise PlacementError("the mesh has no faces: placement needs the reconstructed surface")

    monkeypatch.setattr(placement, "fit_pose", degenerate)
    client = running.client()
    view = {"image": EXAMPLE / "image.png", "target_mask": EXAMPLE / "target_mask.png"}
    status = _finished(client, client.submit([view], JobParams(**JOB)).id)
    assert status.results == ["variant0.glb"]
    assert "variant0.glb: no pose was fitted (the mesh has no faces" in " ".join(status.notices)
    assert sorted(p.name for p in (running.server.store.folder(status.id) / "results").iterdir()) == ["variant0.glb"]

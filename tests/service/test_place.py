"""``POST /v1/place`` on an in-process server: a synthetic object photographed in a known pose is
found again from its GLB and masks; bad requests answer 422 naming the problem, and the server goes on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trimesh
from inprocess import Running, serving
from PIL import Image
from placement_scenes import Case, bracket, make_case, one_torch_thread, silhouette_iou, write_scene

from amodal3r.api.camera import Pose
from amodal3r.api.client import GLB_TYPE, Client, ServerError, Upload, view_uploads
from amodal3r.api.protocol import PlaceParams


@pytest.fixture(scope="module")
def running(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with one_torch_thread(), serving(tiny_model_dir, tmp_path_factory.mktemp("data")) as running:
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

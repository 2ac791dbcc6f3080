"""Pose fitting on synthetic photos: primitives posed by a known camera, drawn by an independent
rasteriser, partly hidden by an occluder, must be found again from the visible mask alone."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from placement_scenes import (
    ASYMMETRIC,
    SYMMETRIC,
    Case,
    block,
    bracket,
    chair,
    look_at,
    make_case,
    one_torch_thread,
    reference_silhouette,
    silhouette_iou,
)

from amodal3r.api.camera import Intrinsics, Pose
from amodal3r.pipelines.placement import Placement, PlacementError, fit_pose


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def evaluate(case: Case, placement: Placement) -> dict[str, float]:
    """IoU of the full silhouettes, rotation error (degrees), relative depth error."""
    matrix = placement.object_to_camera
    cosine = (np.trace(matrix[:3, :3].T @ case.rotation) - 1) / 2
    return {
        "iou": silhouette_iou(case, matrix),
        "rotation_deg": math.degrees(math.acos(np.clip(cosine, -1, 1))),
        "depth": abs(matrix[2, 3] - case.translation[2]) / case.translation[2],
        "hidden": case.hidden,
    }


SEEDS = {"bracket": 11, "chair": 12, "steps": 13, "kettle": 14, "mug": 15, "block": 16}


@pytest.mark.parametrize("name", sorted(ASYMMETRIC))
def test_asymmetric_objects_are_found_again(name: str) -> None:
    case = make_case(name, ASYMMETRIC[name](), SEEDS[name])
    assert 0.24 <= case.hidden <= 0.56
    result = evaluate(case, fit_pose(case.vertices, case.faces, case.target, case.occluder, case.camera))
    assert result["iou"] >= 0.85, result
    assert result["rotation_deg"] <= 20, result
    assert result["depth"] <= 0.10, result


@pytest.mark.parametrize("name", sorted(SYMMETRIC))
def test_symmetric_objects_match_their_silhouette(name: str) -> None:
    case = make_case(name, SYMMETRIC[name](), SEEDS[name])
    placement = fit_pose(case.vertices, case.faces, case.target, case.occluder, case.camera)
    assert evaluate(case, placement)["iou"] >= 0.85
    assert placement.candidates, "a symmetric object has other poses as good"


def test_fit_is_deterministic_and_candidates_are_sorted() -> None:
    case = make_case("bracket", bracket(), 3)
    first = fit_pose(case.vertices, case.faces, case.target, case.occluder, case.camera, candidates=2)
    second = fit_pose(case.vertices, case.faces, case.target, case.occluder, case.camera, candidates=2)
    np.testing.assert_array_equal(first.object_to_camera, second.object_to_camera)
    scores = [first.score] + [s for _, s in first.candidates]
    assert scores == sorted(scores, reverse=True) and len(first.candidates) <= 2
    rotation = first.object_to_camera[:3, :3]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(first.object_to_camera[3], [0, 0, 0, 1])


def test_masks_may_cover_a_crop_region_of_a_large_photo() -> None:
    """Intrinsics of the full photo; the object fills a small part of it, off centre."""
    vertices, faces = chair()
    camera = Intrinsics.from_fov(1600, 1200, 55)
    rotation = look_at(math.radians(200), math.radians(25), 0.0)
    translation = np.array([1.1, 0.4, 4.0])
    silhouette = reference_silhouette(vertices @ rotation.T + translation, faces, camera)
    occluder = np.zeros_like(silhouette)
    columns = np.nonzero(silhouette)[1]
    occluder[:, : int(np.quantile(columns, 0.3))] = True
    placement = fit_pose(vertices, faces, silhouette & ~occluder, occluder, camera)
    matrix = placement.object_to_camera
    fitted = reference_silhouette(vertices @ matrix[:3, :3].T + matrix[:3, 3], faces, camera)
    assert (fitted & silhouette).sum() / (fitted | silhouette).sum() >= 0.85
    assert abs(matrix[2, 3] - 4.0) / 4.0 <= 0.1


def _simple_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Intrinsics]:
    vertices, faces = block()
    camera = Intrinsics.from_fov(64, 48, 50)
    target = np.zeros((48, 64), dtype=bool)
    target[10:30, 20:40] = True
    return vertices, faces, target, np.zeros_like(target), camera


def test_empty_target_is_refused() -> None:
    vertices, faces, target, occluder, camera = _simple_inputs()
    with pytest.raises(PlacementError, match="target mask is empty"):
        fit_pose(vertices, faces, np.zeros_like(target), occluder, camera)
    with pytest.raises(PlacementError, match="target mask is empty"):
        fit_pose(vertices, faces, target, np.ones_like(target), camera)


def test_one_pixel_target_is_refused() -> None:
    vertices, faces, target, occluder, camera = _simple_inputs()
    dot = np.zeros_like(target)
    dot[20, 30] = True
    with pytest.raises(PlacementError, match="1 visible pixel"):
        fit_pose(vertices, faces, dot, occluder, camera)


def test_masks_of_another_size_are_refused() -> None:
    vertices, faces, target, occluder, camera = _simple_inputs()
    with pytest.raises(PlacementError, match=r"target mask is \(32, 24\).*camera is 64x48"):
        fit_pose(vertices, faces, target[::2, ::2], occluder, camera)
    with pytest.raises(PlacementError, match="occluder mask"):
        fit_pose(vertices, faces, target, occluder.T, camera)


def test_bad_settings_are_refused() -> None:
    vertices, faces, target, occluder, camera = _simple_inputs()
    with pytest.raises(PlacementError, match="resolution must be at least"):
        fit_pose(vertices, faces, target, occluder, camera, resolution=8)
    with pytest.raises(PlacementError, match="candidates at least 0"):
        fit_pose(vertices, faces, target, occluder, camera, candidates=-1)


def test_the_fit_writes_a_pose_json(tmp_path: Path) -> None:
    vertices, faces, target, occluder, camera = _simple_inputs()
    placement = fit_pose(vertices, faces, target, occluder, camera, resolution=64, candidates=5)
    assert len(placement.candidates) <= 5
    path = placement.pose(camera).write(tmp_path / "pose.json")
    back = Pose.from_json(path)
    np.testing.assert_allclose(back.object_to_camera, placement.object_to_camera)
    assert back.camera == camera and len(back.candidates) == min(3, len(placement.candidates))


def test_mesh_without_faces_is_refused() -> None:
    vertices, _, target, occluder, camera = _simple_inputs()
    with pytest.raises(PlacementError, match="no faces"):
        fit_pose(vertices, np.zeros((0, 3), dtype=np.int64), target, occluder, camera)
    assert issubclass(PlacementError, ValueError)

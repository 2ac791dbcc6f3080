"""Camera intrinsics (JSON, field of view, EXIF), pose.json, and the mesh loader for placement."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from amodal3r.api.camera import CameraError, Intrinsics, Pose
from amodal3r.api.errors import InputError
from amodal3r.api.protocol import PlaceParams
from amodal3r.io.camera import MeshError, load_mesh_for_placement, photo_camera
from amodal3r.io.inputs import Upload

GOOD = {"width": 640, "height": 480, "fx": 500.0, "fy": 505.5, "cx": 320.5, "cy": 239.0}


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_json_round_trip(tmp_path: Path) -> None:
    camera = Intrinsics.from_json(write_json(tmp_path / "camera.json", GOOD))
    assert camera == Intrinsics(**GOOD)
    again = Intrinsics.from_json(write_json(tmp_path / "again.json", camera.to_dict()))
    assert again == camera and again.to_dict() == GOOD
    np.testing.assert_allclose(camera.matrix, [[500, 0, 320.5], [0, 505.5, 239], [0, 0, 1]])


def test_whole_number_floats_are_accepted_as_sizes(tmp_path: Path) -> None:
    camera = Intrinsics.from_json(write_json(tmp_path / "c.json", {**GOOD, "width": 640.0}))
    assert camera.width == 640 and isinstance(camera.width, int)


BAD = [
    ("width", None, "missing"),
    ("fx", None, "missing"),
    ("cy", None, "missing"),
    ("fx", "500", "not a number"),
    ("width", True, "not a number"),
    ("cx", [1], "not a number"),
    ("fy", math.inf, "not a finite number"),
    ("cx", math.nan, "not a finite number"),
    ("width", 0, "positive whole number"),
    ("height", -480, "positive whole number"),
    ("width", 640.5, "positive whole number"),
    ("fx", 0, "must be positive"),
    ("fy", -500, "must be positive"),
    ("cx", -1, "outside the image"),
    ("cx", 641, "outside the image"),
    ("cy", 480.5, "outside the image"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD)
def test_each_bad_field_is_named(tmp_path: Path, field: str, value: object, message: str) -> None:
    data = dict(GOOD)
    if value is None:
        del data[field]
    else:
        data[field] = value
    path = tmp_path / "camera.json"
    path.write_text(json.dumps(data))  # json writes inf and nan as Infinity and NaN, and reads them back
    with pytest.raises(CameraError, match=f"'{field}'.*{message}") as error:
        Intrinsics.from_json(path)
    assert str(path) in str(error.value) and "OpenCV convention" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_the_constructor_validates_too() -> None:
    with pytest.raises(CameraError, match="'fx'"):
        Intrinsics(640, 480, -1.0, 500.0, 320.0, 240.0)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CameraError, match="not found"):
        Intrinsics.from_json(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{width: 640")
    with pytest.raises(CameraError, match="not a readable JSON"):
        Intrinsics.from_json(tmp_path / "broken.json")
    with pytest.raises(CameraError, match="expected an object"):
        Intrinsics.from_json(write_json(tmp_path / "list.json", [640, 480]))


def exif_camera(path: Path) -> Intrinsics:
    return photo_camera(path, PlaceParams())


def test_unreadable_images_for_exif(tmp_path: Path) -> None:
    (tmp_path / "not.jpg").write_bytes(b"text")
    with pytest.raises(InputError, match="cannot read this image"):
        exif_camera(tmp_path / "not.jpg")
    with pytest.raises(InputError, match="not found"):
        exif_camera(tmp_path / "missing.jpg")


def test_from_fov() -> None:
    camera = Intrinsics.from_fov(640, 480, 90)
    assert camera.fx == pytest.approx(320) and camera.fy == camera.fx
    assert (camera.cx, camera.cy) == (320, 240)
    narrow = Intrinsics.from_fov(800, 600, 40)
    assert 2 * math.degrees(math.atan(400 / narrow.fx)) == pytest.approx(40)
    for bad in (0, 180, -5):
        with pytest.raises(CameraError, match="field of view"):
            Intrinsics.from_fov(640, 480, bad)


def jpeg(
    path: Path,
    size: tuple[int, int],
    focal_35mm: int | None = None,
    *,
    sub_ifd: bool = True,
    orientation: int | None = None,
) -> Path:
    """A JPEG with FocalLengthIn35mmFilm in the Exif sub-IFD (where cameras write it) or in IFD0."""
    exif = Image.Exif()
    if focal_35mm is not None:
        if sub_ifd:
            exif.get_ifd(0x8769)[41989] = focal_35mm
        else:
            exif[41989] = focal_35mm
    if orientation is not None:
        exif[274] = orientation
    Image.new("RGB", size, (90, 120, 150)).save(path, exif=exif)
    return path


def test_exif_focal_length(tmp_path: Path) -> None:
    camera = exif_camera(jpeg(tmp_path / "a.jpg", (400, 300), 28))
    assert camera.fx == pytest.approx(28 / 36 * 400) and camera.fy == camera.fx
    assert (camera.width, camera.height, camera.cx, camera.cy) == (400, 300, 200, 150)
    in_ifd0 = exif_camera(jpeg(tmp_path / "b.jpg", (400, 300), 28, sub_ifd=False))
    assert in_ifd0.fx == pytest.approx(camera.fx)
    uploaded = photo_camera(Upload("view0_image (a.jpg)", (tmp_path / "a.jpg").read_bytes()), PlaceParams())
    assert uploaded == camera


def test_portrait_photos_match_the_film_to_the_long_side(tmp_path: Path) -> None:
    camera = exif_camera(jpeg(tmp_path / "p.jpg", (300, 400), 28))
    assert camera.fx == pytest.approx(28 / 36 * 400)
    turned = exif_camera(jpeg(tmp_path / "t.jpg", (400, 300), 28, orientation=6))
    assert (turned.width, turned.height) == (300, 400) and turned.fx == pytest.approx(camera.fx)


def test_no_exif_means_50mm(tmp_path: Path) -> None:
    camera = exif_camera(jpeg(tmp_path / "plain.jpg", (600, 400)))
    assert camera.fx == pytest.approx(50 / 36 * 600)
    zero = exif_camera(jpeg(tmp_path / "zero.jpg", (600, 400), 0))  # 0 means unknown
    assert zero.fx == pytest.approx(camera.fx)
    png = tmp_path / "plain.png"
    Image.new("RGB", (600, 400)).save(png)
    assert exif_camera(png).fx == pytest.approx(camera.fx)


def test_a_given_camera_or_fov_comes_first(tmp_path: Path) -> None:
    photo = jpeg(tmp_path / "t.jpg", (400, 300), 28, orientation=6)  # upright 300x400
    given = {"width": 600, "height": 800, "fx": 700.0, "fy": 700.0, "cx": 300.0, "cy": 400.0}
    assert photo_camera(photo, PlaceParams(camera=given)) == Intrinsics(**given)  # a scaled copy fits
    wide = photo_camera(photo, PlaceParams(fov=90.0))
    assert (wide.width, wide.height) == (300, 400) and wide.fx == pytest.approx(150)
    with pytest.raises(CameraError, match=r"camera: it is 640x480 but .*t.jpg is 300x400 \(upright\)"):
        photo_camera(photo, PlaceParams(camera=GOOD))


def test_pose_json_is_written_atomically_and_reads_back(tmp_path: Path) -> None:
    camera = Intrinsics(**GOOD)
    matrix = np.eye(4)
    matrix[:3, 3] = [0.1, -0.2, 2.5]
    other = np.diag([-1.0, 1.0, -1.0, 1.0])
    pose = Pose(matrix, camera, 0.93, ((other, 0.91),))
    path = pose.write(tmp_path / "pose.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pose.json"]  # no temporary file left
    data = json.loads(path.read_text())
    assert data["object_to_camera"] == matrix.tolist() and data["camera"] == GOOD
    assert data["score"] == pytest.approx(0.93)
    assert data["candidates"] == [{"object_to_camera": other.tolist(), "score": pytest.approx(0.91)}]
    back = Pose.from_json(path)
    np.testing.assert_array_equal(back.object_to_camera, matrix)
    assert back.camera == camera and back.score == pytest.approx(0.93) and len(back.candidates) == 1
    Pose(np.eye(4), camera, 0.5).write(path)  # replaces the old file
    assert json.loads(path.read_text())["candidates"] == []


def test_pose_checks_its_matrices() -> None:
    camera = Intrinsics(**GOOD)
    with pytest.raises(ValueError, match="4x4"):
        Pose(np.eye(3), camera, 0.5)
    with pytest.raises(ValueError, match="at most 3"):
        Pose(np.eye(4), camera, 0.5, tuple((np.eye(4), 0.1) for _ in range(4)))
    with pytest.raises(ValueError, match="candidate 0"):
        Pose(np.eye(4), camera, 0.5, ((np.full((4, 4), np.nan), 0.1),))


EYE = np.eye(4).tolist()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{", "not a readable pose.json"),
        (b"\xff\xfe", "not a readable pose.json"),
        (b"[]", "expected an object"),
        (json.dumps({"camera": GOOD, "score": 1}).encode(), "'object_to_camera' is missing"),
        (json.dumps({"object_to_camera": [[1]], "camera": GOOD, "score": 1}).encode(), "4x4"),
        (json.dumps({"object_to_camera": EYE, "camera": {}, "score": 1}).encode(), "'width' is missing"),
        (json.dumps({"object_to_camera": EYE, "camera": GOOD, "score": "high"}).encode(), "could not convert"),
        (json.dumps({"object_to_camera": EYE, "camera": GOOD, "score": 1, "candidates": [{}]}).encode(), "missing"),
    ],
)
def test_a_damaged_pose_json_names_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "pose.json"
    path.write_bytes(content)
    with pytest.raises(CameraError, match=message) as error:
        Pose.from_json(path)
    assert str(path) in str(error.value)


def test_load_mesh_for_placement(tmp_path: Path) -> None:
    trimesh.creation.box((1, 0.5, 0.3)).export(tmp_path / "box.glb")
    vertices, faces = load_mesh_for_placement(tmp_path / "box.glb")
    assert vertices.dtype == np.float32 and faces.dtype == np.int64
    assert faces.shape == (12, 3) and vertices.shape == (8, 3)
    np.testing.assert_allclose(np.ptp(vertices, axis=0), [1, 0.5, 0.3], atol=1e-6)


def test_large_meshes_are_decimated(tmp_path: Path) -> None:
    trimesh.creation.icosphere(subdivisions=5).export(tmp_path / "sphere.glb")  # 20,480 faces
    vertices, faces = load_mesh_for_placement(tmp_path / "sphere.glb", max_faces=2000)
    assert 1500 <= len(faces) <= 2000
    assert faces.max() < len(vertices)
    assert np.linalg.norm(vertices, axis=1).max() == pytest.approx(1.0, abs=0.02)


def test_meshes_placement_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(MeshError, match="not found"):
        load_mesh_for_placement(tmp_path / "missing.glb")
    trimesh.Scene(trimesh.PointCloud(np.random.default_rng(0).random((10, 3)))).export(tmp_path / "points.glb")
    with pytest.raises(MeshError, match="no triangles"):
        load_mesh_for_placement(tmp_path / "points.glb")
    (tmp_path / "junk.glb").write_bytes(b"not a mesh")
    with pytest.raises(MeshError, match="cannot read"):
        load_mesh_for_placement(tmp_path / "junk.glb")
    with pytest.raises(MeshError, match=r"mesh \(junk.glb\): cannot read"):
        load_mesh_for_placement(Upload("mesh (junk.glb)", b"glTF\x02\x00\x00\x00junk"))


def test_uploaded_meshes_load_like_files(tmp_path: Path) -> None:
    data = trimesh.creation.box((1, 0.5, 0.3)).export(file_type="glb")
    vertices, faces = load_mesh_for_placement(Upload("mesh (box.glb)", data))
    assert faces.shape == (12, 3) and vertices.shape == (8, 3)

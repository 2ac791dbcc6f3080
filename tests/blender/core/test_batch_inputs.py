# SPDX-License-Identifier: GPL-3.0-or-later
"""What batch.py reconstructs: objects and their views from folders and CSV tables, and every
problem of their files found before a server starts, one line each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from amodal3r.api.protocol import MAX_VIEWS
from amodal3r_blender.core import png
from amodal3r_blender.core.batch_inputs import (
    Item,
    View,
    csv_items,
    folder_items,
    item_problems,
    single_item,
    view_problems,
)

W, H = 8, 6


def _mask(path: Path, inside: bool = True, width: int = W, height: int = H) -> Path:
    values = np.zeros((height, width), np.uint8)
    if inside:
        values[1:4, 2:5] = 255
    path.write_bytes(png.encode_png(values))
    return path


def _grey(path: Path) -> Path:
    """A combined mask in the grey format: target 188 on a 255 background."""
    values = np.full((H, W), 255, np.uint8)
    values[1:4, 2:5] = 188
    path.write_bytes(png.encode_png(values))
    return path


def _photo(path: Path, width: int = W, height: int = H) -> Path:
    path.write_bytes(png.encode_png(np.full((height, width, 3), 90, np.uint8)))
    return path


def _view(folder: Path, name: str, single_mask: bool = False) -> None:
    _photo(folder / f"{name}.png")
    if single_mask:
        _grey(folder / f"{name}_mask.png")
    else:
        _mask(folder / f"{name}_target.png")


# --- folders ----------------------------------------------------------------------------------


def test_folder_objects(tmp_path):
    _view(tmp_path, "mug")
    _mask(tmp_path / "mug_occluder.png", inside=False)
    _view(tmp_path, "cup", single_mask=True)
    _view(tmp_path, "bowl")
    _grey(tmp_path / "bowl_mask.png")  # the pair of masks wins
    _view(tmp_path, "jar", single_mask=True)
    _mask(tmp_path / "jar_occluder.png", inside=False)  # a combined mask holds the occluders already
    collected = folder_items(tmp_path, tmp_path / "out")
    assert collected.problems == []
    assert [(i.name, i.out.name) for i in collected.items] == [
        ("bowl", "bowl.glb"),
        ("cup", "cup.glb"),
        ("jar", "jar.glb"),
        ("mug", "mug.glb"),
    ]
    kinds = {item.name: list(item.views[0].files()) for item in collected.items}
    assert kinds == {
        "bowl": ["image", "target_mask"],
        "cup": ["image", "mask"],
        "jar": ["image", "mask"],
        "mug": ["image", "target_mask", "occluder_mask"],
    }
    assert collected.items[3].views[0].files()["occluder_mask"] == str(tmp_path / "mug_occluder.png")
    assert all(item_problems(item) == [] for item in collected.items)


def test_folder_problems(tmp_path):
    empty = folder_items(tmp_path, tmp_path / "out")
    assert empty.items == [] and "holds no images" in empty.problems[0]
    _view(tmp_path, "mug")
    _photo(tmp_path / "bowl.png")
    collected = folder_items(tmp_path, tmp_path / "out")
    assert [i.name for i in collected.items] == ["mug"]
    (problem,) = collected.problems
    assert problem.startswith("bowl: ") and "add bowl_target.png" in problem


# --- CSV tables -------------------------------------------------------------------------------


def _table(folder: Path, text: str) -> Path:
    table = folder / "jobs.csv"
    table.write_text(text)
    return table


def test_csv_rows_of_one_object_are_its_views(tmp_path):
    (tmp_path / "views").mkdir()
    for name in ("a", "b", "c"):
        _view(tmp_path / "views", name)
    table = _table(
        tmp_path,
        "Image, target_mask ,occluder_mask,mask,object\n"
        "views/a.png,views/a_target.png,,,chair\n"
        "views/c.png,views/c_target.png,,,\n"
        "views/b.png,views/b_target.png,,,chair\n"
        ",,,,\n"
        "views/c.png,views/c_target.png,,,\n"
        "views/chair.png,,,views/a_target.png,\n",
    )
    collected = csv_items(table, tmp_path / "out")
    assert collected.problems == []
    names = [(i.name, [v.image.name for v in i.views]) for i in collected.items]
    assert names == [("chair", ["a.png", "b.png"]), ("c", ["c.png"]), ("c_2", ["c.png"]), ("chair_2", ["chair.png"])]
    chair = collected.items[0]
    assert chair.out == tmp_path / "out" / "chair.glb" and chair.views[1].where == "jobs.csv line 4"
    assert chair.views[0].files() == {
        "image": str(tmp_path / "views/a.png"),
        "target_mask": str(tmp_path / "views/a_target.png"),
    }


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no header"),
        ("image,target,mask\nx.png,y.png,\n", "unknown column(s) 'target': the columns are object, image,"),
        ("object,target_mask\nchair,y.png\n", "no image column"),
        ("image,mask,mask\nx.png,y.png,z.png\n", "column(s) 'mask' appear more than once"),
        ("image,mask\n", "lists no views"),
        ("image,mask\n,y.png\n", "line 2: the image column is empty"),
        ("image,mask\nx.png,y.png,z.png\n", "line 2: more cells than the header has columns"),
        ("object,image,mask\n../up,x.png,y.png\n", "object '../up' cannot be a file name"),
    ],
)
def test_csv_problems(tmp_path, text, problem):
    collected = csv_items(_table(tmp_path, text), tmp_path / "out")
    assert len(collected.problems) == 1 and problem in collected.problems[0]
    assert collected.problems[0].startswith(str(tmp_path / "jobs.csv"))


def test_csv_that_cannot_be_read(tmp_path):
    table = tmp_path / "jobs.csv"
    table.write_bytes(b"image\n\xff\xfe\x00")
    (problem,) = csv_items(table, tmp_path).problems
    assert "cannot be read as a CSV table" in problem


# --- checks of the files ----------------------------------------------------------------------


def test_a_good_view_has_no_problems(tmp_path):
    _view(tmp_path, "mug")
    _mask(tmp_path / "front.png", inside=False)
    _grey(tmp_path / "grey.png")
    assert view_problems(View(tmp_path / "mug.png", tmp_path / "mug_target.png", tmp_path / "front.png")) == []
    assert view_problems(View(tmp_path / "mug.png", mask=tmp_path / "grey.png")) == []


def test_every_problem_is_one_line(tmp_path):
    _photo(tmp_path / "mug.png")
    (tmp_path / "notes.png").write_text("not an image")
    _mask(tmp_path / "small.png", width=4, height=4)
    _mask(tmp_path / "empty.png", inside=False)
    _mask(tmp_path / "target.png")
    full = np.full((H, W), 255, np.uint8)
    (tmp_path / "full.png").write_bytes(png.encode_png(full))
    grey_empty = np.full((H, W), 255, np.uint8)
    (tmp_path / "grey_empty.png").write_bytes(png.encode_png(grey_empty))
    cases = [
        (View(tmp_path / "gone.png", tmp_path / "target.png"), f"image {tmp_path / 'gone.png'} does not exist"),
        (View(tmp_path / "mug.png", tmp_path / "nope.png"), f"target mask {tmp_path / 'nope.png'} does not exist"),
        (View(tmp_path / "notes.png", tmp_path / "target.png"), "notes.png: not a PNG, JPEG, WebP, TIFF or BMP file"),
        (View(tmp_path / "mug.png", tmp_path / "notes.png"), "notes.png: not a PNG file"),
        (View(tmp_path / "mug.png", tmp_path / "small.png"), "small.png is 4x4 but image"),
        (View(tmp_path / "mug.png", tmp_path / "empty.png"), "the target mask is empty"),
        (View(tmp_path / "mug.png", tmp_path / "target.png", tmp_path / "full.png"), "covers the whole target"),
        (View(tmp_path / "mug.png", mask=tmp_path / "grey_empty.png"), "the target mask is empty"),
        (View(tmp_path / "mug.png"), "has no mask"),
        (View(tmp_path / "mug.png", tmp_path / "target.png", mask=tmp_path / "target.png"), "one or the other"),
    ]
    for view, expected in cases:
        problems = view_problems(view)
        assert len(problems) == 1 and expected in problems[0], (view, problems)
        assert "\n" not in problems[0]


def test_item_problems_name_the_object_and_the_line(tmp_path):
    _view(tmp_path, "mug")
    good = View(tmp_path / "mug.png", tmp_path / "mug_target.png", where="jobs.csv line 2")
    bad = View(tmp_path / "mug.png", tmp_path / "gone.png", where="jobs.csv line 3")
    worse = View(tmp_path / "gone.png", tmp_path / "gone.png", where="jobs.csv line 4")
    problems = item_problems(Item("chair", [good, bad, worse], tmp_path / "chair.glb"))
    assert [p.split(":")[0] for p in problems] == ["chair (jobs.csv line 3)"] + ["chair (jobs.csv line 4)"] * 2
    too_many = Item("chair", [good] * (MAX_VIEWS + 1), tmp_path / "chair.glb")
    assert item_problems(too_many) == [f"chair: {MAX_VIEWS + 1} views, but a job takes at most {MAX_VIEWS}: drop some"]
    single = single_item(tmp_path / "mug.png", None, None, tmp_path / "gone.png", tmp_path / "o.glb")
    assert item_problems(single) == [f"mug: mask {tmp_path / 'gone.png'} does not exist"]


def test_sizes_come_from_the_headers(tmp_path):
    """A mask of the wrong size is reported from its header: its pixels are never decoded (here they
    could not be: the image data is damaged)."""
    _photo(tmp_path / "mug.png")
    data = bytearray(png.encode_png(np.zeros((4, 4), np.uint8)))
    data[data.index(b"IDAT") + 6] ^= 0xFF
    (tmp_path / "small.png").write_bytes(bytes(data))
    (problem,) = view_problems(View(tmp_path / "mug.png", tmp_path / "small.png"))
    assert "small.png is 4x4 but image" in problem and f"is {W}x{H}" in problem

"""Reading a batch folder or CSV: which items it holds, and what is wrong with the bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from batch_pictures import H, W, write_picture
from PIL import Image

from amodal3r.api.errors import InputError
from amodal3r.io.batch_inputs import check_items, read_batch


def test_folder_items_and_their_masks(tmp_path: Path) -> None:
    write_picture(tmp_path, "chair", "pair")
    write_picture(tmp_path, "lamp", "target")
    write_picture(tmp_path, "mug", "grey")
    write_picture(tmp_path, "sofa", "none")
    (tmp_path / "notes.txt").write_text("not a picture")
    items = {item.name: item for item in read_batch(tmp_path)}
    assert sorted(items) == ["chair", "lamp", "mug", "sofa"]
    assert set(items["chair"].views[0]) == {"image", "target_mask", "occluder_mask"}
    assert set(items["lamp"].views[0]) == {"image", "target_mask"}
    assert set(items["mug"].views[0]) == {"image", "mask"}
    assert not items["sofa"].ok and "sofa_target.png" in items["sofa"].error
    assert all(items[name].ok for name in ("chair", "lamp", "mug"))


def test_csv_groups_views_of_one_object_and_names_bad_rows(tmp_path: Path) -> None:
    for stem in ("front", "side", "solo", "alone"):
        write_picture(tmp_path / "pics", stem, "pair")
    rows = [
        "image,target_mask,occluder_mask,mask,object",
        "pics/front.png,pics/front_target.png,pics/front_occluder.png,,kettle",
        "pics/solo.png,pics/solo_target.png,,,",
        "pics/side.png,pics/side_target.png,pics/side_occluder.png,,kettle",
        "pics/alone.png,,,,",
        ",pics/solo_target.png,,,",
        "pics/solo.png,pics/solo_target.png,,,../escape",
    ]
    table = tmp_path / "batch.csv"
    table.write_text("\n".join(rows) + "\n")
    items = read_batch(table)
    assert [item.name for item in items] == ["kettle", "solo", "alone", "line6", "../escape"]
    kettle, solo, alone, empty, escape = items
    assert [v["image"].name for v in kettle.views] == ["front.png", "side.png"] and kettle.ok
    assert solo.ok and solo.views[0]["image"] == tmp_path / "pics" / "solo.png"
    assert "line 5" in alone.error and "target_mask" in alone.error
    assert "line 6: the image column is empty" in empty.error
    assert "cannot be a file name" in escape.error


def test_checks_read_every_view(tmp_path: Path) -> None:
    write_picture(tmp_path, "good", "pair")
    write_picture(tmp_path, "wrong_size", "pair", mask_size=(W // 2, H // 2))
    write_picture(tmp_path, "blank", "pair")
    Image.new("L", (W, H), 0).save(tmp_path / "blank_target.png")
    checked = {item.name: item for item in check_items(read_batch(tmp_path))}
    assert checked["good"].ok
    assert "mask is 30x20 but wrong_size.png is 60x40" in checked["wrong_size"].error
    assert "blank_target.png" in checked["blank"].error


@pytest.mark.parametrize("case", ["missing", "not a table", "no header", "empty folder"])
def test_a_source_that_is_no_batch_is_refused(tmp_path: Path, case: str) -> None:
    source = {
        "missing": tmp_path / "nowhere",
        "not a table": tmp_path / "list.txt",
        "no header": tmp_path / "rows.csv",
        "empty folder": tmp_path / "empty",
    }[case]
    if case == "not a table":
        source.write_text("a.png\n")
    if case == "no header":
        source.write_text("a.png,a_target.png\n")
    if case == "empty folder":
        source.mkdir()
    with pytest.raises(InputError) as error:
        read_batch(source)
    assert str(source) in str(error.value)

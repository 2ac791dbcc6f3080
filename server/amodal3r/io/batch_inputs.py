"""Reading a batch: a folder of pictures with their masks, or a CSV of them, as items to reconstruct.

The conventions (``api/batch_layout.py``) are shared with the Blender add-on's ``batch.py``: a folder
holds ``NAME.png|jpg`` with ``NAME_target.png`` [+ ``NAME_occluder.png``] or ``NAME_mask.png``; a CSV
has the columns ``image,target_mask,occluder_mask,mask`` (paths relative to the CSV) and an optional
``object`` column: rows with the same object are views of one object. A problem with one item (a
missing mask, an unreadable image) makes that item bad, never the whole batch.
"""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from amodal3r.api.batch_layout import (
    CSV_COLUMNS,
    OBJECT_COLUMN,
    folder_images,
    image_masks,
    no_mask_hint,
    unique_name,
)
from amodal3r.api.errors import InputError

from .inputs import load_view

CHECK_THREADS = 4  # image decoding releases the GIL: a few threads check a large batch faster


@dataclass
class BatchItem:
    """One object to reconstruct: its name (the output file stem) and its views' files by kind."""

    name: str
    views: list[dict[str, Path]]
    error: str = ""  # why the item cannot run; empty for a good item

    @property
    def ok(self) -> bool:
        return not self.error


def read_batch(source: Path) -> list[BatchItem]:
    """The items of a folder or CSV, good and bad, in a stable order (names sorted for a folder,
    row order for a CSV). A source that is neither raises InputError."""
    source = Path(source)
    if source.is_dir():
        items = folder_items(source)
    elif source.suffix.lower() == ".csv" and source.is_file():
        items = csv_items(source)
    else:
        raise InputError(f"{source}: expected a folder of pictures with masks or a .csv file; check the path")
    if not items:
        raise InputError(
            f"{source} lists no pictures: add NAME.png with NAME_target.png (or NAME_mask.png), "
            f"or CSV rows with the columns {','.join(CSV_COLUMNS)}"
        )
    return items


def folder_items(folder: Path) -> list[BatchItem]:
    taken: set[str] = set()
    return [_folder_item(image, unique_name(image.stem, taken)) for image in folder_images(folder)]


def _folder_item(image: Path, name: str) -> BatchItem:
    masks = image_masks(image)
    if not masks:
        return BatchItem(name, [{"image": image}], f"no mask: {no_mask_hint(image)}")
    return BatchItem(name, [{"image": image, **masks}])


def csv_items(table: Path) -> list[BatchItem]:
    try:
        with table.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [column.strip() for column in reader.fieldnames or []]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{table}: cannot read this CSV ({error}); save it as UTF-8 text") from None
    if "image" not in header:
        raise InputError(f"{table}: the header must name the columns {','.join(CSV_COLUMNS)}[,{OBJECT_COLUMN}]")
    objects: dict[str, BatchItem] = {}
    items: list[BatchItem] = []
    taken: set[str] = set()
    for line, row in enumerate(rows, start=2):
        row = {(key or "").strip(): (value or "").strip() for key, value in row.items() if isinstance(value, str)}
        view, error = _csv_view(table, row, line)
        group = row.get(OBJECT_COLUMN, "")
        if group and group in objects:
            item = objects[group]
            item.views.append(view)
            item.error = item.error or error
            continue
        item = BatchItem(unique_name(group or _stem(row.get("image", ""), line), taken), [view], error)
        if group:
            objects[group] = item
            item.error = item.error or _name_problem(group, line)
        items.append(item)
    return items


def _csv_view(table: Path, row: dict[str, str], line: int) -> tuple[dict[str, Path], str]:
    """One row's files (relative to the CSV) and what is wrong with them, if anything."""
    view = {kind: table.parent / row[kind] for kind in CSV_COLUMNS if row.get(kind)}
    if "image" not in view:
        return view, f"line {line}: the image column is empty"
    if ("mask" in view) == ("target_mask" in view):
        return view, f"line {line}: give a target_mask (and optionally an occluder_mask) or a mask, not both"
    if "mask" in view and "occluder_mask" in view:
        return view, f"line {line}: a combined mask already holds the occluders; empty the occluder_mask column"
    return view, ""


def _stem(path: str, line: int) -> str:
    return Path(path).stem or f"line{line}"


def _name_problem(name: str, line: int) -> str:
    """An object name becomes a file name: it cannot hold a folder or start with a dot."""
    if any(c in name for c in '/\\:*?"<>|') or name.startswith("."):
        return f"line {line}: object name {name!r} cannot be a file name; use letters, digits, - and _"
    return ""


def check_item(item: BatchItem) -> BatchItem:
    """Read every view as the reconstruction will (files present, readable, masks the image's size,
    target visible); a problem becomes the item's error."""
    if not item.ok:
        return item
    for index, view in enumerate(item.views):
        try:
            load_view(view["image"], view.get("target_mask"), view.get("occluder_mask"), view.get("mask"))
        except InputError as error:
            where = f"view {index + 1}: " if len(item.views) > 1 else ""
            item.error = f"{where}{error}"
            break
    return item


def check_items(items: list[BatchItem], threads: int = CHECK_THREADS) -> list[BatchItem]:
    """:func:`check_item` on each item, a few at a time; the order is kept."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return list(pool.map(check_item, items))

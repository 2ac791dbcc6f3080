# SPDX-License-Identifier: GPL-3.0-or-later
"""What batch.py reconstructs: objects with their views, from the command line, a folder or a CSV.

Every input is checked here before any server starts, and every problem is reported, not only the
first: one line each, naming the object, where it came from and what to do. No bpy.

The conventions are the server's ``amodal3r batch``'s (``amodal3r.api.batch_layout``): a folder holds
``NAME.png|jpg`` with ``NAME_target.png`` [+ ``NAME_occluder.png``] or ``NAME_mask.png``; a CSV has
the columns ``image``, ``target_mask``, ``occluder_mask``, ``mask`` (paths relative to the CSV) and
optionally ``object``: rows with the same object are the views of one object, one job.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from amodal3r.api.batch_layout import (
    CSV_COLUMNS,
    MASK_SUFFIXES,
    OBJECT_COLUMN,
    folder_images,
    image_masks,
    no_mask_hint,
    unique_name,
)
from amodal3r.api.errors import InputError
from amodal3r.api.masks import combined_to_masks, visible_target
from amodal3r.api.protocol import MAX_VIEWS

from .image_files import Header, mask_fits, mask_values, read_header, upright_size

MASK_KINDS = tuple(MASK_SUFFIXES)  # target_mask, occluder_mask, mask
COLUMNS = (OBJECT_COLUMN, *CSV_COLUMNS)


@dataclass
class View:
    """One photo of an object and its mask files."""

    image: Path
    target_mask: Path | None = None
    occluder_mask: Path | None = None
    mask: Path | None = None
    where: str = ""  # where it was given, for messages: "jobs.csv line 3"

    def files(self) -> dict[str, str]:
        """The view as the client uploads it: kind -> path."""
        return {kind: str(path) for kind in CSV_COLUMNS if (path := getattr(self, kind)) is not None}


@dataclass
class Item:
    """One object to reconstruct from its views, and the file its result goes to."""

    name: str
    views: list[View]
    out: Path


@dataclass
class Collected:
    """The items found, and the problems met finding them (one line each)."""

    items: list[Item]
    problems: list[str]


# --- checks -----------------------------------------------------------------------------------


def item_problems(item: Item) -> list[str]:
    """Every problem of an object's views, each a line naming the object, the view and the fix."""
    problems = []
    if len(item.views) > MAX_VIEWS:
        problems.append(f"{item.name}: {len(item.views)} views, but a job takes at most {MAX_VIEWS}: drop some")
    for view in item.views:
        where = f"{item.name} ({view.where})" if view.where else item.name
        problems += [f"{where}: {problem}" for problem in view_problems(view)]
    return problems


def view_problems(view: View) -> list[str]:
    """What is wrong with one view's files: missing, unreadable, a mask of another size than its
    image (from the headers alone), or no visible target (the masks decoded, the photo never)."""
    if view.mask is not None and (view.target_mask is not None or view.occluder_mask is not None):
        return [f"{view.image.name} has both a combined mask and a target or occluder mask: give one or the other"]
    if view.mask is None and view.target_mask is None:
        return [f"{view.image.name} has no mask: give a target mask (and an occluder mask) or one combined mask"]
    problems: list[str] = []
    image = _checked(problems, "image", view.image, read_header)
    masks = {
        kind: _checked(problems, _what(kind), path, lambda p: read_header(p, mask=True))
        for kind in MASK_KINDS
        if (path := getattr(view, kind)) is not None
    }
    if image is None or any(header is None for header in masks.values()):
        return problems
    for kind, header in masks.items():
        if not mask_fits(header, image):
            width, height = upright_size(header, image)
            problems.append(
                f"{_what(kind)} {getattr(view, kind)} is {width}x{height} but image {view.image} is "
                f"{image.size[0]}x{image.size[1]}: masks must be the size of their image"
            )
    if not problems:
        problems += _target_problems(view, image, masks)
    return problems


def _what(kind: str) -> str:
    return kind.replace("_", " ")


def _checked(problems: list[str], what: str, path: Path, read: Callable[[Path], Header]) -> Header | None:
    """``read(path)``, or None with the problem recorded."""
    if not path.is_file():
        problems.append(f"{what} {path} does not exist")
        return None
    try:
        return read(path)
    except InputError as error:
        problems.append(f"{what} {path}: {error}")
        return None


def _target_problems(view: View, image: Header, masks: dict[str, Header]) -> list[str]:
    """An empty target, or one the occluder covers whole, as the server would find it."""
    values, problems = {}, []
    for kind, header in masks.items():
        path = getattr(view, kind)
        try:
            values[kind] = mask_values(path, header, image)
        except InputError as error:
            problems.append(f"{_what(kind)} {path}: {error}")
    if problems:
        return problems
    if "mask" in values:
        target, occluder = combined_to_masks(values["mask"])
        source = view.mask
    else:
        target = values["target_mask"] > 127
        occluder = values["occluder_mask"] > 127 if "occluder_mask" in values else None
        source = view.target_mask
    try:
        visible_target(target, occluder, str(source))
    except InputError as error:
        return [str(error)]
    return []


# --- the command line -------------------------------------------------------------------------


def single_item(image: Path, target: Path | None, occluder: Path | None, mask: Path | None, out: Path) -> Item:
    """The one object of ``--image`` with its masks."""
    return Item(image.stem, [View(image, target, occluder, mask)], out)


# --- folders ----------------------------------------------------------------------------------


def folder_items(folder: Path, out_dir: Path) -> Collected:
    """The objects of a folder, one per picture: ``NAME.png`` (or .jpg) and its masks."""
    images = folder_images(folder)
    if not images:
        return Collected([], [f"{folder} holds no images (NAME.png with NAME_target.png or NAME_mask.png)"])
    items, problems, taken = [], [], set()
    for image in images:
        name = unique_name(image.stem, taken)
        masks = image_masks(image)
        if not masks:
            problems.append(f"{name}: {image} has no mask: {no_mask_hint(image)}")
            continue
        items.append(Item(name, [View(image, **masks)], out_dir / f"{name}.glb"))
    return Collected(items, problems)


# --- CSV tables -------------------------------------------------------------------------------


def csv_items(table: Path, out_dir: Path) -> Collected:
    """The objects of a CSV table; rows sharing an ``object`` value are the views of one object."""
    try:
        with table.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = [name.strip().lower() for name in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        return Collected([], [f"{table}: cannot be read as a CSV table ({error})"])
    problems = _header_problems(table, header)
    if problems:
        return Collected([], problems)
    grouped: dict[str, list[View]] = {}
    unnamed: list[View] = []
    for line, row in enumerate(rows, start=2):
        cells = {(key or "").strip().lower(): (value or "").strip() for key, value in row.items() if key is not None}
        if None in row:
            problems.append(f"{table} line {line}: more cells than the header has columns")
        elif not any(cells.values()):
            continue  # a blank line
        elif not cells.get("image"):
            problems.append(f"{table} line {line}: the image column is empty")
        else:
            view = _csv_view(table, cells, line)
            if cells.get(OBJECT_COLUMN):
                grouped.setdefault(cells[OBJECT_COLUMN], []).append(view)
            else:
                unnamed.append(view)
    problems += [
        f"{table}: object {name!r} cannot be a file name: use letters, digits, - and _"
        for name in grouped
        if not _named(name)
    ]
    if not grouped and not unnamed and not problems:
        problems.append(f"{table} lists no views: add a line per view under its header")
    return Collected(_csv_objects(grouped, unnamed, out_dir), problems)


def _header_problems(table: Path, header: list[str]) -> list[str]:
    """A header naming an unknown column (a typo would silently drop a mask), no image column or
    one column twice."""
    expected = ", ".join(COLUMNS)
    if not header:
        return [f"{table}: no header: the first line names the columns ({expected})"]
    unknown = [name for name in header if name not in COLUMNS]
    if unknown:
        return [f"{table}: unknown column(s) {', '.join(map(repr, unknown))}: the columns are {expected}"]
    if "image" not in header:
        return [f"{table}: no image column: the columns are {expected}"]
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        return [f"{table}: column(s) {', '.join(map(repr, duplicated))} appear more than once"]
    return []


def _csv_view(table: Path, cells: dict[str, str], line: int) -> View:
    paths = {kind: table.parent / cells[kind] if cells.get(kind) else None for kind in CSV_COLUMNS}
    return View(
        paths["image"], paths["target_mask"], paths["occluder_mask"], paths["mask"], f"{table.name} line {line}"
    )


def _csv_objects(grouped: dict[str, list[View]], unnamed: list[View], out_dir: Path) -> list[Item]:
    """Named objects keep their names; a row without one is its own object, named after its image."""
    taken = set(grouped)
    items = [Item(name, views, out_dir / f"{name}.glb") for name, views in grouped.items()]
    for view in unnamed:
        name = unique_name(view.image.stem, taken)
        items.append(Item(name, [view], out_dir / f"{name}.glb"))
    return items


def _named(name: str) -> bool:
    """Whether an object name can name its result file (the server's ``amodal3r batch`` rule)."""
    return not name.startswith(".") and not set(name) & set('/\\:*?"<>|')

"""How a batch of pictures lies on disk: one set of conventions for the add-on's ``batch.py`` and
``amodal3r batch`` (standard library only).

A folder holds ``NAME.png|jpg|jpeg`` with ``NAME_target.png`` [+ ``NAME_occluder.png``] or
``NAME_mask.png``; a CSV has the columns ``image,target_mask,occluder_mask,mask`` (paths relative to
the CSV), and for ``amodal3r batch`` an optional ``object`` column grouping views of one object.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_SUFFIXES = {"target_mask": "_target", "occluder_mask": "_occluder", "mask": "_mask"}  # kind -> stem suffix
CSV_COLUMNS = ("image", "target_mask", "occluder_mask", "mask")
OBJECT_COLUMN = "object"


def unique_name(name: str, taken: set[str]) -> str:
    """``name``, else ``name_2``, ``name_3``...: two pictures never write the same result. Adds it to ``taken``."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate


def folder_images(folder: Path) -> list[Path]:
    """The pictures of a batch folder, sorted: image files whose name is not a mask's."""
    masks = tuple(MASK_SUFFIXES.values())
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.stem.endswith(masks)
    )


def image_masks(image: Path) -> dict[str, Path]:
    """The masks beside a picture that count, by kind; empty when it has no target or combined mask.
    The pair of masks wins over a combined one, and a combined mask holds the occluders already."""
    beside = {kind: image.with_name(f"{image.stem}{suffix}.png") for kind, suffix in MASK_SUFFIXES.items()}
    found = {kind: path for kind, path in beside.items() if path.is_file()}
    if "target_mask" in found:
        found.pop("mask", None)
    elif "mask" in found:
        found.pop("occluder_mask", None)
    else:
        return {}
    return found


def no_mask_hint(image: Path) -> str:
    """What to add beside a picture without masks."""
    return f"add {image.stem}_target.png (and {image.stem}_occluder.png) or {image.stem}_mask.png next to it"

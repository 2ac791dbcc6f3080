"""How a batch of pictures lies on disk: one set of conventions for the add-on's ``batch.py`` and
``amodal3r batch`` (standard library only).

A folder holds ``NAME.png|jpg|jpeg`` with ``NAME_target.png`` [+ ``NAME_occluder.png``] or
``NAME_mask.png``; a CSV has the columns ``image,target_mask,occluder_mask,mask`` (paths relative to
the CSV), and for ``amodal3r batch`` an optional ``object`` column grouping views of one object.
"""

from __future__ import annotations

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

"""Pictures with masks on disk, as a batch folder holds them, for the batch tests."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from amodal3r.pipelines.conditioning import masks_to_grey

H, W = 40, 60
FAST = ["--steps", "1", "--texture-size", "64", "--faces", "2000"]  # batch options for quick whole jobs


def write_picture(
    folder: Path, stem: str, masks: str = "pair", mask_size: tuple[int, int] = (W, H), seed: int = 0
) -> Path:
    """``stem.png`` with ``pair`` (target + occluder), ``target`` only, ``grey`` (one mask) or ``none``;
    masks drawn at ``mask_size`` (the picture's own size unless a test wants them wrong)."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = (np.random.default_rng(seed).random((H, W, 3)) * 255).astype(np.uint8)
    Image.fromarray(picture).save(folder / f"{stem}.png")
    target = np.zeros(mask_size[::-1], bool)
    target[10:30, 10:40] = True
    occluder = np.zeros_like(target)
    occluder[5:35, 30:50] = True
    if masks in ("pair", "target"):
        Image.fromarray((target & ~occluder).astype(np.uint8) * 255).save(folder / f"{stem}_target.png")
    if masks == "pair":
        Image.fromarray(occluder.astype(np.uint8) * 255).save(folder / f"{stem}_occluder.png")
    if masks == "grey":
        Image.fromarray(masks_to_grey(target & ~occluder, occluder)).save(folder / f"{stem}_mask.png")
    return folder / f"{stem}.png"


def summary(out_dir: Path) -> dict[str, dict[str, str]]:
    """``summary.csv`` of a batch run, by item name."""
    with (out_dir / "summary.csv").open(newline="") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}

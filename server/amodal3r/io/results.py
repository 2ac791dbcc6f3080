"""Writing a run's results: per variant a GLB, and on request the Gaussians and a preview.

Shared by the command line and the server's worker, so both write the same files the same way. A
run's files are written into a hidden staging folder beside their destination and moved into place
together at the end: a run that fails, is cancelled or is interrupted (Ctrl+C) leaves none of them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from amodal3r.api.errors import Cancelled
from amodal3r.representations.gaussians import Gaussians
from amodal3r.representations.mesh import Mesh

from .export import ExportReport, export_glb, preview_png

GAUSSIANS_SUFFIX, PREVIEW_SUFFIX = ".ply", ".png"
STAGING_PREFIX = ".amodal3r-partial-"


@dataclass(frozen=True)
class OutputSettings:
    texture_size: int = 1024
    faces: int | None = None  # decimate to about this many faces before unwrapping; None keeps all
    gaussians: bool = False  # also write the 3D Gaussians as a 3DGS .ply
    preview: bool = False  # also write a front-view .png


@dataclass
class WrittenVariant:
    glb: Path
    report: ExportReport
    extras: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # besides the export's, e.g. why there is no pose

    @property
    def files(self) -> list[Path]:
        return [self.glb, *self.extras]

    @property
    def notices(self) -> list[str]:
        return [*self.report.notices, *self.notes]


def write_variant(
    mesh: Mesh,
    gaussians: Gaussians | None,
    glb: Path,
    settings: OutputSettings,
    cancelled: Callable[[], bool] | None = None,
) -> WrittenVariant:
    """The GLB at ``glb``; the .ply and .png beside it, with the same stem."""
    report = export_glb(mesh, glb, texture_size=settings.texture_size, target_faces=settings.faces, cancelled=cancelled)
    written = WrittenVariant(glb, report)
    if settings.preview:
        preview_png(mesh, glb.with_suffix(PREVIEW_SUFFIX))
        written.extras.append(glb.with_suffix(PREVIEW_SUFFIX))
    if settings.gaussians:
        if gaussians is None:
            raise ValueError("no Gaussians to write: decode the gaussian format too")
        gaussians.save_ply(glb.with_suffix(GAUSSIANS_SUFFIX))
        written.extras.append(glb.with_suffix(GAUSSIANS_SUFFIX))
    return written


def write_results(
    meshes: list[Mesh],
    gaussians: list[Gaussians],
    glbs: list[Path],
    settings: OutputSettings,
    before_variant: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    finish: Callable[[list[WrittenVariant]], None] | None = None,
) -> list[WrittenVariant]:
    """Each variant in turn, all moved into place once every one is written.

    ``before_variant(index, count)`` reports progress; ``cancelled()`` is asked between variants
    and between export phases. ``finish(variants)`` runs on the staged variants before they move:
    files it writes beside a GLB and adds to its ``extras`` (a pose) appear with the others. The
    GLB paths must share one folder.
    """
    if not glbs:
        return []
    folder = _common_folder(glbs)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    try:
        staged = []
        for index, (mesh, glb) in enumerate(zip(meshes, glbs, strict=True)):
            if cancelled is not None and cancelled():
                raise Cancelled(f"cancelled before exporting variant {index + 1} of {len(meshes)}")
            if before_variant is not None:
                before_variant(index, len(meshes))
            variant_gaussians = gaussians[index] if gaussians else None
            staged.append(write_variant(mesh, variant_gaussians, staging / glb.name, settings, cancelled))
        if finish is not None:
            finish(staged)
        return [_move_into(variant, folder) for variant in staged]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _common_folder(paths: list[Path]) -> Path:
    folders = {path.parent for path in paths}
    if len(folders) != 1:
        raise ValueError(f"the outputs of one run go into one folder, got {sorted(map(str, folders))}")
    return folders.pop()


def _move_into(variant: WrittenVariant, folder: Path) -> WrittenVariant:
    moved = [folder / path.name for path in variant.files]
    for source, destination in zip(variant.files, moved, strict=True):
        os.replace(source, destination)
    return WrittenVariant(moved[0], variant.report, moved[1:], variant.notes)

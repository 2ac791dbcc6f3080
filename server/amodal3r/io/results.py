"""Writing a run's results: per variant a GLB, and on request the Gaussians and a preview.

Shared by the command line and the server's worker, so both write the same files the same way.
Every file appears whole or not at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from amodal3r.api.files import write_via_temp
from amodal3r.representations.gaussians import Gaussians
from amodal3r.representations.mesh import Mesh

from .export import ExportReport, export_glb, preview_png

GAUSSIANS_SUFFIX, PREVIEW_SUFFIX = ".ply", ".png"


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

    @property
    def files(self) -> list[Path]:
        return [self.glb, *self.extras]


def write_variant(mesh: Mesh, gaussians: Gaussians | None, glb: Path, settings: OutputSettings) -> WrittenVariant:
    """The GLB at ``glb``; the .ply and .png beside it, with the same stem."""
    report = export_glb(mesh, glb, texture_size=settings.texture_size, target_faces=settings.faces)
    written = WrittenVariant(glb, report)
    if settings.preview:
        written.extras.append(write_via_temp(glb.with_suffix(PREVIEW_SUFFIX), lambda p: preview_png(mesh, p)))
    if settings.gaussians:
        if gaussians is None:
            raise ValueError("no Gaussians to write: decode the gaussian format too")
        written.extras.append(write_via_temp(glb.with_suffix(GAUSSIANS_SUFFIX), gaussians.save_ply))
    return written


def write_results(
    meshes: list[Mesh],
    gaussians: list[Gaussians],
    glbs: list[Path],
    settings: OutputSettings,
    before_variant: Callable[[int, int], None] | None = None,
) -> list[WrittenVariant]:
    """Each variant in turn; ``before_variant(index, count)`` reports progress (and may cancel)."""
    written = []
    for index, (mesh, glb) in enumerate(zip(meshes, glbs, strict=True)):
        if before_variant is not None:
            before_variant(index, len(meshes))
        written.append(write_variant(mesh, gaussians[index] if gaussians else None, glb, settings))
    return written

# SPDX-License-Identifier: GPL-3.0-or-later
"""Reconstruct objects without the UI: one image, or a folder / CSV of them.

    blender -b --factory-startup --python-exit-code 1 --python amodal3r_blender/batch.py -- \\
        --image photo.png --target-mask visible.png [--occluder-mask front.png] --out chair.glb
    python amodal3r_blender/batch.py -- --image photo.png --mask grey.png --out scene.blend   (bpy module)
    python amodal3r_blender/batch.py -- --batch FOLDER_OR_CSV --out-dir results/
    ... --place [--camera camera.json | --fov DEG]   (also fit each result's pose to the photo)

A folder holds NAME.png with NAME_target.png [+ NAME_occluder.png] or NAME_mask.png; a CSV has the
columns image, target_mask, occluder_mask, mask (paths relative to the CSV) and optionally object:
rows with the same object are its views, reconstructed as one job into OBJECT.glb. Every input is
checked before the server starts (``core/batch_inputs.py``). ``.glb`` outputs need no bpy;
``.blend`` outputs import the mesh into an empty scene; with ``--place`` the mesh is placed as the
photo shows it, seen by a camera named after it with the photo (packed) as background, and a
``.glb`` output gets its ``.pose.json`` beside it. Exit code 0 on success; 2 for bad arguments
or inputs, with one line per problem and no server started; 1 when a reconstruction failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _installed_package_name() -> str | None:
    """``bl_ext.<repo>.<id>`` when this script lies in an installed extension and bpy is there."""
    try:
        import bpy
    except ImportError:
        return None
    for repo in bpy.context.preferences.extensions.repos:
        if repo.directory and Path(repo.directory).resolve() == HERE.parent:
            return f"bl_ext.{repo.module}.{HERE.name}"
    return None


def _import_addon() -> str:
    """Import the add-on this script belongs to and return its package name: the installed extension's
    (its folder is named like the server package, so it is never put on ``sys.path`` itself), else
    the checkout's folder, with the repository put on ``sys.path``."""
    package = _installed_package_name()
    if package is None:
        if str(HERE.parent) not in sys.path:
            sys.path.insert(0, str(HERE.parent))
        package = HERE.name
    importlib.import_module(package)  # its core makes amodal3r.api importable
    return package


# ruff: noqa: E402 - the add-on's imports follow the package naming below, which a script run needs
if not __package__:  # run as a script: name its package, so the imports below work as in the add-on (PEP 366)
    __package__ = _import_addon()

from amodal3r.api.camera import POSE_SUFFIX, Intrinsics
from amodal3r.api.environment import MODEL, SERVER_PYTHON
from amodal3r.api.errors import InputError
from amodal3r.api.protocol import MULTIVIEW_MODES, JobParams, JobStatus

from .core import backend, jobs
from .core.batch_inputs import Collected, Item, csv_items, folder_items, item_problems, single_item

OUTPUT_SUFFIXES = (".glb", ".blend")


# --- arguments and inputs ---------------------------------------------------------------------


def script_argv(argv: list[str]) -> list[str]:
    """The arguments after ``--`` (Blender's own come before it), else all but the script name."""
    return argv[argv.index("--") + 1 :] if "--" in argv else argv[1:]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batch.py", description="Amodal3R reconstruction without the UI")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="the photo of one object")
    source.add_argument(
        "--batch", type=Path, help="a folder of NAME.png + NAME_target.png / NAME_mask.png, or a CSV of views"
    )
    parser.add_argument("--target-mask", type=Path, help="visible part of the object (white)")
    parser.add_argument("--occluder-mask", type=Path, help="what hides the object (white)")
    parser.add_argument("--mask", type=Path, help="one mask: grey (255/188/0) or labels (0/1/2)")
    parser.add_argument("--out", type=Path, help="with --image: the result, .glb or .blend")
    parser.add_argument("--out-dir", type=Path, help="with --batch: the folder for OBJECT.glb results")
    parser.add_argument("--model", help="model folder with pipeline.json (default: AMODAL3R_MODEL or the add-on's)")
    parser.add_argument(
        "--server-python",
        help="Python with the amodal3r server (default: AMODAL3R_SERVER_PYTHON or the one Set up backend made)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="sampler steps of both stages (default: the model's)")
    parser.add_argument("--texture-size", type=int, default=1024)
    parser.add_argument("--faces", type=int, help="decimate to about this many faces")
    parser.add_argument(
        "--multiview", choices=MULTIVIEW_MODES, default=MULTIVIEW_MODES[0], help="how several views are combined"
    )
    parser.add_argument(
        "--place",
        action="store_true",
        help="also fit each result's pose to its first photo: the .blend gets the photo's camera, a .glb OUT.pose.json",
    )
    camera = parser.add_mutually_exclusive_group()
    camera.add_argument(
        "--camera",
        type=Path,
        help="with --place: camera.json, width, height, fx, fy, cx, cy in pixels (OpenCV convention, the full photo)",
    )
    camera.add_argument(
        "--fov",
        type=float,
        help="with --place: horizontal field of view in degrees (default: the photo's EXIF 35 mm focal "
        "length, else 50 mm)",
    )
    return parser


def collect_items(args: argparse.Namespace) -> Collected:
    """The objects to reconstruct and the problems of the arguments naming them (files unchecked)."""
    if args.batch is not None:
        if args.out_dir is None or args.out is not None:
            return Collected([], ["--batch writes into --out-dir (not --out)"])
        if any(v is not None for v in (args.target_mask, args.occluder_mask, args.mask)):
            return Collected([], ["--batch takes its masks from the folder or CSV, not from --target-mask/--mask"])
        if args.batch.is_dir():
            return folder_items(args.batch, args.out_dir)
        if args.batch.suffix.lower() == ".csv" and args.batch.is_file():
            return csv_items(args.batch, args.out_dir)
        return Collected([], [f"--batch {args.batch}: expected a folder or a .csv file"])
    if args.out is None or args.out.suffix.lower() not in OUTPUT_SUFFIXES:
        return Collected([], ["--image needs --out ending in .glb or .blend"])
    return Collected([single_item(args.image, args.target_mask, args.occluder_mask, args.mask, args.out)], [])


def input_problems(args: argparse.Namespace) -> tuple[list[Item], list[str], backend.BackendSettings | None]:
    """Every input checked before any server starts: the items, one line per problem, the server settings."""
    collected = collect_items(args)
    problems = list(collected.problems)
    for item in collected.items:
        problems += item_problems(item)
    settings = None
    try:
        settings = backend_settings(args)
    except InputError as error:
        problems.append(str(error))
    try:
        job_params(args, "")
    except InputError as error:
        problems.append(str(error))
    return collected.items, problems, settings


# --- the server ------------------------------------------------------------------------------


def _defaults() -> tuple[str | None, str | None]:
    """The server Python and model folder the add-on would use, where they can be found."""
    if __package__.startswith("bl_ext."):  # the installed extension: what its preferences default to
        from .ui.preferences import default_model_dir, default_python

        python, model = default_python(), default_model_dir()
        return (python if Path(python).is_file() else None), model
    checkout = HERE.parent / ".venv" / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    return (str(checkout) if checkout.is_file() else None), None


def backend_settings(args: argparse.Namespace) -> backend.BackendSettings:
    """The local server's settings (its data folder is set per run); checked, so it can start."""
    default_python, default_model = _defaults()
    python = args.server_python or os.environ.get(SERVER_PYTHON) or default_python
    model = args.model or os.environ.get(MODEL) or default_model
    if not python:
        raise InputError(
            f"no server Python: pass --server-python, set {SERVER_PYTHON}, or run Set up "
            "backend in the add-on preferences"
        )
    if not model or not (Path(model) / "pipeline.json").is_file():
        raise InputError(
            f"no model folder with pipeline.json ({model or 'none given'}): pass --model or set "
            f"{MODEL}, or use Download models in the add-on preferences"
        )
    return backend.BackendSettings(mode=backend.LOCAL, python=python, model_dir=model, device=args.device)


def job_params(args: argparse.Namespace, name: str) -> JobParams:
    """The run settings; out-of-range values and a bad camera.json raise InputError."""
    if (args.camera is not None or args.fov is not None) and not args.place:
        raise InputError("--camera and --fov say how to fit the pose: they go with --place")
    camera = Intrinsics.from_json(args.camera).to_dict() if args.camera is not None else None
    return JobParams(
        seed=args.seed,
        multiview=args.multiview,
        structure_steps=args.steps,
        slat_steps=args.steps,
        texture_size=args.texture_size,
        faces=args.faces,
        preview=False,
        name=name[:200],
        place=args.place,
        camera=camera,
        fov=args.fov,
    ).validate()


# --- running -----------------------------------------------------------------------------------


def _step(status: JobStatus) -> tuple[str, str, int]:
    return status.state, status.stage, status.step


class Progress:
    """Prints a job's progress, a line per step, and keeps its last status (for the notices)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.last: JobStatus | None = None

    def __call__(self, status: JobStatus) -> None:
        if self.last is None:  # the server's reply to the upload: how many views it took
            print(f"{self.prefix} submitted with {len(status.views)} view(s)", flush=True)
        if self.last is None or _step(status) != _step(self.last):
            steps = f" {status.step}/{status.total}" if status.total and not status.final else ""
            print(f"{self.prefix} {status.stage or status.state}{steps} ({status.progress:.0%})", flush=True)
        self.last = status


def save_blend(glb: Path, out: Path, name: str, photo: Path | None) -> list[str]:
    """An empty scene with the result imported (and, given the photo, placed as it shows it), saved
    as out (a .blend); returns what placing had to say."""
    import bpy

    from .operators.placement import Viewpoint, place_variants
    from .operators.scene_import import import_result
    from .ui import placement as placement_properties

    bpy.ops.wm.read_factory_settings(use_empty=True)
    obj = import_result(bpy.context, glb, name)
    lines: list[str] = []
    # The add-on is imported here, not enabled: its placement properties are registered for this save
    # only. Left registered, they hang the exit of the bpy 4.5 module (its file-closing thread waits forever).
    borrowed = photo is not None and not hasattr(bpy.types.Object, "amodal3r_placement")
    if borrowed:
        placement_properties.register()
    try:
        if photo is not None:
            image = bpy.data.images.load(str(photo.resolve()))
            image.pack()  # the .blend keeps its camera's background wherever it goes
            viewpoint = Viewpoint(photo=image.name, camera_name=f"{name} camera")
            report = place_variants(bpy.context, [(obj, glb)], viewpoint)
            lines = report.notices + report.errors
        out.parent.mkdir(parents=True, exist_ok=True)
        bpy.ops.wm.save_as_mainfile(filepath=str(out.resolve()), check_existing=False)
    finally:
        if borrowed:
            placement_properties.unregister()
    return lines


def deliver(result: Path, item: Item, place: bool) -> list[str]:
    """The result where the item asked for it; returns notices for the person."""
    if item.out.suffix.lower() == ".blend":
        return save_blend(result, item.out, item.name, item.views[0].image if place else None)
    item.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result, item.out)
    pose = result.with_suffix(POSE_SUFFIX)
    if not place:
        return []
    if not pose.is_file():
        return [f"no pose came back for {item.name}"]
    shutil.copyfile(pose, item.out.with_suffix(POSE_SUFFIX))
    return []


def run_items(items: list[Item], args: argparse.Namespace, settings: backend.BackendSettings, work_dir: Path) -> int:
    """Reconstruct each item; failures are reported and the rest still run. Returns the failure count."""
    server = backend.Backend(dataclasses.replace(settings, data_dir=str(work_dir / "server")))
    failures = 0
    try:
        for index, item in enumerate(items, start=1):
            prefix = f"[{index}/{len(items)}] {item.name}:"
            try:
                progress = Progress(prefix)
                paths = jobs.run_blocking(
                    server,
                    [view.files() for view in item.views],
                    job_params(args, item.name),
                    work_dir / f"job{index}",
                    progress,
                )
                glbs = jobs.glb_paths(paths)
                if not glbs:
                    raise jobs.JobError("the server gave no .glb result")
                said = deliver(glbs[0], item, args.place)
                print(f"{prefix} wrote {item.out}", flush=True)
                for notice in [*jobs.notices_of(progress.last), *said]:
                    print(f"{prefix} {notice}", flush=True)
            except backend.BackendError as error:  # no server: the other items would fail alike
                print(f"{prefix} FAILED: {error}", file=sys.stderr, flush=True)
                return failures + len(items) - index + 1
            except (jobs.JobError, OSError, RuntimeError) as error:
                failures += 1
                print(f"{prefix} FAILED: {error}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    return failures


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    items, problems, settings = input_problems(args)
    if problems or settings is None:
        for problem in problems:
            print(f"batch.py: error: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="amodal3r-batch-") as tmp:
        failures = run_items(items, args, settings, Path(tmp))
    if failures:
        print(f"batch.py: {failures} of {len(items)} reconstruction(s) failed", file=sys.stderr)
        return 1
    print(f"batch.py: {len(items)} result(s) written", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(script_argv(sys.argv)))

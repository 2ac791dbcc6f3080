#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-3.0-or-later
"""Build the Blender extension zip: ``python scripts/build_extension.py [--out dist] [--bpy-python PATH]``.

The zip holds ``amodal3r_blender/`` (its ``core``, ``operators`` and ``ui`` packages) as the extension
root, ``blender_manifest.toml`` and the server package as a pure-Python wheel (Blender puts it on
``sys.path``; the add-on imports its ``amodal3r.api``).
The wheel is written here with the standard library, so the build needs no setuptools, pip or
network. Blender's own ``blender_ext.py`` (from an installed ``bpy`` wheel: 4.2, 4.5 or 5.0) builds and
validates the zip, with that release's official tag list; ``--bpy-python`` picks the environment
(default: this interpreter if it has bpy, else the newest ``.venv-blender-X.Y``).
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVER = REPO / "server"
ADDON = REPO / "amodal3r_blender"
MANIFEST = REPO / "blender_manifest.toml"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same sources give the same wheel
# Each bpy wheel keeps Blender's scripts in a folder named after its release: bpy/4.2/, bpy/4.5/, bpy/5.0/.
CLI_IN_RELEASE = Path("scripts/addons_core/bl_pkg/cli/blender_ext.py")
TAGS_IN_RELEASE = Path("scripts/modules/_bpy_internal/extensions/tags.py")
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".*")


class BuildError(RuntimeError):
    """A build step failed; the message says what to fix."""


# --- the server wheel -------------------------------------------------------------------------


def _project() -> dict:
    return tomllib.loads((SERVER / "pyproject.toml").read_text())["project"]


def _requirement(spec: str, extra: str | None) -> str:
    """A ``Requires-Dist`` value, with the extra's marker joined to any marker the spec has."""
    if extra is None:
        return spec
    name, sep, marker = spec.partition(";")
    if sep:
        return f'{name.strip()}; ({marker.strip()}) and extra == "{extra}"'
    return f'{spec}; extra == "{extra}"'


def wheel_metadata(project: dict) -> str:
    """The ``METADATA`` file (core metadata 2.1) from ``[project]``."""
    lines = ["Metadata-Version: 2.1", f"Name: {project['name']}", f"Version: {project['version']}"]
    if "description" in project:
        lines.append(f"Summary: {project['description']}")
    if "requires-python" in project:
        lines.append(f"Requires-Python: {project['requires-python']}")
    if isinstance(project.get("license"), str):
        lines.append(f"License: {project['license']}")
    lines += [f"Requires-Dist: {_requirement(spec, None)}" for spec in project.get("dependencies", [])]
    for extra, specs in project.get("optional-dependencies", {}).items():
        lines.append(f"Provides-Extra: {extra}")
        lines += [f"Requires-Dist: {_requirement(spec, extra)}" for spec in specs]
    readme = SERVER / project["readme"] if isinstance(project.get("readme"), str) else None
    if readme is not None and readme.is_file():
        lines.append("Description-Content-Type: text/markdown")
        return "\n".join(lines) + "\n\n" + readme.read_text()
    return "\n".join(lines) + "\n"


def _entry_points(project: dict) -> str | None:
    scripts = project.get("scripts", {})
    if not scripts:
        return None
    return "[console_scripts]\n" + "".join(f"{name} = {target}\n" for name, target in scripts.items())


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _package_files(package: Path) -> list[Path]:
    """The package's files as setuptools would ship them: no caches, no compiled files."""
    return sorted(
        p
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    )


def build_wheel(out_dir: Path) -> Path:
    """Write ``amodal3r-<version>-py3-none-any.whl`` (the server package, pure Python) into out_dir."""
    project = _project()
    name, version = project["name"], project["version"]
    dist_info = f"{name}-{version}.dist-info"
    files: list[tuple[str, bytes]] = [
        (path.relative_to(SERVER).as_posix(), path.read_bytes()) for path in _package_files(SERVER / name)
    ]
    files.append((f"{dist_info}/METADATA", wheel_metadata(project).encode()))
    wheel_info = "Wheel-Version: 1.0\nGenerator: amodal3r build_extension\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files.append((f"{dist_info}/WHEEL", wheel_info.encode()))
    if (entry_points := _entry_points(project)) is not None:
        files.append((f"{dist_info}/entry_points.txt", entry_points.encode()))
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for arcname, data in files:
        writer.writerow([arcname, _record_hash(data), len(data)])
    writer.writerow([f"{dist_info}/RECORD", "", ""])
    files.append((f"{dist_info}/RECORD", record.getvalue().encode()))
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for arcname, data in files:
            info = zipfile.ZipInfo(arcname, ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return wheel


# --- staging and checks -----------------------------------------------------------------------


def stage(stage_dir: Path) -> Path:
    """Copy the add-on and the manifest into stage_dir and build the wheel into its wheels/."""
    shutil.copytree(ADDON, stage_dir, ignore=SKIP, dirs_exist_ok=True)
    shutil.copy2(MANIFEST, stage_dir / MANIFEST.name)
    return build_wheel(stage_dir / "wheels")


def check_packages(stage_dir: Path) -> None:
    """Every folder of the add-on with Python files is a package (``core``, ``operators``, ``ui``):
    without ``__init__.py`` its relative imports would depend on namespace-package lookup."""
    folders = {path.parent for path in stage_dir.rglob("*.py") if "wheels" not in path.relative_to(stage_dir).parts}
    missing = sorted(str(f.relative_to(stage_dir)) for f in folders if not (f / "__init__.py").is_file())
    if missing:
        raise BuildError(f"amodal3r_blender folders without __init__.py: {', '.join(missing)}: add one to each")


def check_manifest(manifest: dict, wheel: Path) -> None:
    """The manifest must name exactly the wheel just built, and share its version."""
    server_version = _project()["version"]
    if manifest.get("version") != server_version:
        raise BuildError(
            f"{MANIFEST.name} has version {manifest.get('version')!r} but the server package is "
            f"{server_version!r}: make them equal (server/pyproject.toml, "
            "server/amodal3r/__init__.py, blender_manifest.toml)"
        )
    wanted = [f"./wheels/{wheel.name}"]
    if manifest.get("wheels") != wanted:
        raise BuildError(
            f"{MANIFEST.name}: wheels = {manifest.get('wheels')!r}, but the build made {wanted!r}: "
            "update the wheels list"
        )


# --- Blender's tooling ------------------------------------------------------------------------


def _bpy_dir_of(python: Path) -> Path | None:
    """The ``bpy`` package folder of an interpreter, found without importing bpy (that is slow)."""
    probe = "import importlib.util as u; s = u.find_spec('bpy'); print(s.submodule_search_locations[0] if s else '')"
    try:
        found = subprocess.run([str(python), "-c", probe], check=False, capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    text = found.stdout.strip()
    return Path(text) if found.returncode == 0 and text else None


@dataclass(frozen=True)
class BlenderTools:
    """Blender's extension tools from one bpy wheel, and the Python that runs them (that wheel's)."""

    python: Path
    cli: Path
    tags: Path


def _release_dir(bpy_dir: Path) -> Path | None:
    """The wheel's ``bpy/<X.Y>/`` folder that holds the extension tools (one per wheel)."""
    releases = [d for d in bpy_dir.iterdir() if d.is_dir() and re.fullmatch(r"\d+\.\d+", d.name)]
    return next((d for d in sorted(releases) if (d / CLI_IN_RELEASE).is_file()), None)


def _default_pythons() -> list[Path]:
    """This interpreter, then each bootstrapped ``.venv-blender-X.Y``, newest Blender first."""
    venvs = sorted(REPO.glob(".venv-blender-*/bin/python"), key=lambda p: _version_key(p.parent.parent.name))
    return [Path(sys.executable), *reversed(venvs)]


def _version_key(venv_name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", venv_name))


def find_tools(bpy_python: Path | None) -> BlenderTools:
    """Blender's extension tools: from --bpy-python, else this interpreter or a .venv-blender-X.Y."""
    candidates = [bpy_python] if bpy_python is not None else _default_pythons()
    for python in candidates:
        bpy_dir = _bpy_dir_of(python)
        release = _release_dir(bpy_dir) if bpy_dir is not None and bpy_dir.is_dir() else None
        if release is not None:
            return BlenderTools(python, release / CLI_IN_RELEASE, release / TAGS_IN_RELEASE)
    tried = ", ".join(str(p) for p in candidates)
    raise BuildError(
        f"no bpy package with Blender's extension tools found (tried {tried}): run scripts/bootstrap "
        "(it makes .venv-blender-X.Y for each Blender version) or pass --bpy-python PATH"
    )


def _run_blender_ext(tools: BlenderTools, args: list[str]) -> None:
    command = [str(tools.python), str(tools.cli), *args]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"blender_ext.py {args[0]} failed:\n{result.stdout}{result.stderr}".rstrip())


def build(out_dir: Path, bpy_python: Path | None) -> Path:
    """Build and validate the extension zip in out_dir; returns its path."""
    tools = find_tools(bpy_python)
    manifest = tomllib.loads(MANIFEST.read_text())
    with tempfile.TemporaryDirectory(prefix="amodal3r-ext-") as tmp:
        stage_dir = Path(tmp) / manifest["id"]
        wheel = stage(stage_dir)
        check_packages(stage_dir)
        check_manifest(manifest, wheel)
        out_dir.mkdir(parents=True, exist_ok=True)
        zip_path = out_dir / f"{manifest['id']}-{manifest['version']}.zip"
        zip_path.unlink(missing_ok=True)
        _run_blender_ext(
            tools,
            [
                "build",
                "--source-dir",
                str(stage_dir),
                "--output-filepath",
                str(zip_path),
                f"--valid-tags={tools.tags}",
            ],
        )
    _run_blender_ext(tools, ["validate", str(zip_path)])
    return zip_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="output folder (default: %(default)s)")
    parser.add_argument("--bpy-python", type=Path, help="a Python with bpy installed, for Blender's extension tools")
    args = parser.parse_args(argv)
    try:
        zip_path = build(args.out.resolve(), args.bpy_python)
    except BuildError as error:
        print(f"build_extension: error: {error}", file=sys.stderr)
        return 1
    print(zip_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

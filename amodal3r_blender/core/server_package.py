# SPDX-License-Identifier: GPL-3.0-or-later
"""Where the ``amodal3r`` server package comes from: the wheel the extension bundles, or a checkout.

Blender installs the bundled wheel onto ``sys.path``, so ``import amodal3r.api`` just works in the
built extension. Running from a source checkout (tests, batch.py, a dev repository pointing at the
repo), the package is ``<repo>/server/amodal3r``. Where Blender has not installed the wheel (a
``--factory-startup`` run of batch.py from the installed extension), the wheel itself goes on
``sys.path``: it is pure Python, so it imports as a zip.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ADDON_DIR = Path(__file__).resolve().parent.parent
WHEEL_PATTERN = "amodal3r-*-py3-none-any.whl"
PROBE = "amodal3r.api.client"  # the deepest module the add-on needs: importable means all of api is


def server_source_dir() -> Path | None:
    """``<repo>/server`` when this add-on runs from a source checkout, else None."""
    candidate = ADDON_DIR.parent / "server"
    return candidate if (candidate / "amodal3r" / "api" / "client.py").is_file() else None


def server_wheel() -> Path | None:
    """The server wheel bundled in the installed extension (``wheels/``), newest first, else None."""
    wheels = sorted((ADDON_DIR / "wheels").glob(WHEEL_PATTERN))
    return wheels[-1] if wheels else None


def server_install_source() -> Path | None:
    """What Set up backend installs: the bundled wheel, or the checkout's server folder."""
    return server_wheel() or server_source_dir()


def make_api_importable() -> None:
    """Make ``import amodal3r.api`` work: as installed, else from the checkout, else from the wheel file."""
    try:
        importlib.import_module(PROBE)
        return
    except ImportError:
        source = server_source_dir() or server_wheel()
    if source is None:
        raise ImportError(
            "the amodal3r server package is missing: reinstall the Amodal3R extension (its wheels/ folder holds it)"
        ) from None
    if str(source) not in sys.path:
        sys.path.insert(0, str(source))
    for name in [name for name in sys.modules if name == "amodal3r" or name.startswith("amodal3r.")]:
        del sys.modules[name]  # a failed import may have left half-made entries
    importlib.import_module(PROBE)

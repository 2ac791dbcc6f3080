# SPDX-License-Identifier: GPL-3.0-or-later
"""Where the ``amodal3r`` server package comes from: the wheel the extension bundles, or a checkout.

Blender installs the bundled wheel onto ``sys.path``, so ``import amodal3r.api.client`` just works in
the built extension. Running from a source checkout (tests, batch.py, a dev repository pointing at
the repo), the package is ``<repo>/server/amodal3r``; ``ensure_client_importable`` adds that folder.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WHEEL_PATTERN = "amodal3r-*-py3-none-any.whl"


def server_source_dir() -> Path | None:
    """``<repo>/server`` when this add-on runs from a source checkout, else None."""
    candidate = HERE.parent / "server"
    return candidate if (candidate / "amodal3r" / "client.py").is_file() else None


def server_wheel() -> Path | None:
    """The server wheel bundled in the installed extension (``wheels/``), newest first, else None."""
    wheels = sorted((HERE / "wheels").glob(WHEEL_PATTERN))
    return wheels[-1] if wheels else None


def server_install_source() -> Path | None:
    """What Set up backend installs: the bundled wheel, or the checkout's server folder."""
    return server_wheel() or server_source_dir()


def ensure_client_importable() -> None:
    """Make ``import amodal3r.api.client`` work, falling back to the checkout's server folder."""
    try:
        importlib.import_module("amodal3r.api.client")
        return
    except ImportError:
        source = server_source_dir()
        if source is None:
            raise ImportError("the amodal3r server package is missing: reinstall the Amodal3R extension "
                              "(its wheels/ folder holds it)") from None
    if str(source) not in sys.path:
        sys.path.insert(0, str(source))
    sys.modules.pop("amodal3r", None)  # a failed import may have left a half-made entry
    importlib.import_module("amodal3r.api.client")

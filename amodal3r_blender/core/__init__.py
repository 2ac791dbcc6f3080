# SPDX-License-Identifier: GPL-3.0-or-later
"""The add-on's logic without bpy: the server (backend, its set-up, jobs), background tasks, masks, PNGs.

Importing this package first makes the server's ``amodal3r.api`` importable, once for the whole
add-on: the top-level package imports it before anything else, so every module may then write
``from amodal3r.api.protocol import ...`` like any other import.
"""

from .server_package import make_api_importable

make_api_importable()

# SPDX-License-Identifier: GPL-3.0-or-later
"""What the person runs: Blender operators (bpy) over ``core``, and the import of results into the scene."""

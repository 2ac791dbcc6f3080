# SPDX-License-Identifier: GPL-3.0-or-later
"""What the person sees: the scene's settings, the add-on preferences, the sidebar panels and menus."""

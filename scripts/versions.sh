# Sourced by scripts/bootstrap and scripts/test: the Blender releases the add-on is tested on,
# the two LTS lines studios live on and the current release (bpy wheels from PyPI, Python 3.11).
BLENDER_VERSIONS=${BLENDER_VERSIONS:-"4.2.23 4.5.15 5.0.1"}
blender_venv() { echo ".venv-blender-${1%.*}"; }  # 5.0.1 -> .venv-blender-5.0

"""What the server and its clients agree on: the HTTP protocol, the mask formats, the errors.

Standard library and numpy only, and nothing else of this package: Blender's Python imports it
from the wheel the extension bundles.
"""

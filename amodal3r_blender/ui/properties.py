# SPDX-License-Identifier: GPL-3.0-or-later
"""``scene.amodal3r``: what to reconstruct (source, views, masks), how (settings), and the job's state.

View 0 is the main view: its image is the source image, kept in step by ``source_image``'s update
callback. Extra views (other photos of the same object) have their own images and masks. Each
sampler setting and the face count has a ``use_*`` switch: off, the model's own value (its
``pipeline.json``) applies; editing the value turns its switch on.
"""

from __future__ import annotations

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

from amodal3r.api.protocol import MAX_VIEWS, MULTIVIEW_MODES, SAM_KINDS, JobParams, setting_range

SOURCE_KINDS = [
    ("IMAGE", "Image", "An image already in Blender (open or paste it in the Image Editor)"),
    ("FILE", "File", "A photo on disk, loaded into Blender when chosen"),
    ("CAMERA", "Camera", "A render of the scene from the active camera"),
]
LAYERS = [
    ("TARGET", "Target", "The visible part of the object to reconstruct"),
    ("OCCLUDER", "Occluder", "What is in front of the object and hides part of it"),
]
MULTIVIEW_DESCRIPTIONS = {
    "stochastic": "Each sampling step listens to one view, chosen in turn (faster)",
    "multidiffusion": "Each sampling step averages all views (smoother, slower)",
}
SAM_DESCRIPTIONS = {
    "vit_h": "Largest segmentation model: best masks, slowest",
    "vit_l": "Medium segmentation model",
    "vit_b": "Smallest segmentation model: fastest",
}
MULTIVIEW_ITEMS = [(mode, mode.capitalize(), MULTIVIEW_DESCRIPTIONS.get(mode, "")) for mode in MULTIVIEW_MODES]
SAM_ITEMS = [(kind, kind.replace("_", "-").upper(), SAM_DESCRIPTIONS.get(kind, "")) for kind in SAM_KINDS]
TEXTURE_SIZES = [(str(size), f"{size} px", f"Bake a {size}x{size} texture") for size in (256, 512, 1024, 2048, 4096)]


class AMODAL3R_PG_view(bpy.types.PropertyGroup):
    """One photo of the object with its two mask layers."""

    image: PointerProperty(
        type=bpy.types.Image,
        name="Image",  # type: ignore[valid-type]
        description="The photo of this view",
    )
    target_mask: PointerProperty(
        type=bpy.types.Image,
        name="Target Mask",  # type: ignore[valid-type]
        description="White where the object is visible",
    )
    occluder_mask: PointerProperty(
        type=bpy.types.Image,
        name="Occluder Mask",  # type: ignore[valid-type]
        description="White where something in front hides the object",
    )


def _bounds(setting: str) -> dict:
    """A control's min and max: those of the job setting, so the panel offers what the server takes."""
    low, high = setting_range(JobParams, setting)
    return {"min": low, "max": high}


def _switch_on(switch: str):
    """An update callback that turns ``switch`` on: whoever edits a value means to use it."""

    def update(settings: AMODAL3R_PG_settings, context: bpy.types.Context) -> None:
        if not getattr(settings, switch):
            setattr(settings, switch, True)

    return update


def _source_changed(settings: AMODAL3R_PG_settings, context: bpy.types.Context) -> None:
    main_view(settings).image = settings.source_image


def _file_changed(settings: AMODAL3R_PG_settings, context: bpy.types.Context) -> None:
    """Load the chosen photo (once: an image already loaded from that file is reused)."""
    if not settings.source_filepath:
        return
    try:
        image = bpy.data.images.load(bpy.path.abspath(settings.source_filepath), check_existing=True)
    except RuntimeError as error:
        settings.last_error = f"Cannot open {settings.source_filepath}: {error}. Choose an image file Blender reads"
        return
    settings.last_error = ""
    settings.source_image = image


class AMODAL3R_PG_settings(bpy.types.PropertyGroup):
    # --- what to reconstruct
    source_kind: EnumProperty(name="Source", items=SOURCE_KINDS, default="IMAGE")  # type: ignore[valid-type]
    source_image: PointerProperty(  # type: ignore[valid-type]
        type=bpy.types.Image,
        name="Image",
        update=_source_changed,
        description="The photo showing the partly hidden object",
    )
    source_filepath: StringProperty(  # type: ignore[valid-type]
        name="File", subtype="FILE_PATH", update=_file_changed, description="A photo on disk"
    )
    views: CollectionProperty(type=AMODAL3R_PG_view)  # type: ignore[valid-type]
    active_view_index: IntProperty(name="View", min=0, max=MAX_VIEWS - 1)  # type: ignore[valid-type]
    segment_layer: EnumProperty(
        name="Layer",
        items=LAYERS,
        default="TARGET",  # type: ignore[valid-type]
        description="The mask layer click-to-mask and painting work on",
    )

    # --- how
    seed: IntProperty(
        name="Seed",
        **_bounds("seed"),
        default=0,  # type: ignore[valid-type]
        description="Random seed: another seed gives another plausible shape",
    )
    use_structure_steps: BoolProperty(  # type: ignore[valid-type]
        name="Custom Structure Steps",
        default=False,
        description="Set the sampling steps of the coarse shape (off: the model's own)",
    )
    structure_steps: IntProperty(  # type: ignore[valid-type]
        name="Structure Steps",
        **_bounds("structure_steps"),
        default=25,
        update=_switch_on("use_structure_steps"),
        description="Sampling steps of the coarse shape",
    )
    use_structure_guidance: BoolProperty(  # type: ignore[valid-type]
        name="Custom Structure Guidance",
        default=False,
        description="Set how strongly the shape follows the image (off: the model's own)",
    )
    structure_guidance: FloatProperty(  # type: ignore[valid-type]
        name="Structure Guidance",
        **_bounds("structure_cfg"),
        default=7.5,
        update=_switch_on("use_structure_guidance"),
        description="How strongly the shape follows the image",
    )
    use_slat_steps: BoolProperty(  # type: ignore[valid-type]
        name="Custom Detail Steps",
        default=False,
        description="Set the sampling steps of the detail and texture (off: the model's own)",
    )
    slat_steps: IntProperty(  # type: ignore[valid-type]
        name="Detail Steps",
        **_bounds("slat_steps"),
        default=25,
        update=_switch_on("use_slat_steps"),
        description="Sampling steps of the detail and texture",
    )
    use_slat_guidance: BoolProperty(  # type: ignore[valid-type]
        name="Custom Detail Guidance",
        default=False,
        description="Set how strongly details follow the image (off: the model's own)",
    )
    slat_guidance: FloatProperty(  # type: ignore[valid-type]
        name="Detail Guidance",
        **_bounds("slat_cfg"),
        default=3.0,
        update=_switch_on("use_slat_guidance"),
        description="How strongly details follow the image",
    )
    variants: IntProperty(
        name="Variants",
        **_bounds("variants"),
        default=1,  # type: ignore[valid-type]
        description="How many different reconstructions to make (each becomes an object)",
    )
    multiview_mode: EnumProperty(  # type: ignore[valid-type]
        name="Multi-view",
        default=MULTIVIEW_MODES[0],
        items=MULTIVIEW_ITEMS,
        description="How several views steer the sampling",
    )
    texture_size: EnumProperty(name="Texture Size", items=TEXTURE_SIZES, default="1024")  # type: ignore[valid-type]
    use_faces: BoolProperty(  # type: ignore[valid-type]
        name="Simplify",
        default=False,
        description="Simplify the mesh to about a given number of faces (off: keep every face)",
    )
    faces: IntProperty(  # type: ignore[valid-type]
        name="Faces",
        **_bounds("faces"),
        default=50_000,
        update=_switch_on("use_faces"),
        description="Simplify the mesh to about this many faces",
    )
    gaussians: BoolProperty(
        name="Export Gaussians",
        default=False,  # type: ignore[valid-type]
        description="Also download the 3D Gaussians as a PLY file",
    )
    match_photo: BoolProperty(  # type: ignore[valid-type]
        name="Match Photo",
        default=True,
        description="Place each result so that it lines up with the photo (a camera render: seen "
        "through that camera; a photo: through a camera made for it, with the photo as background)",
    )
    sam_model: EnumProperty(  # type: ignore[valid-type]
        name="Segmentation Model", default=SAM_KINDS[0], items=SAM_ITEMS
    )

    # --- the job, written by operators.reconstruct's timer and drawn by the panel
    running: BoolProperty(name="Running", default=False)  # type: ignore[valid-type]
    stage: StringProperty(name="Stage")  # type: ignore[valid-type]
    step: IntProperty(name="Step", min=0)  # type: ignore[valid-type]
    total: IntProperty(name="Total", min=0)  # type: ignore[valid-type]
    progress: FloatProperty(name="Progress", min=0.0, max=1.0, subtype="FACTOR")  # type: ignore[valid-type]
    message: StringProperty(name="Message")  # type: ignore[valid-type]
    last_error: StringProperty(name="Error")  # type: ignore[valid-type]
    notices: StringProperty(name="Notices")  # type: ignore[valid-type]  # the last result's, one a line
    server_dead: BoolProperty(name="Server Stopped", default=False)  # type: ignore[valid-type]


def main_view(settings: AMODAL3R_PG_settings) -> AMODAL3R_PG_view:
    """View 0, made when missing."""
    if not settings.views:
        settings.views.add()
    return settings.views[0]


def active_view(settings: AMODAL3R_PG_settings) -> AMODAL3R_PG_view:
    """The view the mask tools work on (the main one when the index is stale)."""
    main = main_view(settings)
    index = settings.active_view_index
    return settings.views[index] if index < len(settings.views) else main


def get_settings(context: bpy.types.Context) -> AMODAL3R_PG_settings:
    return context.scene.amodal3r


classes = (AMODAL3R_PG_view, AMODAL3R_PG_settings)
_register, _unregister = bpy.utils.register_classes_factory(classes)


def register() -> None:
    _register()
    bpy.types.Scene.amodal3r = PointerProperty(type=AMODAL3R_PG_settings)


def unregister() -> None:
    del bpy.types.Scene.amodal3r
    _unregister()

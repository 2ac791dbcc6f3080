"""The model folder, laid out like Hugging Face ``Sm0kyWu/Amodal3R``: every file name, once.

::

    MODEL_DIR/
      pipeline.json                          {"args": {"models": {KEY: "Amodal3R_ckpts/STEM"}, ...}}
      Amodal3R_ckpts/STEM.json               {"name": CLASS, "args": {...}}
      Amodal3R_ckpts/STEM.safetensors
      dinov2_vitl14_reg4_pretrain.pth        (or .safetensors, or in torch.hub's checkpoint cache)
      image_encoder.json                     optional architecture override (tiny test models)
      sam/sam_vit_{h,l,b}_HASH.pth           Segment Anything, for click-to-mask
"""

from __future__ import annotations

import json
from pathlib import Path

from amodal3r.api.protocol import RANDOM_WEIGHTS_NOTICE_START

HF_REPO = "Sm0kyWu/Amodal3R"
PIPELINE_FILE = "pipeline.json"
CHECKPOINT_FOLDER = "Amodal3R_ckpts"
CHECKPOINT_SUFFIXES = (".json", ".safetensors")
HUB_PATTERNS = [PIPELINE_FILE] + [f"{CHECKPOINT_FOLDER}/*{suffix}" for suffix in CHECKPOINT_SUFFIXES]

# pipeline.json's model keys: the three every run needs, and one decoder per output format.
REQUIRED_MODELS = ("sparse_structure_flow_model", "sparse_structure_decoder", "slat_flow_model")
DECODER_MODELS = {"mesh": "slat_decoder_mesh", "gaussian": "slat_decoder_gs"}
# The image encoder's key among the pipeline's models (pipeline.json names it ``image_cond_model``).
IMAGE_ENCODER = "image_cond_model"
# The checkpoints of the official pipeline.json, expected until that file is here to say.
OFFICIAL_MODELS = {
    key: f"{CHECKPOINT_FOLDER}/{stem}"
    for key, stem in (
        ("sparse_structure_flow_model", "ss_flow_img_dit_L_16l8_fp16"),
        ("sparse_structure_decoder", "ss_dec_conv3d_16l8_fp16"),
        ("slat_flow_model", "slat_flow_img_dit_L_64l8p2_fp16"),
        ("slat_decoder_mesh", "slat_dec_mesh_swin8_B_64l8m256c_fp16"),
        ("slat_decoder_gs", "slat_dec_gs_swin8_B_64l8gs32_fp16"),
    )
}

# DINOv2 is not in the Amodal3R repository: the reference fetches it through torch.hub.
DOWNLOAD_BASE = "https://dl.fbaipublicfiles.com"  # DINOv2 and SAM sources are relative to it
IMAGE_ENCODER_FILES = ("dinov2_vitl14_reg4_pretrain.safetensors", "dinov2_vitl14_reg4_pretrain.pth")
IMAGE_ENCODER_SOURCE = "dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth"
IMAGE_ENCODER_CONFIG = "image_encoder.json"

# pipeline.json's ``args.tiny_random_weights`` marks a folder from ``amodal3r tiny-weights``.
RANDOM_WEIGHTS_NOTICE = (
    f"{RANDOM_WEIGHTS_NOTICE_START} (made by amodal3r tiny-weights): the result is noise, not a "
    f"reconstruction. Get the real weights: Download models in the add-on's preferences, or pass --model {HF_REPO}"
)

SAM_FOLDER = "sam"
SAM_SOURCE_FOLDER = "segment_anything"
SAM_FILES = {"vit_h": "sam_vit_h_4b8939.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_b": "sam_vit_b_01ec64.pth"}


def checkpoint_files(folder: Path, stem: str) -> list[Path]:
    """The two files of one checkpoint named in pipeline.json."""
    return [folder / (stem + suffix) for suffix in CHECKPOINT_SUFFIXES]


def pipeline_models(folder: Path) -> list[str]:
    """Checkpoint stems from pipeline.json; the official ones while it is absent or unreadable."""
    try:
        models = json.loads((folder / PIPELINE_FILE).read_text())["args"]["models"]
        return [str(stem) for stem in models.values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return list(OFFICIAL_MODELS.values())


def image_encoder_places(folder: Path) -> list[Path]:
    """Where the DINOv2 checkpoint is looked for: the model folder, then torch.hub's cache."""
    import torch

    return [folder, Path(torch.hub.get_dir()) / "checkpoints"]


def sam_checkpoints(folder: Path, kind: str) -> list[Path]:
    """The SAM checkpoints of one kind in the model folder, any hash suffix."""
    return sorted((folder / SAM_FOLDER).glob(f"sam_{kind}_*.pth"))

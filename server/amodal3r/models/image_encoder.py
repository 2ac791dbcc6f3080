"""DINOv2 ViT-L/14 with 4 registers as the image encoder, built on timm's VisionTransformer.

Amodal3R encodes the preprocessed 518x518 picture with DINOv2 (``dinov2_vitl14_reg4``) and
feeds the flow models the output of the *last transformer block before the final norm*
(``x_prenorm``), passed through a layer norm without affine parameters (eps 1e-5).  The
token order is: class token, 4 register tokens, 37*37 patch tokens row-major.

Weights come either from the official torch-hub checkpoint (``dinov2_vitl14_reg4_pretrain.pth``,
a plain state dict in the hub layout) or from timm's own safetensors export of the same
model.  :func:`from_hub_state_dict` converts the hub layout to timm's:

* ``mask_token`` (only used for masked-image training) is dropped;
* ``register_tokens`` is renamed ``reg_token``;
* the hub adds ``pos_embed[:, 0]`` to the class token at run time; timm's ``no_embed_class``
  variant has no position row for prefix tokens, so that row is folded into ``cls_token``
  and ``pos_embed`` keeps only the 1369 patch rows.

Everything else (``patch_embed.proj``, ``blocks.{i}.norm1/attn.qkv/attn.proj/ls1.gamma/norm2/
mlp.fc1/mlp.fc2/ls2.gamma``, ``norm``) has the same name in both layouts.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from amodal3r.api.errors import CheckpointError

__all__ = [
    "DinoV2Config",
    "DinoV2Encoder",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TOKEN_NORM_EPS",
    "from_hub_state_dict",
    "to_hub_state_dict",
    "load_hub_checkpoint",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: eps of the non-affine layer norm applied to ``x_prenorm`` (torch's default)
TOKEN_NORM_EPS = 1e-5
#: eps of the LayerNorms inside the DINOv2 blocks
BLOCK_NORM_EPS = 1e-6


@dataclass(frozen=True)
class DinoV2Config:
    """Architecture of a DINOv2 ViT with registers (defaults: ViT-L/14 reg4)."""

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    #: LayerScale init value; only matters for a model that is not loaded from a checkpoint
    init_values: float = 1e-5

    @classmethod
    def vitl14_reg4(cls) -> DinoV2Config:
        """The encoder Amodal3R uses (``dinov2_vitl14_reg4``)."""
        return cls()

    @classmethod
    def tiny(cls) -> DinoV2Config:
        """Tiny test model matching the golden ``dinov2/config.json``."""
        return cls(embed_dim=64, depth=2, num_heads=4, init_values=1.0)

    @classmethod
    def from_dict(cls, d: Mapping) -> DinoV2Config:
        """Build from a dict; unknown keys (e.g. ``arch``, ``seed``) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> DinoV2Config:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


# --------------------------------------------------------------------------- layout conversion


def from_hub_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a torch-hub DINOv2 (with registers) state dict to timm's key layout.

    The input is not modified.  Works on meta tensors too.
    """
    sd = dict(state_dict)
    for key in ("cls_token", "pos_embed"):
        if key not in sd:
            raise ValueError(
                f"not a DINOv2 torch-hub state dict: key {key!r} is missing (keys start with {sorted(sd)[:5]})"
            )
    sd.pop("mask_token", None)
    out: dict[str, torch.Tensor] = {}
    pos = sd.pop("pos_embed")
    cls_tok = sd.pop("cls_token")
    # [1, 1, C] + [1, 1, C]: the class token's position embedding becomes part of the token.
    out["cls_token"] = cls_tok + pos[:, :1]
    out["pos_embed"] = pos[:, 1:]
    if "register_tokens" in sd:
        out["reg_token"] = sd.pop("register_tokens")
    for key, value in sd.items():
        # Some DINOv2 variants (ViT-g) use SwiGLU with w12/w3 names; map them like timm does.
        key = re.sub(r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1.", key)
        key = re.sub(r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2.", key)
        out[key] = value
    return out


def to_hub_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`from_hub_state_dict` up to the class token's position row.

    The split of ``cls_token`` into token + position row is not recoverable; the position
    row is written as zeros and ``mask_token`` as zeros, which gives the same forward output.
    """
    sd = dict(state_dict)
    cls_tok = sd.pop("cls_token")
    pos = sd.pop("pos_embed")
    out: dict[str, torch.Tensor] = {
        "cls_token": cls_tok,
        "pos_embed": torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1),
        "mask_token": torch.zeros_like(cls_tok[0]),
    }
    if "reg_token" in sd:
        out["register_tokens"] = sd.pop("reg_token")
    out.update(sd)
    return out


def _load_tensors_only(path: str) -> object:
    """``torch.load`` that refuses pickled code; the zip format is memory-mapped (1.2 GB is not copied twice)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy format


def load_hub_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the official hub checkpoint (e.g. ``dinov2_vitl14_reg4_pretrain.pth``, a plain
    state dict) or a ``.safetensors`` file in the hub layout, on the CPU."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        obj = _load_tensors_only(path)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: this file holds pickled Python objects, not only tensors, and is not loaded (it could run "
            f"code): use the official dinov2_vitl14_reg4_pretrain.pth or a .safetensors copy"
        ) from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: expected a plain state dict (name -> tensor), got {type(obj).__name__}; "
            "use the official dinov2_vitl14_reg4_pretrain.pth file"
        )
    return dict(obj)


# --------------------------------------------------------------------------- model


class DinoV2Encoder(nn.Module):
    """DINOv2 image encoder returning the tokens Amodal3R conditions on.

    ``forward(images)`` takes ``[B, 3, 518, 518]`` RGB in [0, 1] and returns
    ``[B, 1 + 4 + 1369, C]``: ``layer_norm(x_prenorm)`` without affine parameters.

    Args:
        config: architecture (default ViT-L/14 reg4).
        device: where to allocate parameters; ``torch.device('meta')`` builds a shell without
            memory (for key checks, or to be filled by :meth:`load_timm_state_dict` with
            ``assign=True``).
        init_weights: run timm's weight initialisation.  Skipped automatically on the meta
            device; pass False when weights are loaded right after.
    """

    def __init__(
        self,
        config: DinoV2Config | None = None,
        *,
        device: torch.device | str | None = None,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.config = config = config or DinoV2Config()
        if config.img_size % config.patch_size:
            raise ValueError(f"img_size {config.img_size} is not a multiple of patch_size {config.patch_size}")
        if device is None:
            # honour an enclosing `with torch.device(...)` context
            device = torch.empty(0).device
        device = torch.device(device)
        skip_init = (not init_weights) or device.type == "meta"
        # Allocate through the device context rather than timm's `device=` argument, which
        # older timm 1.0.x releases do not have.
        with device:
            self.vit = VisionTransformer(
                img_size=config.img_size,
                patch_size=config.patch_size,
                in_chans=3,
                num_classes=0,
                global_pool="token",
                embed_dim=config.embed_dim,
                depth=config.depth,
                num_heads=config.num_heads,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=True,
                init_values=config.init_values,
                class_token=True,
                no_embed_class=True,
                reg_tokens=config.num_register_tokens,
                dynamic_img_size=False,
                norm_layer=partial(nn.LayerNorm, eps=BLOCK_NORM_EPS),
                act_layer=nn.GELU,
                weight_init="skip" if skip_init else "",
            )
        # ImageNet statistics; not part of any checkpoint.  Kept off the meta device so a
        # model filled by assign-loading still has real values.
        stats_device = torch.device("cpu") if device.type == "meta" else device
        self.register_buffer(
            "pixel_mean",
            torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=stats_device).view(1, 3, 1, 1),
            persistent=False,
        )
        self.register_buffer(
            "pixel_std",
            torch.tensor(IMAGENET_STD, dtype=torch.float32, device=stats_device).view(1, 3, 1, 1),
            persistent=False,
        )

    # ---------------------------------------------------------------- loading

    def hub_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict in the torch-hub layout (see :func:`to_hub_state_dict`)."""
        return to_hub_state_dict(self.vit.state_dict())

    def load_timm_state_dict(
        self,
        state_dict: Mapping[str, torch.Tensor],
        *,
        source: str = "state dict",
        assign: bool = False,
    ) -> None:
        """Strictly load a timm-layout state dict; a :class:`CheckpointError` (a ``ValueError``)
        names ``source`` and the missing / unexpected / mis-shaped keys."""
        from ._checkpoints import check_state_dict

        check_state_dict(self.vit, state_dict, Path(source))
        self.vit.load_state_dict(state_dict, strict=True, assign=assign)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        config: DinoV2Config | None = None,
        *,
        device: torch.device | str = "cpu",
    ) -> DinoV2Encoder:
        """Load either layout, detected from the keys (``register_tokens``/``mask_token``
        means hub layout)."""
        sd = load_hub_checkpoint(path)  # reads .pth and .safetensors alike
        if "register_tokens" in sd or "mask_token" in sd:
            sd = from_hub_state_dict(sd)
        return cls._from_timm_sd(sd, config, os.fspath(path), device)

    @classmethod
    def _from_timm_sd(cls, sd, config, source: str, device) -> DinoV2Encoder:
        model = cls(config, device="meta")
        model.load_timm_state_dict(sd, source=source, assign=True)
        model = model.to(device=device, dtype=torch.float32)
        model.eval().requires_grad_(False)
        return model

    # ---------------------------------------------------------------- forward

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet normalisation ``(x - mean) / std`` of ``[B, 3, H, W]`` images in [0, 1]."""
        mean = self.pixel_mean.to(device=images.device, dtype=images.dtype)
        std = self.pixel_std.to(device=images.device, dtype=images.dtype)
        return (images - mean) / std

    def _check_images(self, images: torch.Tensor) -> None:
        s = self.config.img_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(
                f"images must be [B, 3, {s}, {s}], got {tuple(images.shape)}; "
                "preprocess with amodal3r.pipelines.conditioning.preprocess_view first"
            )

    def forward_prenorm(self, normalized: torch.Tensor) -> torch.Tensor:
        """Run the ViT on already-normalised images; return the last block's output
        (``x_prenorm``, before the final norm), ``[B, 5 + 1369, C]``."""
        self._check_images(normalized)
        vit = self.vit
        dtype = vit.patch_embed.proj.weight.dtype
        x = vit.patch_embed(normalized.to(dtype))
        x = vit._pos_embed(x)  # class + register tokens, then patches with position embedding
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        return vit.blocks(x)

    def forward(self, images: torch.Tensor, return_prenorm: bool = False):
        """``[B, 3, 518, 518]`` in [0, 1] -> tokens ``[B, 1374, C]``.

        With ``return_prenorm=True`` returns ``(tokens, x_prenorm)``.
        """
        self._check_images(images)
        x_prenorm = self.forward_prenorm(self.normalize(images))
        tokens = F.layer_norm(x_prenorm, x_prenorm.shape[-1:], eps=TOKEN_NORM_EPS)
        if return_prenorm:
            return tokens, x_prenorm
        return tokens

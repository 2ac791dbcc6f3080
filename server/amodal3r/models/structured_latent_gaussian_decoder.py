"""Structured-latent Gaussian decoder: each 64^3 voxel's latent -> ``num_gaussians`` 3D Gaussians.

After the transformer trunk and a final non-affine layer norm, a linear layer predicts per voxel,
in this channel order, ``num_gaussians`` x (3 position offsets, 3 SH DC colours, 3 scales,
4 rotation quaternion values, 1 opacity). Each group is multiplied by its ``lr`` factor. Gaussian
``g`` of a voxel starts at the point ``offset_perturbation[g]`` of a fixed low-discrepancy
(Hammersley) pattern, and tanh keeps it within ``voxel_size / 2`` voxels of the voxel centre.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from amodal3r.modules.sparse import SparseLinear, SparseTensor
from amodal3r.representations.gaussians import Gaussians

from .structured_latent_vae import SparseTransformerBase

# Parameter groups of the output layer in channel order, with their per-Gaussian shape.
GAUSSIAN_PARAMETERS: dict[str, tuple[int, ...]] = {
    "_xyz": (3,),
    "_features_dc": (1, 3),
    "_scaling": (3,),
    "_rotation": (4,),
    "_opacity": (1,),
}


def radical_inverse(base: int, n: int) -> float:
    """The digits of ``n`` in ``base`` mirrored behind the radix point (van der Corput)."""
    value, scale = 0.0, 1.0 / base
    while n > 0:
        n, digit = divmod(n, base)
        value += digit * scale
        scale /= base
    return value


def hammersley_points(num_points: int) -> list[list[float]]:
    """``num_points`` 3D Hammersley points in [0, 1)^3: ``(i / n, base-2 inverse, base-3 inverse)``."""
    return [[i / num_points, radical_inverse(2, i), radical_inverse(3, i)] for i in range(num_points)]


def offset_perturbation(num_gaussians: int, voxel_size: float) -> torch.Tensor:
    """``atanh`` of the Hammersley points mapped to [-1, 1) and divided by ``voxel_size`` (float32).

    Adding this before the tanh of the predicted offsets spreads a voxel's Gaussians over it.
    Computed on the CPU even while a model is built on the meta device: it is tiny and fixed.
    """
    points = torch.tensor(hammersley_points(num_gaussians), dtype=torch.float32, device="cpu") * 2 - 1
    return torch.atanh(points / voxel_size)


class SLatGaussianDecoder(SparseTransformerBase):
    """TRELLIS's structured-latent Gaussian decoder (official args, state-dict keys and buffer)."""

    def __init__(
        self,
        resolution: int,
        model_channels: int,
        latent_channels: int,
        num_blocks: int,
        representation_config: dict | None = None,
        use_fp16: bool = False,
        **trunk: object,
    ):
        trunk = {"attn_mode": "swin", "window_size": 8, **trunk}
        super().__init__(latent_channels, model_channels, num_blocks, **trunk)  # type: ignore[arg-type]
        if not representation_config:
            raise ValueError("SLatGaussianDecoder needs its representation_config (num_gaussians, voxel_size, ...)")
        self.resolution = resolution
        self.rep_config = dict(representation_config)
        self.num_gaussians = int(self.rep_config["num_gaussians"])
        self.layout = self._channel_layout()
        self.out_channels = sum(stop - start for start, stop in self.layout.values())
        self.out_layer = SparseLinear(model_channels, self.out_channels)
        self.register_buffer(
            "offset_perturbation", offset_perturbation(self.num_gaussians, self.rep_config["voxel_size"])
        )
        if use_fp16:
            self.set_torso_dtype(torch.float16)

    def _channel_layout(self) -> dict[str, tuple[int, int]]:
        layout, start = {}, 0
        for name, shape in GAUSSIAN_PARAMETERS.items():
            size = self.num_gaussians * math.prod(shape)
            layout[name] = (start, start + size)
            start += size
        return layout

    def decode(self, x: SparseTensor) -> SparseTensor:
        """The raw per-voxel output channels (see the module docstring for their order)."""
        h = super().forward(x).type(x.dtype)
        h = h.replace(F.layer_norm(h.feats, h.feats.shape[-1:]))
        return self.out_layer(h)

    def _parameter(self, feats: torch.Tensor, name: str) -> torch.Tensor:
        """One parameter group of every Gaussian of these voxels, times its ``lr``, shaped ``[V, G, ...]``."""
        start, stop = self.layout[name]
        values = feats[:, start:stop].reshape(feats.shape[0], self.num_gaussians, *GAUSSIAN_PARAMETERS[name])
        return values * self.rep_config["lr"][name]

    def to_representation(self, x: SparseTensor) -> list[Gaussians]:
        """One Gaussian set per batch element; Gaussian ``g`` of voxel row ``v`` is row ``G*v + g``."""
        cfg = self.rep_config
        results = []
        for rows in x.layout:
            feats = x.feats[rows]
            centres = (x.coords[rows, 1:].float() + 0.5) / self.resolution
            offset = self._parameter(feats, "_xyz")
            if cfg.get("perturb_offset", False):
                offset = offset + self.offset_perturbation
            offset = torch.tanh(offset) / self.resolution * 0.5 * cfg["voxel_size"]
            params = {"_xyz": (centres.unsqueeze(1) + offset).flatten(0, 1)}
            for name in list(GAUSSIAN_PARAMETERS)[1:]:
                params[name] = self._parameter(feats, name).flatten(0, 1)
            results.append(
                Gaussians(
                    **params,
                    min_kernel_size=cfg["3d_filter_kernel_size"],
                    scaling_bias=cfg["scaling_bias"],
                    opacity_bias=cfg["opacity_bias"],
                    scaling_activation=cfg["scaling_activation"],
                )
            )
        return results

    def forward(self, x: SparseTensor) -> list[Gaussians]:
        return self.to_representation(self.decode(x))


class ElasticSLatGaussianDecoder(SLatGaussianDecoder):
    """TRELLIS's memory-elastic training variant; at inference it is the plain decoder."""

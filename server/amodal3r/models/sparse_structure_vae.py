"""Sparse-structure decoder: the 16^3 latent to 64^3 occupancy logits with dense 3D convolutions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amodal3r.modules.blocks import convert_linear_and_conv


class ChannelLayerNorm32(nn.LayerNorm):
    """Layer norm over the channels of each voxel of a ``[B, C, X, Y, Z]`` grid, in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = super().forward(x.float().movedim(1, -1))
        return h.movedim(-1, 1).type(x.dtype)


class GroupNorm32(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def norm_layer(norm_type: str, channels: int) -> nn.Module:
    if norm_type == "layer":
        return ChannelLayerNorm32(channels)
    if norm_type == "group":
        return GroupNorm32(32, channels)
    raise ValueError(f"norm_type must be 'layer' or 'group', got {norm_type!r}")


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``[B, C f^3, X, Y, Z]`` to ``[B, C, fX, fY, fZ]``; channel ``c f^3 + (sx f + sy) f + sz``."""
    b, c, *res = x.shape
    c_out = c // factor**3
    x = x.reshape(b, c_out, factor, factor, factor, *res).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c_out, *[r * factor for r in res])


class ResBlock3d(nn.Module):
    def __init__(self, channels: int, out_channels: int | None = None, norm_type: str = "layer"):
        super().__init__()
        out_channels = out_channels or channels
        self.norm1 = norm_layer(norm_type, channels)
        self.norm2 = norm_layer(norm_type, out_channels)
        self.conv1 = nn.Conv3d(channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip_connection = nn.Conv3d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


class UpsampleBlock3d(nn.Module):
    """Convolution to 8x the output channels, then a 3D pixel shuffle."""

    def __init__(self, in_channels: int, out_channels: int, mode: str = "conv"):
        super().__init__()
        if mode != "conv":
            raise ValueError(f"upsample mode {mode!r} is not supported: the official decoder uses 'conv'")
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


class SparseStructureDecoder(nn.Module):
    def __init__(
        self,
        out_channels: int,
        latent_channels: int,
        num_res_blocks: int,
        channels: list[int],
        num_res_blocks_middle: int = 2,
        norm_type: str = "layer",
        use_fp16: bool = False,
    ):
        super().__init__()
        self.latent_channels = latent_channels
        self.input_layer = nn.Conv3d(latent_channels, channels[0], 3, padding=1)
        self.middle_block = nn.Sequential(
            *[ResBlock3d(channels[0], norm_type=norm_type) for _ in range(num_res_blocks_middle)]
        )
        self.blocks = nn.ModuleList()
        for i, ch in enumerate(channels):
            self.blocks.extend(ResBlock3d(ch, norm_type=norm_type) for _ in range(num_res_blocks))
            if i < len(channels) - 1:
                self.blocks.append(UpsampleBlock3d(ch, channels[i + 1]))
        self.out_layer = nn.Sequential(
            norm_layer(norm_type, channels[-1]), nn.SiLU(), nn.Conv3d(channels[-1], out_channels, 3, padding=1)
        )
        self.dtype = torch.float32
        if use_fp16:
            self.set_torso_dtype(torch.float16)

    def set_torso_dtype(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        convert_linear_and_conv(self.middle_block, dtype)
        convert_linear_and_conv(self.blocks, dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.input_layer(z).type(self.dtype)
        h = self.middle_block(h)
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h.type(z.dtype))

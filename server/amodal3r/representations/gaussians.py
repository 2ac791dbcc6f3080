"""3D Gaussian set produced by the structured-latent Gaussian decoder, and its PLY export.

The stored (``_``-prefixed) tensors are raw decoder outputs; the ``get_*`` properties apply the
activations of TRELLIS's Gaussian model:

* ``get_xyz = _xyz * aabb[3:] + aabb[:3]`` (the decoder's aabb maps [0, 1]^3 to [-0.5, 0.5]^3),
* ``get_scaling = sqrt(act(_scaling + act^-1(scaling_bias))^2 + min_kernel_size^2)`` with ``act``
  softplus or exp: a 3D filter that keeps every Gaussian at least ``min_kernel_size`` wide,
* ``get_rotation = normalize(_rotation + [1, 0, 0, 0])`` (quaternions ``w, x, y, z``),
* ``get_opacity = sigmoid(_opacity + logit(opacity_bias))``,
* ``get_features = _features_dc`` (degree-0 spherical harmonics only).

PLY files follow the 3D Gaussian Splatting layout that splat viewers and Blender add-ons read
(binary little-endian float32: ``x y z nx ny nz f_dc_0..2 opacity scale_0..2 rot_0..3``), with
the conventions of TRELLIS's ``save_ply``: positions are the activated ``get_xyz``, normals are
zero, ``f_dc`` are the raw SH DC coefficients, ``opacity`` is the logit of the activated opacity,
``scale_i`` the log of the activated (filtered) scales, and ``rot`` the quaternion ``w, x, y, z``.
By default positions and orientations are rotated by ``Y_UP_TO_Z_UP`` (``(x, y, z) -> (x, -z, y)``):
the decoder's frame is y-up, the file is z-up like Blender. Rotated quaternions are unit length
with their largest-magnitude component positive (the sign TRELLIS's export ends up with);
``transform=None`` writes the unnormalised ``_rotation + [1, 0, 0, 0]`` as TRELLIS does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Y_UP_TO_Z_UP = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0))
DEFAULT_AABB = (-0.5, -0.5, -0.5, 1.0, 1.0, 1.0)


def inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


def logit(x: Tensor) -> Tensor:
    return torch.log(x / (1 - x))


def quaternion_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product of ``w, x, y, z`` quaternions (broadcasting)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def rotation_to_quaternion(matrix: Tensor) -> Tensor:
    """Unit ``w, x, y, z`` quaternion of one proper 3x3 rotation matrix."""
    m = matrix.double()
    if not torch.allclose(m @ m.T, torch.eye(3, dtype=m.dtype), atol=1e-6) or torch.det(m) < 0:
        raise ValueError("transform must be a rotation matrix (orthonormal, determinant +1)")
    # Magnitudes from the diagonal; signs from the off-diagonal terms relative to the largest one.
    diag = torch.stack(
        [
            1 + m[0, 0] + m[1, 1] + m[2, 2],
            1 + m[0, 0] - m[1, 1] - m[2, 2],
            1 - m[0, 0] + m[1, 1] - m[2, 2],
            1 - m[0, 0] - m[1, 1] + m[2, 2],
        ]
    )
    i = int(torch.argmax(diag))
    s = 2 * torch.sqrt(diag[i])
    pairs = {  # 4 * q_i * q_j for each (i, j)
        (0, 1): m[2, 1] - m[1, 2],
        (0, 2): m[0, 2] - m[2, 0],
        (0, 3): m[1, 0] - m[0, 1],
        (1, 2): m[0, 1] + m[1, 0],
        (1, 3): m[0, 2] + m[2, 0],
        (2, 3): m[1, 2] + m[2, 1],
    }
    q = torch.stack([s / 4 if j == i else pairs[(min(i, j), max(i, j))] / s for j in range(4)])
    return q / q.norm()


def canonical_sign(q: Tensor) -> Tensor:
    """Flip each quaternion so that its largest-magnitude component is positive."""
    largest = q.gather(-1, q.abs().argmax(dim=-1, keepdim=True))
    return torch.where(largest < 0, -q, q)


@dataclass
class Gaussians:
    """One object's 3D Gaussians: raw parameters plus the activation settings of the decoder."""

    _xyz: Tensor  # [N, 3] in [0, 1]^3 before the aabb map
    _features_dc: Tensor  # [N, 1, 3]
    _scaling: Tensor  # [N, 3]
    _rotation: Tensor  # [N, 4]
    _opacity: Tensor  # [N, 1]
    aabb: tuple[float, ...] = DEFAULT_AABB
    sh_degree: int = 0
    min_kernel_size: float = 0.0
    scaling_bias: float = 0.01
    opacity_bias: float = 0.1
    scaling_activation: str = "exp"

    def __post_init__(self) -> None:
        if self.scaling_activation not in ("exp", "softplus"):
            raise ValueError(f"scaling_activation must be 'exp' or 'softplus', got {self.scaling_activation!r}")

    def __len__(self) -> int:
        return self._xyz.shape[0]

    def _scalar(self, value: float) -> Tensor:
        return torch.tensor(value, dtype=torch.float32, device=self._xyz.device)

    def _scale_act(self, x: Tensor) -> Tensor:
        return F.softplus(x) if self.scaling_activation == "softplus" else torch.exp(x)

    @property
    def scale_bias(self) -> Tensor:
        bias = self._scalar(self.scaling_bias)
        return inverse_softplus(bias) if self.scaling_activation == "softplus" else torch.log(bias)

    @property
    def opacity_logit_bias(self) -> Tensor:
        return logit(self._scalar(self.opacity_bias))

    @property
    def rotation_bias(self) -> Tensor:
        return torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=self._rotation.dtype, device=self._rotation.device)

    @property
    def get_xyz(self) -> Tensor:
        aabb = torch.tensor(self.aabb, dtype=self._xyz.dtype, device=self._xyz.device)
        return self._xyz * aabb[3:] + aabb[:3]

    @property
    def get_features(self) -> Tensor:
        return self._features_dc

    @property
    def get_scaling(self) -> Tensor:
        scales = self._scale_act(self._scaling + self.scale_bias)
        return torch.sqrt(torch.square(scales) + self.min_kernel_size**2)

    @property
    def get_rotation(self) -> Tensor:
        return F.normalize(self._rotation + self.rotation_bias, dim=-1)

    @property
    def get_opacity(self) -> Tensor:
        return torch.sigmoid(self._opacity + self.opacity_logit_bias)

    def ply_attributes(self, transform=Y_UP_TO_Z_UP) -> dict[str, np.ndarray]:
        """The PLY vertex properties in file order, as float32 arrays (see the module docstring)."""
        with torch.no_grad():
            xyz = self.get_xyz.double()
            rotation = (self._rotation + self.rotation_bias).double()
            if transform is not None:
                matrix = torch.as_tensor(transform, dtype=torch.float64, device=xyz.device)
                xyz = xyz @ matrix.T
                turn = rotation_to_quaternion(matrix.cpu()).to(xyz.device)
                rotation = canonical_sign(quaternion_multiply(turn, F.normalize(rotation, dim=-1)))
            f_dc = self._features_dc.transpose(1, 2).flatten(1)
            # logit(get_opacity) is _opacity + logit(bias); adding directly avoids saturating to inf.
            opacity = self._opacity + self.opacity_logit_bias
            scale = torch.log(self.get_scaling)
        columns = {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]}
        columns.update({n: torch.zeros_like(xyz[:, 0]) for n in ("nx", "ny", "nz")})
        columns.update({f"f_dc_{i}": f_dc[:, i] for i in range(f_dc.shape[1])})
        columns["opacity"] = opacity[:, 0]
        columns.update({f"scale_{i}": scale[:, i] for i in range(scale.shape[1])})
        columns.update({f"rot_{i}": rotation[:, i] for i in range(rotation.shape[1])})
        return {name: col.float().cpu().numpy() for name, col in columns.items()}

    def save_ply(self, path: str | Path, transform=Y_UP_TO_Z_UP) -> None:
        """Write a binary little-endian 3D Gaussian Splatting PLY file."""
        columns = self.ply_attributes(transform)
        table = np.empty(len(self), dtype=[(name, "<f4") for name in columns])
        for name, values in columns.items():
            table[name] = values
        header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(self)}"]
        header += [f"property float {name}" for name in columns]
        header.append("end_header")
        with open(path, "wb") as f:
            f.write(("\n".join(header) + "\n").encode("ascii"))
            f.write(table.tobytes())

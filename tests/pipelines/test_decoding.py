"""Decoding structured latents through the pipeline: lazy decoders, a realistic occupancy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trimesh

from amodal3r.modules.sparse import SparseTensor
from amodal3r.pipelines.amodal3r import Amodal3RPipeline


def sphere_shell_latent(radius: float, res: int = 64, seed: int = 0) -> SparseTensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
    shell = grid[((grid.float() - (res - 1) / 2).norm(dim=1) - radius).abs() < 1.0]
    coords = torch.cat([torch.zeros(len(shell), 1, dtype=torch.long), shell], dim=1)
    return SparseTensor(torch.randn(len(shell), 8, generator=torch.Generator().manual_seed(seed)), coords)


def test_only_requested_decoders_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    pipeline = Amodal3RPipeline.from_pretrained(tiny_model_dir, device="cpu")
    gaussians = pipeline.decode(sphere_shell_latent(6.0), formats=("gaussian",))["gaussian"]
    assert pipeline.loaded_models == ["slat_decoder_gs"]
    assert gaussians[0].get_xyz.shape[0] == 8 * sphere_shell_latent(6.0).feats.shape[0]
    gaussians[0].save_ply(tmp_path / "splats.ply")
    assert (tmp_path / "splats.ply").read_bytes().startswith(b"ply\nformat binary_little_endian 1.0\n")
    with pytest.raises(ValueError, match=r"unknown output format\(s\) \['nerf'\]"):
        pipeline.decode(sphere_shell_latent(6.0), formats=("nerf",))


def test_mesh_of_a_realistic_occupancy(tiny_model_dir: Path) -> None:
    latent = sphere_shell_latent(28.0)
    assert 18_000 < latent.feats.shape[0] < 22_000
    pipeline = Amodal3RPipeline.from_pretrained(tiny_model_dir, device="cpu")
    mesh = pipeline.decode(latent, formats=("mesh",))["mesh"][0]
    assert mesh.success and mesh.vertex_attrs.shape == (mesh.vertices.shape[0], 6)
    assert mesh.vertex_attrs.min() >= 0 and mesh.vertex_attrs.max() <= 1
    assert mesh.vertices.abs().max() <= 0.5 + 1 / 256
    raw = trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy(), process=False)
    assert raw.is_winding_consistent
    welded = mesh.welded()
    clean = trimesh.Trimesh(welded.vertices.numpy(), welded.faces.numpy(), process=False)
    assert clean.nondegenerate_faces().all()
    assert clean.is_winding_consistent
    assert welded.faces.shape[0] > 0.999 * mesh.faces.shape[0]

"""Shared fixtures: the golden reference folder and the conditioning it was made with."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from loopback_files import Served, serve_files
from safetensors.torch import load_file

from amodal3r.models import build_model
from amodal3r.modules.condition_tokens import NUM_IMAGE_TOKENS, NUM_PATCHES
from amodal3r.modules.sparse import SparseTensor
from amodal3r.weights.tiny import SIZES, randomize, tiny_configs

REPO_ROOT = Path(__file__).resolve().parents[1]


GOLDEN_ENV = "AMODAL3R_GOLDEN_DIR"


def golden_dir() -> Path:
    """``AMODAL3R_GOLDEN_DIR``, else the copy the repository carries (``tests/golden``)."""
    return Path(os.environ.get(GOLDEN_ENV, REPO_ROOT / "tests" / "golden"))


def golden_case(name: str) -> Path:
    path = golden_dir() / name
    if not path.is_dir():
        pytest.fail(f"golden case {path} is missing: set {GOLDEN_ENV} to a golden folder (tests/golden/README.md)")
    return path


def golden_cond() -> torch.Tensor:
    """The ``cond`` tensor assembled exactly as the golden README prescribes (checksum verified)."""
    folder = golden_case("cond")
    parts = load_file(folder / "cond.safetensors")
    width = parts["tokens_i8"].shape[-1]
    cond = torch.cat(
        [
            parts["tokens_i8"].float() / 32,
            parts["vis_ratio"][..., None].repeat(1, 1, width),
            parts["occ_ratio"][..., None].repeat(1, 1, width),
        ],
        dim=1,
    )
    expected = json.loads((folder / "cond.json").read_text())["cond_sum_f64"]
    assert abs(cond.double().sum().item() - expected) < 1e-6 * abs(expected)
    return cond


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> float:
    """``|actual - expected| <= rel * (1 + max|expected|)``; returns the max error for reports."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.double() - expected.double()).abs().max().item()
    bound = rel * (1 + expected.abs().max().item())
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"
    return err


WIDTH = 64  # the tiny encoder's token width


def condition_rows(views: int, seed: int = 0) -> torch.Tensor:
    """Real-looking condition rows: tokens, visibility and occlusion ratios (multiples of 1/196)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(views, NUM_IMAGE_TOKENS, WIDTH, generator=g)
    vis = (torch.rand(views, NUM_PATCHES, 1, generator=g) * 196).round() / 196
    occ = (1 - vis) * (torch.rand(views, NUM_PATCHES, 1, generator=g) > 0.5)
    return torch.cat([tokens, vis.expand(-1, -1, WIDTH), occ.expand(-1, -1, WIDTH)], dim=1)


def tiny_flow(key: str) -> torch.nn.Module:
    """A tiny pipeline model (``tiny_configs`` key) with random weights, all in float32."""
    config = tiny_configs(WIDTH, SIZES["tiny"])[key][1]
    model = build_model(config, key, device="cpu").float()
    randomize(model, torch.Generator().manual_seed(1))
    model.set_torso_dtype(torch.float32)
    return model.eval()


def shell_latent(batch: int = 1, seed: int = 0) -> SparseTensor:
    """A small spherical shell of voxels (a surface, like real occupancy) with random 8-channel latents."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(24)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
    shell = grid[((grid.float() - 11.5).norm(dim=1) - 8).abs() < 1.2] + 20
    coords = torch.cat([torch.zeros(len(shell), 1, dtype=torch.long), shell], dim=1)
    x = SparseTensor(torch.randn(len(shell), 8, generator=torch.Generator().manual_seed(seed)), coords)
    return x.repeat_batch(batch)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from amodal3r.weights.tiny import write_tiny_weights

    return write_tiny_weights(tmp_path_factory.mktemp("tiny") / "model", seed=0)


SPARSE_OCCUPANCY = 0.005  # a sixth of the usual voxels: every stage after the structure is that much cheaper


@pytest.fixture(scope="session")
def sparse_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random weights whose structures are sparse: for the tests that run many whole jobs."""
    from amodal3r.weights.tiny import write_tiny_weights

    return write_tiny_weights(tmp_path_factory.mktemp("tiny-sparse") / "model", seed=0, occupancy=SPARSE_OCCUPANCY)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ray: starts a local Ray cluster (2 CPUs, 2 logical GPUs); deselect with -m 'not ray'"
    )


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """A Ray cluster in this process (2 CPUs, 2 logical GPUs, no dashboard) for the whole session;
    its address lets command-line runs in child processes join it."""
    try:
        import ray
    except ImportError:
        pytest.fail("the Ray tests need Ray: pip install -e 'server[test]' (it includes ray[serve])")
    ray.init(
        num_cpus=2,
        num_gpus=2,
        include_dashboard=False,
        log_to_driver=False,
        namespace="amodal3r-tests",
        _node_ip_address="127.0.0.1",  # loopback only: no test traffic leaves this machine's lo
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def file_server() -> Iterator[Served]:
    """In-memory files over HTTP on loopback: a stand-in for download sites and the Hugging Face Hub."""
    with serve_files() as served:
        yield served

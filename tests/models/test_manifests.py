"""Full-size official configs built on the meta device have exactly the official keys, shapes, dtypes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import golden_dir

from amodal3r.models._checkpoints import build_model

CORE_MANIFESTS = ["ss_flow", "ss_dec", "slat_flow"]


def manifest(name: str) -> dict:
    path = golden_dir() / "manifests" / f"{name}.json"
    if not path.is_file():
        pytest.fail(f"manifest {path} is missing: set AMODAL3R_GOLDEN_DIR to the golden folder")
    return json.loads(path.read_text())


def state_manifest(model: torch.nn.Module) -> dict[str, list]:
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", CORE_MANIFESTS)
def test_full_size_manifest(name: str) -> None:
    m = manifest(name)
    model = build_model({"name": m["name"], "args": m["args"]}, golden_dir() / "manifests" / name, device="meta")
    ours = state_manifest(model)
    assert set(ours) == set(m["state_dict"]), sorted(set(ours) ^ set(m["state_dict"]))[:10]
    assert ours == m["state_dict"]
    assert len(ours) == m["num_tensors"]
    assert sum(v.numel() for v in model.state_dict().values()) == m["num_elements"]

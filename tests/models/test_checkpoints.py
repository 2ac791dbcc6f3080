"""Bad checkpoints fail with one clear error that names the file, the keys and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import golden_case
from safetensors.torch import load_file, save_file

from amodal3r.models._checkpoints import CheckpointError, load_model
from amodal3r.pipelines.amodal3r import Amodal3RPipeline


@pytest.fixture
def stem(tmp_path: Path) -> Path:
    """A private copy of a golden checkpoint to damage."""
    for suffix in (".json", ".safetensors"):
        shutil.copy(golden_case("ss_flow") / f"model{suffix}", tmp_path / f"ckpt{suffix}")
    return tmp_path / "ckpt"


def _weights(stem: Path) -> Path:
    return stem.with_name(stem.name + ".safetensors")


def _rewrite_state(stem: Path, edit) -> None:
    state = load_file(_weights(stem))
    edit(state)
    save_file(state, str(_weights(stem)))


def test_loads_when_intact(stem: Path) -> None:
    model = load_model(stem)
    assert type(model).__name__ == "SparseStructureFlowModelMaskAsCondWeighted"
    assert not any(p.requires_grad for p in model.parameters())


def test_truncated_file(stem: Path) -> None:
    data = _weights(stem).read_bytes()
    _weights(stem).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ckpt\.safetensors.*(truncated|corrupt).*download it again"):
        load_model(stem)


def test_corrupt_file(stem: Path) -> None:
    _weights(stem).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"ckpt\.safetensors.*unreadable"):
        load_model(stem)


def test_wrong_shape(stem: Path) -> None:
    _rewrite_state(stem, lambda s: s.__setitem__("out_layer.bias", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"wrong shapes: out_layer\.bias \(3,\) != \(8,\)"):
        load_model(stem)


def test_missing_and_unexpected_keys(stem: Path) -> None:
    def edit(state: dict) -> None:
        state.pop("blocks.1.mlp.mlp.0.weight")
        state["blocks.9.extra"] = torch.zeros(1)

    _rewrite_state(stem, edit)
    with pytest.raises(CheckpointError) as info:
        load_model(stem)
    message = str(info.value)
    assert "missing keys: blocks.1.mlp.mlp.0.weight" in message
    assert "unexpected keys: blocks.9.extra" in message
    assert "ckpt.safetensors" in message


def test_unknown_class(stem: Path) -> None:
    config = json.loads(stem.with_suffix(".json").read_text())
    stem.with_suffix(".json").write_text(json.dumps({**config, "name": "TotallyNewModel"}))
    with pytest.raises(
        CheckpointError, match=r"ckpt\.json: unknown model class 'TotallyNewModel'; known: .*SLatFlowModel"
    ):
        load_model(stem)


def test_malformed_json(stem: Path) -> None:
    stem.with_suffix(".json").write_text('{"name": ')
    with pytest.raises(CheckpointError, match=r"ckpt\.json: not valid JSON"):
        load_model(stem)


def test_missing_file_named_in_pipeline(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    rel = json.loads((folder / "pipeline.json").read_text())["args"]["models"]["slat_flow_model"]
    (folder / f"{rel}.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model 'slat_flow_model' is .*slat_flow.*\.safetensors is missing"):
        Amodal3RPipeline.from_pretrained(folder)


def test_missing_pipeline_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"pipeline\.json: not found"):
        Amodal3RPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forced_dtype(stem: Path, dtype: torch.dtype) -> None:
    model = load_model(stem, dtype=dtype)
    assert model.blocks[0].self_attn.to_qkv.weight.dtype == dtype
    assert model.blocks[0].norm2.weight.dtype == torch.float32
    assert model.input_layer.weight.dtype == torch.float32

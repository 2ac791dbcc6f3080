"""Model folders: local paths as they are, hub ids through the cache, clear errors offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from amodal3r.models._checkpoints import CheckpointError
from amodal3r.weights.hub import resolve_model


def test_local_folder(tiny_model_dir: Path) -> None:
    assert resolve_model(tiny_model_dir) == tiny_model_dir


def test_folder_without_pipeline(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no pipeline.json here"):
        resolve_model(tmp_path)


def test_hub_id_missing_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(
        CheckpointError,
        match=r"'Sm0kyWu/Amodal3R' is not in the local Hugging Face cache.*"
        r"pass --model /path/to/that/folder",
    ):
        resolve_model("Sm0kyWu/Amodal3R", allow_download=False)


def test_hub_id_found_in_cache(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot laid out as huggingface_hub caches it resolves without any network."""
    cache = tmp_path / "cache"
    repo = cache / "models--Sm0kyWu--Amodal3R"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for f in tiny_model_dir.rglob("*"):
        if f.is_file():
            (snapshot / f.relative_to(tiny_model_dir)).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / f.relative_to(tiny_model_dir)).write_bytes(f.read_bytes())
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model("Sm0kyWu/Amodal3R", allow_download=False) == snapshot

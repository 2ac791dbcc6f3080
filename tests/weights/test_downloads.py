"""The model folder's inventory and the downloads, against loopback servers: never the network."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import shutil
import socket
from dataclasses import asdict
from pathlib import Path

import pytest
from loopback_files import Served

from amodal3r.api.errors import Cancelled
from amodal3r.weights import downloads as models_store
from amodal3r.weights.downloads import (
    CATALOG,
    Component,
    DownloadError,
    DownloadProgress,
    RemoteFile,
    download,
    inventory,
    published_sha256,
)
from amodal3r.weights.layout import OFFICIAL_MODELS

DINOV2 = "dinov2_vitl14_reg4_pretrain.pth"
DINOV2_SOURCE = "/dinov2/dinov2_vitl14/" + DINOV2


@pytest.fixture
def served(file_server: Served, monkeypatch: pytest.MonkeyPatch) -> Served:
    """The loopback file server in place of dl.fbaipublicfiles.com, with small chunks so files take several."""
    monkeypatch.setattr(models_store, "HTTPS_BASE", file_server.url)
    monkeypatch.setattr(models_store, "CHUNK_BYTES", 16 << 10)
    return file_server


def serve_sam(served: Served, monkeypatch: pytest.MonkeyPatch, data: bytes, named_after: bytes | None = None) -> str:
    """Serve ``data`` as a SAM-style checkpoint named after the SHA-256 of ``named_after`` (default: itself)."""
    name = f"sam_vit_b_{hashlib.sha256(data if named_after is None else named_after).hexdigest()[:6]}.pth"
    served.files[f"/segment_anything/{name}"] = data
    monkeypatch.setitem(
        CATALOG,
        "sam_vit_b",
        Component("sam_vit_b", "test SAM", (RemoteFile(f"sam/{name}", f"segment_anything/{name}"),)),
    )
    return f"sam/{name}"


def random_bytes(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def by_name(model_dir: Path) -> dict[str, models_store.ComponentStatus]:
    return {s.name: s for s in inventory(model_dir)}


def check_progress(events: list[DownloadProgress]) -> None:
    """Bytes never go back within a file, and the last event says everything is done."""
    for previous, current in itertools.pairwise(events):
        if previous.file == current.file:
            assert current.bytes_done >= previous.bytes_done, (previous, current)
            assert current.files_done >= previous.files_done
    assert events[-1].files_done == events[-1].files_total
    assert events[-1].bytes_done == events[-1].bytes_total


def assert_bytes_reported(events: list[DownloadProgress]) -> None:
    """Each file had a byte count with its size before it completed: the progress bar passed them on."""
    order = list(dict.fromkeys(e.file for e in events))
    assert {e.file for e in events if e.bytes_total and e.files_done == order.index(e.file)} == set(order)


def official_files() -> list[str]:
    return ["pipeline.json"] + [
        stem + suffix for stem in OFFICIAL_MODELS.values() for suffix in (".json", ".safetensors")
    ]


def test_inventory_of_tiny_weights(tiny_model_dir: Path) -> None:
    status = by_name(tiny_model_dir)
    assert list(status) == ["amodal3r", "dinov2", "sam_vit_h", "sam_vit_l", "sam_vit_b"]
    assert status["amodal3r"].present and status["amodal3r"].missing == []
    weights = [tiny_model_dir / "pipeline.json", *(tiny_model_dir / "Amodal3R_ckpts").iterdir()]
    assert status["amodal3r"].bytes_on_disk == sum(p.stat().st_size for p in weights)
    dinov2 = tiny_model_dir / "dinov2_vitl14_reg4_pretrain.safetensors"  # stands in for the .pth
    assert status["dinov2"].present and status["dinov2"].bytes_on_disk == dinov2.stat().st_size
    assert not status["sam_vit_h"].present and status["sam_vit_h"].missing == ["sam/sam_vit_h_4b8939.pth"]
    json.dumps([asdict(s) for s in status.values()])


def test_inventory_of_an_empty_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    status = by_name(tmp_path)
    assert not any(s.present or s.bytes_on_disk for s in status.values())
    assert status["amodal3r"].missing == [
        "pipeline.json",
        "Amodal3R_ckpts/ss_flow_img_dit_L_16l8_fp16.json",
        "Amodal3R_ckpts/ss_flow_img_dit_L_16l8_fp16.safetensors",
        "Amodal3R_ckpts/ss_dec_conv3d_16l8_fp16.json",
        "Amodal3R_ckpts/ss_dec_conv3d_16l8_fp16.safetensors",
        "Amodal3R_ckpts/slat_flow_img_dit_L_64l8p2_fp16.json",
        "Amodal3R_ckpts/slat_flow_img_dit_L_64l8p2_fp16.safetensors",
        "Amodal3R_ckpts/slat_dec_mesh_swin8_B_64l8m256c_fp16.json",
        "Amodal3R_ckpts/slat_dec_mesh_swin8_B_64l8m256c_fp16.safetensors",
        "Amodal3R_ckpts/slat_dec_gs_swin8_B_64l8gs32_fp16.json",
        "Amodal3R_ckpts/slat_dec_gs_swin8_B_64l8gs32_fp16.safetensors",
    ]
    tiny_layout = ["pipeline.json"] + [
        f"Amodal3R_ckpts/{p.name}" for p in (tiny_model_dir / "Amodal3R_ckpts").iterdir()
    ]
    assert sorted(status["amodal3r"].missing) == sorted(tiny_layout)
    assert status["dinov2"].missing == [DINOV2]
    assert status["sam_vit_h"].missing == ["sam/sam_vit_h_4b8939.pth"]
    assert status["sam_vit_l"].missing == ["sam/sam_vit_l_0b3195.pth"]
    assert status["sam_vit_b"].missing == ["sam/sam_vit_b_01ec64.pth"]


def test_catalog_agrees_with_the_pipeline_and_the_server() -> None:
    from amodal3r.weights.layout import DOWNLOAD_BASE, IMAGE_ENCODER_FILES, IMAGE_ENCODER_SOURCE

    dinov2 = CATALOG["dinov2"]
    assert models_store.source_url(dinov2, dinov2.files[0]) == f"{DOWNLOAD_BASE}/{IMAGE_ENCODER_SOURCE}"
    assert (dinov2.files[0].path, *dinov2.files[0].accepts) == IMAGE_ENCODER_FILES[::-1]
    for kind, prefix in (("vit_h", "4b8939"), ("vit_l", "0b3195"), ("vit_b", "01ec64")):
        (sam,) = CATALOG[f"sam_{kind}"].files
        assert re.fullmatch(rf"sam/sam_{kind}_[0-9a-f]+\.pth", sam.path)  # what the server's glob finds
        assert published_sha256(sam.path) == prefix
        assert (
            models_store.source_url(CATALOG[f"sam_{kind}"], sam)
            == f"https://dl.fbaipublicfiles.com/segment_anything/{Path(sam.path).name}"
        )
    assert published_sha256(DINOV2) is None


def test_https_download(served: Served, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = random_bytes(200_000)
    path = serve_sam(served, monkeypatch, data)
    events: list[DownloadProgress] = []
    download(tmp_path, ["sam_vit_b"], events.append)
    assert (tmp_path / path).read_bytes() == data
    assert not list((tmp_path / "sam").glob("*.part"))
    assert served.requests == [(f"/segment_anything/{Path(path).name}", None)]
    check_progress(events)
    assert len(events) > 10 and events[-1] == DownloadProgress("sam_vit_b", path, len(data), len(data), 1, 1)
    assert by_name(tmp_path)["sam_vit_b"].present


@pytest.mark.parametrize("honour_range", [True, False])
def test_resume_from_a_part_file(
    served: Served, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, honour_range: bool
) -> None:
    """A Range request for the rest; a server that ignores it sends everything and that is fine too."""
    data = random_bytes(100_000)
    path = serve_sam(served, monkeypatch, data)
    served.honour_range = honour_range
    (tmp_path / "sam").mkdir()
    (tmp_path / f"{path}.part").write_bytes(data[:50_000])
    events: list[DownloadProgress] = []
    download(tmp_path, ["sam_vit_b"], events.append)
    assert (tmp_path / path).read_bytes() == data
    assert served.requests[-1][1] == "bytes=50000-"
    assert (50_000 in [e.bytes_done for e in events]) == honour_range
    check_progress(events)


def test_a_complete_part_file_starts_over(served: Served, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Killed between the last byte and the rename: no range is left (416), so fetch it all again."""
    data = random_bytes(40_000)
    path = serve_sam(served, monkeypatch, data)
    (tmp_path / "sam").mkdir()
    (tmp_path / f"{path}.part").write_bytes(data)
    download(tmp_path, ["sam_vit_b"], lambda _: None)
    assert (tmp_path / path).read_bytes() == data
    assert [r for _, r in served.requests] == ["bytes=40000-", None]


def test_wrong_bytes_fail_the_hash_and_leave_nothing(
    served: Served, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = random_bytes(50_000)
    serve_sam(served, monkeypatch, data, named_after=data[::-1])
    with pytest.raises(DownloadError, match=r"SHA-256 [0-9a-f]{12}\.\.\. does not start with"):
        download(tmp_path, ["sam_vit_b"], lambda _: None)
    assert list((tmp_path / "sam").iterdir()) == []
    assert not by_name(tmp_path)["sam_vit_b"].present


def test_offline_says_what_to_put_where(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on: the connection is refused at once
        probe.bind(("127.0.0.1", 0))
        base = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(models_store, "HTTPS_BASE", base)
    with pytest.raises(DownloadError) as caught:
        download(tmp_path, ["dinov2", "sam_vit_l"], lambda _: None)
    message = str(caught.value)
    assert "could not download the models" in message and "URLError" in message
    assert f"{base}{DINOV2_SOURCE}\n    -> {tmp_path.resolve() / DINOV2}" in message
    assert f"{base}/segment_anything/sam_vit_l_0b3195.pth\n    -> {tmp_path.resolve() / 'sam'}" in message
    assert not (tmp_path / DINOV2).exists()


def test_cancel_keeps_the_part_for_later(served: Served, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = random_bytes(300_000)
    path = serve_sam(served, monkeypatch, data)
    events: list[DownloadProgress] = []
    with pytest.raises(Cancelled):
        download(
            tmp_path, ["sam_vit_b"], events.append, cancelled=lambda: bool(events) and events[-1].bytes_done >= 64 << 10
        )
    kept = (tmp_path / f"{path}.part").stat().st_size
    assert 64 << 10 <= kept < len(data) and not (tmp_path / path).exists()
    download(tmp_path, ["sam_vit_b"], lambda _: None)
    assert (tmp_path / path).read_bytes() == data
    assert served.requests[-1][1] == f"bytes={kept}-"


def test_the_pipeline_finds_downloaded_dinov2(served: Served, tmp_path: Path) -> None:
    import torch

    from amodal3r.pipelines.amodal3r import Amodal3RPipeline

    served.files[DINOV2_SOURCE] = random_bytes(20_000)
    download(tmp_path, ["dinov2"], lambda _: None)
    assert by_name(tmp_path)["dinov2"].present
    found = Amodal3RPipeline(tmp_path, None, torch.device("cpu"), None).image_encoder_path()
    assert found == tmp_path / DINOV2


@pytest.fixture
def remote_pipeline(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny weights with a pipeline.json that names three of the five checkpoints."""
    remote = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, remote)
    config = json.loads((remote / "pipeline.json").read_text())
    models = config["args"]["models"]
    config["args"]["models"] = {
        k: models[k] for k in ("sparse_structure_flow_model", "sparse_structure_decoder", "slat_flow_model")
    }
    (remote / "pipeline.json").write_text(json.dumps(config))
    return remote


def test_hugging_face_files_follow_pipeline_json(
    remote_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    calls = []

    def fake_hf_hub_download(repo_id: str, filename: str, *, local_dir: Path, tqdm_class: type, **kwargs) -> str:
        calls.append((repo_id, filename, local_dir))
        size = (remote_pipeline / filename).stat().st_size
        bar = tqdm_class(total=size, initial=0, desc=filename, unit="B", unit_scale=True)
        bar.update(size // 2)
        bar.update(size - size // 2)
        bar.close()
        (Path(local_dir) / filename).parent.mkdir(parents=True, exist_ok=True)
        return shutil.copy(remote_pipeline / filename, Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    model_dir = tmp_path / "model"
    events: list[DownloadProgress] = []
    download(model_dir, ["amodal3r"], events.append)
    named = json.loads((remote_pipeline / "pipeline.json").read_text())["args"]["models"].values()
    expected = ["pipeline.json"] + [stem + suffix for stem in named for suffix in (".json", ".safetensors")]
    assert calls == [("Sm0kyWu/Amodal3R", f, model_dir) for f in expected]
    assert by_name(model_dir)["amodal3r"].present
    check_progress(events)
    assert events[0].files_total == 11 and events[-1].files_total == 7  # known once pipeline.json is here
    assert any(0 < e.bytes_done < (e.bytes_total or 0) for e in events)
    assert_bytes_reported(events)


def test_hugging_face_through_the_real_client(
    remote_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: Served
) -> None:
    """huggingface_hub itself against a loopback endpoint: our silent progress bar fits its calls."""
    for f in remote_pipeline.rglob("*"):
        if f.is_file():
            served.files[f"/Sm0kyWu/Amodal3R/resolve/main/{f.relative_to(remote_pipeline)}"] = f.read_bytes()
    monkeypatch.setattr(models_store, "HF_ENDPOINT", served.url)
    events: list[DownloadProgress] = []
    download(tmp_path / "model", ["amodal3r"], events.append)
    assert by_name(tmp_path / "model")["amodal3r"].present
    check_progress(events)
    assert_bytes_reported(events)


def test_hugging_face_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args: object, **kwargs: object) -> str:
        raise LocalEntryNotFoundError("check your connection")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    monkeypatch.setattr(models_store, "HF_ENDPOINT", "https://hf.example")
    with pytest.raises(DownloadError, match="LocalEntryNotFoundError: check your connection") as caught:
        download(tmp_path, ["amodal3r"], lambda _: None)
    message = str(caught.value)
    for relative in official_files():
        assert (
            f"https://hf.example/Sm0kyWu/Amodal3R/resolve/main/{relative}\n    -> {tmp_path.resolve() / relative}"
            in message
        )


def test_hf_hub_offline_asks_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("must not download"))
    monkeypatch.setattr(models_store, "urlopen", lambda *a, **k: pytest.fail("must not download"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set") as caught:
        download(tmp_path, ["amodal3r", "dinov2"], lambda _: None)
    assert str(tmp_path.resolve() / "pipeline.json") in str(caught.value)
    assert str(tmp_path.resolve() / DINOV2) in str(caught.value)


def test_hugging_face_cancel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def slow(repo_id: str, filename: str, *, tqdm_class: type, **kwargs: object) -> str:
        tqdm_class(total=100).update(10)
        pytest.fail("the progress bar should have raised")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", slow)
    events: list[DownloadProgress] = []
    with pytest.raises(Cancelled):
        download(tmp_path, ["amodal3r"], events.append, cancelled=lambda: bool(events) and events[-1].bytes_done > 0)


def test_unknown_component(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model component"):
        download(tmp_path, ["sam_vit_x"], lambda _: None)

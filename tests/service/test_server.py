"""The reconstruction server as a real process on loopback, through the real stdlib client."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

from amodal3r.api.client import (
    Client,
    LocalServer,
    ServerError,
    Upload,
    launch_server,
    view_uploads,
)
from amodal3r.api.protocol import (
    CANCELLED,
    DONE,
    FAILED,
    STATE_FILE,
    JobParams,
    SegmentParams,
)
from amodal3r.service.job_store import INTERRUPTED

EXAMPLE = REPO_ROOT / "examples" / "mug_behind_box"
VIEW = {
    "image": EXAMPLE / "image.png",
    "target_mask": EXAMPLE / "target_mask.png",
    "occluder_mask": EXAMPLE / "occluder_mask.png",
}
FAST = {"structure_steps": 2, "slat_steps": 2, "texture_size": 256, "faces": 5000}
UPLOAD_LIMIT_MB = 4


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from amodal3r.pipelines.segment import write_random_sam

    return write_random_sam(tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth", kind="vit_b", seed=0)


def start(model_dir: Path, data_dir: Path, sam: Path | None = None, token: str = "test-token") -> LocalServer:
    extra = ["--device", "cpu", "--max-upload-mb", str(UPLOAD_LIMIT_MB)]
    if sam is not None:
        extra += ["--sam-checkpoint", f"vit_b={sam}"]
    return launch_server(
        sys.executable, model_dir, data_dir, token=token, extra_args=extra, env={"OMP_NUM_THREADS": "2"}
    )


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, sam_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    process = start(tiny_model_dir, tmp_path_factory.mktemp("server-data"), sam_checkpoint)
    yield process
    process.stop()


def wait_final(client: Client, job_id: str, timeout: float = 300.0, on_status=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.job(job_id)
        if on_status is not None:
            on_status(status)
        if status.final:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def raw_request(
    url: str, path: str, token: str | None, body: bytes | None = None, content_type: str | None = None
) -> tuple[int, dict]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url + path, data=body, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_startup_reports_address_and_state(server: LocalServer) -> None:
    client = server.client()
    assert client.health()["protocol"] == 1
    info = client.info()
    assert info["device"] == "cpu" and "amodal3r" in info["models"]["present"]
    assert info["memory"]["process_rss_bytes"] > 0
    data_dir = Path(server.process.args[server.process.args.index("--data-dir") + 1])
    state = json.loads((data_dir / STATE_FILE).read_text())
    assert state["url"] == server.url and state["pid"] == server.process.pid
    openapi = json.loads(client.request("GET", "/openapi.json")[0])
    assert "/v1/jobs" in openapi["paths"] and "/v1/segment" in openapi["paths"]


def test_three_jobs_run_in_order_with_monotonic_progress(server: LocalServer) -> None:
    client = server.client()
    jobs = [client.submit([VIEW], JobParams(seed=seed, name=f"job{seed}", **FAST)) for seed in range(3)]
    assert [j.state for j in jobs] == ["queued"] * 3
    seen: dict[str, list[float]] = {j.id: [] for j in jobs}
    final = {}
    while len(final) < 3:
        for job in jobs:
            if job.id not in final:
                status = client.job(job.id)
                seen[job.id].append(status.progress)
                if status.final:
                    final[job.id] = status
        time.sleep(0.05)
    for job in jobs:
        status = final[job.id]
        assert status.state == DONE, status.error
        assert seen[job.id] == sorted(seen[job.id]), "progress went backwards"
        assert len(set(seen[job.id])) >= 4, "progress was not reported along the way"
        assert "variant0.glb" in status.results
    ordered = [final[j.id] for j in jobs]
    assert ordered[0].finished <= ordered[1].started and ordered[1].finished <= ordered[2].started
    data, _ = client.request("GET", f"/jobs/{jobs[0].id}/results/variant0.glb")
    assert data[:4] == b"glTF"
    listed = [j.id for j in client.jobs()]
    assert listed[:3] == [j.id for j in reversed(jobs)]


def test_cancel_during_sampling(server: LocalServer) -> None:
    client = server.client()
    job = client.submit([VIEW], JobParams(structure_steps=200, slat_steps=2, texture_size=256))
    cancelled_at: list[int] = []

    def cancel_once_sampling(status) -> None:
        if status.stage == "structure" and status.step >= 1 and not cancelled_at:
            cancelled_at.append(client.cancel(job.id).step)

    status = wait_final(client, job.id, on_status=cancel_once_sampling)
    assert status.state == CANCELLED and status.results == []
    assert cancelled_at, "the job never reached the structure sampler"
    assert status.step <= cancelled_at[0] + 2, "the sampler went on long after the cancel"


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def test_bad_requests_get_clear_4xx(server: LocalServer) -> None:
    status, reply = raw_request(server.url, "/v1/jobs", token=None)
    assert status == 401 and "Authorization: Bearer" in reply["detail"]
    status, reply = raw_request(server.url, "/v1/jobs", token="not-the-token")
    assert status == 403 and "wrong token" in reply["detail"]

    client = server.client()
    uploads = view_uploads([VIEW])
    corrupt = [Upload(u.field, u.filename, u.data[:200] if u.field == "view0_image" else u.data) for u in uploads]
    with pytest.raises(ServerError) as error:
        client.submit(corrupt, JobParams(**FAST))
    assert error.value.status == 422 and "view0_image (image.png)" in error.value.detail

    small_mask = _png(np.zeros((50, 60), np.uint8))
    wrong_size = [
        Upload(u.field, u.filename, small_mask if u.field == "view0_target_mask" else u.data) for u in uploads
    ]
    with pytest.raises(ServerError) as error:
        client.submit(wrong_size, JobParams(**FAST))
    assert (
        error.value.status == 422
        and "60x50" in error.value.detail
        and "view0_target_mask (target_mask.png)" in error.value.detail
    )

    width, height = Image.open(VIEW["image"]).size
    empty_target = [
        Upload(
            u.field, u.filename, _png(np.zeros((height, width), np.uint8)) if u.field == "view0_target_mask" else u.data
        )
        for u in uploads
    ]
    with pytest.raises(ServerError) as error:
        client.submit(empty_target, JobParams(**FAST))
    assert error.value.status == 422 and "target mask is empty" in error.value.detail

    oversize = uploads + [Upload("view1_image", "big.png", os.urandom(UPLOAD_LIMIT_MB * 2**20 + 1))]
    with pytest.raises(ServerError) as error:
        client.submit(oversize, JobParams(**FAST))
    assert error.value.status == 413 and f"at most {UPLOAD_LIMIT_MB} MiB" in error.value.detail

    with pytest.raises(ServerError) as error:
        client.post_multipart("/jobs", {"params": '{"steps": 3}'}, uploads)
    assert error.value.status == 422 and "unknown job params field(s): steps" in error.value.detail
    with pytest.raises(ServerError) as error:
        client.post_multipart("/jobs", {"params": "{}"}, [Upload("view0_target_mask", "m.png", uploads[1].data)])
    assert error.value.status == 422 and "no view0_image" in error.value.detail
    with pytest.raises(ServerError) as error:
        client.job("0" * 32)
    assert error.value.status == 404
    with pytest.raises(ServerError) as error:
        client.request("GET", f"/jobs/{'0' * 31}/results/..%2F..%2Ftoken")
    assert error.value.status == 404
    assert not any("Traceback" in line for line in server.output)


def test_segment_reuses_the_cached_embedding(server: LocalServer) -> None:
    client = server.client()
    image = Path(VIEW["image"]).read_bytes()
    params = SegmentParams(points=[[300.0, 260.0]], labels=[1], model="vit_b")
    _, first = client.segment(params, image=image)
    again = SegmentParams(
        points=[[300.0, 260.0], [100.0, 100.0]], labels=[1, 0], model="vit_b", image_id=first.image_id
    )
    second_png, second = client.segment(again)
    assert not first.embedding_cached and second.embedding_cached
    assert second.seconds < first.seconds / 3
    mask = np.asarray(Image.open(io.BytesIO(second_png)))
    assert mask.shape == np.asarray(Image.open(VIEW["image"])).shape[:2]
    assert set(np.unique(mask)) <= {0, 255}
    with pytest.raises(ServerError) as error:
        client.segment(SegmentParams(points=[[1.0, 1.0]], labels=[1], model="vit_h", image_id=first.image_id))
    assert error.value.status == 409 and "sam_vit_h" in error.value.detail


def test_a_non_loopback_host_warns_and_still_needs_the_token(tiny_model_dir: Path, tmp_path: Path) -> None:
    process = launch_server(
        sys.executable,
        tiny_model_dir,
        tmp_path / "data",
        token="test-token",
        extra_args=["--device", "cpu", "--host", "0.0.0.0"],
    )
    try:
        assert any("warning: listening on 0.0.0.0" in line for line in process.output), process.output
        port = process.url.rsplit(":", 1)[1]
        status, reply = raw_request(f"http://127.0.0.1:{port}", "/v1/health", token=None)
        assert status == 401 and "Authorization: Bearer" in reply["detail"]
        status, _ = raw_request(f"http://127.0.0.1:{port}", "/v1/health", token="test-token")
        assert status == 200
    finally:
        process.stop()


def test_download_models_then_reconstruct(tiny_model_dir: Path, tmp_path: Path, file_server) -> None:
    """An empty model folder, the Hub stood in for on loopback (huggingface_hub reads HF_ENDPOINT): the
    download's progress shows through the protocol, then the folder serves jobs (with the tiny image
    encoder placed by hand, as a user may place DINOv2)."""
    for file in tiny_model_dir.rglob("*"):
        if file.is_file():
            file_server.files[f"/Sm0kyWu/Amodal3R/resolve/main/{file.relative_to(tiny_model_dir)}"] = file.read_bytes()
    process = launch_server(
        sys.executable,
        tmp_path / "model",
        tmp_path / "data",
        extra_args=["--device", "cpu"],
        env={"HF_ENDPOINT": file_server.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")},
    )
    try:
        client = process.client()
        assert "amodal3r" not in client.info()["models"]["present"]
        with pytest.raises(ServerError) as error:
            client.download_models(["everything"])
        assert error.value.status == 422 and "amodal3r" in error.value.detail
        assert client.download_models(["amodal3r"])["state"] == "running"
        seen = []
        deadline = time.monotonic() + 120
        while (status := client.download_status())["state"] == "running" and time.monotonic() < deadline:
            seen.append(status["progress"])
            time.sleep(0.02)
        assert status["state"] == "done", status
        assert any(p and p["files_total"] > 1 for p in seen)
        assert "amodal3r" in client.info()["models"]["present"]
        for name in ("image_encoder.json", "dinov2_vitl14_reg4_pretrain.safetensors"):
            shutil.copy(tiny_model_dir / name, tmp_path / "model" / name)
        assert wait_final(client, client.submit([VIEW], JobParams(**FAST)).id).state == DONE
    finally:
        process.stop()


def test_restart_serves_finished_results_and_fails_the_interrupted_job(tiny_model_dir: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = start(tiny_model_dir, data_dir)
    try:
        client = first.client()
        done = wait_final(client, client.submit([VIEW], JobParams(**FAST)).id)
        assert done.state == DONE
        running = client.submit([VIEW], JobParams(structure_steps=500, slat_steps=2, texture_size=256))
        wait_until = time.monotonic() + 120
        while client.job(running.id).stage != "structure" and time.monotonic() < wait_until:
            time.sleep(0.05)
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait()
    finally:
        first.stop()

    second = start(tiny_model_dir, data_dir)
    try:
        client = second.client()
        restored = client.job(done.id)
        assert restored.state == DONE and restored.results == done.results
        glb, _ = client.request("GET", f"/jobs/{done.id}/results/variant0.glb")
        assert glb[:4] == b"glTF"
        interrupted = client.job(running.id)
        assert interrupted.state == FAILED and interrupted.error == INTERRUPTED
        assert not list((data_dir / "jobs").rglob("*.tmp"))
    finally:
        second.stop()
    assert second.process.returncode == 0 and not (data_dir / STATE_FILE).exists(), "SIGTERM left server.json"


def test_uploads_and_results_are_private(server: LocalServer) -> None:
    """Files 0600 in 0700 folders: the data folder holds the user's photos and models."""
    client = server.client()
    job = wait_final(client, client.submit([VIEW], JobParams(**FAST)).id)
    assert job.state == DONE, job.error
    data_dir = Path(server.process.args[server.process.args.index("--data-dir") + 1])
    folder = data_dir / "jobs" / job.id
    for path in [data_dir / "jobs", folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    assert {p.name for p in (folder / "results").iterdir()} == set(job.results)

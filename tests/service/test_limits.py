"""The request guard and the limits, in-process: every refusal is a 4xx with a reason, slow clients are
dropped, a full disk is a 507 that leaves nothing, a dead worker shows in /v1/health."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from faults import small_disk
from inprocess import Running, serving
from PIL import Image

from amodal3r.api.client import ServerError, Upload, encode_multipart, view_uploads
from amodal3r.api.protocol import MAX_SEGMENT_POINTS, JobParams
from amodal3r.service.images import ImageStore
from amodal3r.service.worker import Worker

EXAMPLE = REPO_ROOT / "examples" / "mug_behind_box"
VIEW = {"image": EXAMPLE / "image.png", "target_mask": EXAMPLE / "target_mask.png"}
LIMIT_MB = 1


@pytest.fixture(scope="module")
def running(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = {"max_upload_bytes": LIMIT_MB * 2**20, "header_timeout": 1.0, "body_timeout": 1.0}
    with serving(tiny_model_dir, tmp_path_factory.mktemp("limits"), **settings) as server:
        yield server


def detail(body: bytes) -> str:
    return json.loads(body)["detail"]


def test_one_bearer_token_in_any_case(running: Running) -> None:
    assert running.request("GET", "/v1/health", [("Authorization", "bearer test-token")])[0] == 200
    assert running.request("GET", "/v1/health", [("Authorization", "BEARER  test-token")])[0] == 200
    status, body = running.request(
        "GET", "/v1/health", [("Authorization", "Bearer test-token"), ("Authorization", "Bearer other")]
    )
    assert status == 400 and detail(body) == "2 Authorization headers: send exactly one"
    status, body = running.request("GET", "/v1/health", [("Authorization", "Basic dGVzdA==")])
    assert status == 401 and "Authorization: Bearer" in detail(body)


def test_the_host_header_must_name_this_server(running: Running, tiny_model_dir: Path, tmp_path: Path) -> None:
    for host in ("127.0.0.1", f"127.0.0.1:{running.port}", f"localhost:{running.port}", "[::1]:80"):
        assert running.request("GET", "/v1/health", [("Host", host)])[0] == 200, host
    status, body = running.request("GET", "/v1/health", [("Host", "attacker.example:80")])
    assert status == 400 and "--allow-host attacker.example" in detail(body)
    with serving(tiny_model_dir, tmp_path / "data", allow_hosts=["studio.lan"]) as other:
        assert other.request("GET", "/v1/health", [("Host", "Studio.LAN:8080")])[0] == 200
        assert other.request("GET", "/v1/health", [("Host", "attacker.example")])[0] == 400


def chunks(total: int, piece: int = 1 << 16):
    for start in range(0, total, piece):
        yield b"\0" * min(piece, total - start)


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/images", "/v1/segment", "/v1/models/download"])
def test_a_chunked_body_over_the_limit_is_413(running: Running, path: str) -> None:
    """Issue 12: 400 with an empty reason on the multipart routes, 500 _TooLarge on the download route."""
    head = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
    content = "multipart/form-data; boundary=b" if path != "/v1/models/download" else "application/json"
    body = [head, *chunks(2 * LIMIT_MB * 2**20)]
    status, reply = running.request("POST", path, [("Content-Type", content)], body, chunked=True)
    assert status == 413 and f"at most {LIMIT_MB} MiB" in detail(reply)


def test_malformed_parameters_are_refused_with_a_reason(running: Running) -> None:
    client = running.client()
    nested = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ServerError) as error:
        client.post_multipart("/jobs", {"params": nested}, view_uploads([VIEW]))
    assert error.value.status == 422 and "nested too deeply" in error.value.detail
    cases = {
        '{"points": [], "labels": [], "box": ["a", null, 3, 4]}': "box is [x0, y0, x1, y1] of numbers",
        '{"points": [], "labels": [], "box": [1e308, 0, 1e308, 5]}': "box is [x0, y0, x1, y1] of numbers",
        json.dumps({"points": [[1, 1]] * 2000, "labels": [1] * 2000}): f"at most {MAX_SEGMENT_POINTS} clicks",
        '{"points": [[1, NaN]], "labels": [1]}': "a point is [x, y] of numbers",
        '{"points": [[1, 1]], "labels": [1], "model": "vit_b"}': "send the image",
    }
    for params, reason in cases.items():
        with pytest.raises(ServerError) as error:
            client.post_multipart("/segment", {"params": params}, [])
        assert error.value.status == 422 and reason in error.value.detail, (params, error.value.detail)
    status, body = running.request("GET", "/v1/jobs?limit=many")
    assert status == 422 and "limit" in detail(body)
    body, _ = encode_multipart({"params": "{}"}, [Upload("view0_image", "x.png", b"\x89PNG")])
    status, reply = running.request("POST", "/v1/jobs", [("Content-Type", "multipart/form-data")], body)
    assert status == 400 and "boundary" in detail(reply)


def test_slow_clients_are_dropped(running: Running) -> None:
    """Headers must be complete in --header-timeout (1 s here), a body must not stall --body-timeout."""
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as silent:
        started = time.monotonic()
        assert silent.recv(100) == b"" and time.monotonic() - started < 5
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as trickle:
        started = time.monotonic()
        try:
            for byte in b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n":
                trickle.send(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            pass  # dropped while still sending
        assert trickle.recv(100) == b"" and time.monotonic() - started < 8
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as stalled:
        stalled.sendall(
            b"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer test-token\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000\r\n\r\n--b\r\n"
        )
        reply = b""
        while chunk := stalled.recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"stalled" in reply


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread is made to die
def test_a_dead_worker_shows_in_health_and_refuses_jobs(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12: the worker thread died and /v1/health still answered 200 while jobs queued forever."""

    def dies(self, job_id: str) -> None:
        raise SystemExit("the worker thread ends")

    with serving(tiny_model_dir, tmp_path / "data") as server:
        client = server.client()
        assert client.health()["worker"] == "alive"
        monkeypatch.setattr(Worker, "_take", dies)
        client.submit([VIEW], JobParams(structure_steps=1, slat_steps=1))
        deadline = time.monotonic() + 10
        while server.server.worker.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        status, body = server.request("GET", "/v1/health")
        assert status == 503 and "restart the server" in detail(body)
        with pytest.raises(ServerError) as error:
            client.submit([VIEW], JobParams())
        assert error.value.status == 503


@pytest.mark.parametrize("kind", ["tmpfs", "fake"])
def test_a_full_disk_at_submission_is_507_and_stores_nothing(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    with (
        small_disk(tmp_path / "disk", monkeypatch, size_kib=8192, kind=kind) as disk,
        serving(tiny_model_dir, disk.root) as server,
    ):
        client = server.client()
        disk.fill()
        for call in (
            lambda: client.submit([VIEW], JobParams()),
            lambda: client.upload_image(VIEW["image"].read_bytes()),
        ):
            with pytest.raises(ServerError) as error:
                call()
            assert error.value.status == 507, error.value.detail
            assert error.value.detail == f"the data folder's disk is full: free space in {disk.root}"
        assert list((disk.root / "jobs").iterdir()) == [] and client.jobs() == []
        assert list((disk.root / "images").iterdir()) == []
        disk.free()
        assert client.submit([VIEW], JobParams(structure_steps=1, slat_steps=1)).state == "queued"
        client.cancel(client.jobs()[0].id)


def png(size: tuple[int, int], value: int) -> bytes:
    from io import BytesIO

    out = BytesIO()
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_images_for_click_to_mask_expire_least_recently_used_first(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", max_count=3, max_bytes=10**9)
    ids = [store.put(png((8, 8), v)) for v in range(3)]
    time.sleep(0.01)
    assert store.path(ids[0]) is not None  # used again: now the most recent
    store.put(png((8, 8), 99))
    assert store.path(ids[1]) is None and store.path(ids[0]) is not None and len(store.ids) == 3
    by_bytes = ImageStore(tmp_path / "other", max_count=100, max_bytes=2 * len(png((64, 64), 1)) + 10)
    first = by_bytes.put(png((64, 64), 1))
    by_bytes.put(png((64, 64), 2))
    by_bytes.put(png((64, 64), 3))
    assert by_bytes.path(first) is None and len(by_bytes.ids) == 2
    newest = store.ids[0]
    assert ImageStore(tmp_path / "images", max_count=1).ids == [newest]  # the order survives a restart


def test_an_expired_image_id_answers_404(tiny_model_dir: Path, tmp_path: Path) -> None:
    with serving(tiny_model_dir, tmp_path / "data") as server:
        server.server.images = ImageStore(tmp_path / "data" / "images", max_count=1)
        client = server.client()
        first = client.upload_image(png((32, 32), 7))
        client.upload_image(png((32, 32), 8))
        params = json.dumps({"points": [[1, 1]], "labels": [1], "image_id": first, "model": "vit_b"})
        with pytest.raises(ServerError) as error:
            client.post_multipart("/segment", {"params": params}, [])
        assert error.value.status == 404 and "upload it again" in error.value.detail


def test_a_port_out_of_range_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "amodal3r.cli", "serve", "--model", str(tmp_path), "--port", "99999"]
        + ["--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        "--port 99999 is not a port: give 1..65535, or 0 for a free one"
    ], done.stderr

"""``amodal3r serve --ray``: the server's protocol on Ray Serve with two replicas, through the project's
own client; cancel, progress, and a replica killed mid-job. Plus the shipped ``serve.yaml``."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from gltf_checks import gltf_issues

from amodal3r.api.client import Client, LocalServer, ServerError, launch_server
from amodal3r.api.protocol import CANCELLED, DONE, JobParams, JobStatus

EXAMPLE = REPO_ROOT / "examples" / "mug_behind_box"
VIEW = {
    "image": EXAMPLE / "image.png",
    "target_mask": EXAMPLE / "target_mask.png",
    "occluder_mask": EXAMPLE / "occluder_mask.png",
}
FAST = {"structure_steps": 1, "slat_steps": 1, "texture_size": 64, "faces": 2000}
LIMIT = 100.0  # seconds any test waits for its jobs: each stays under two minutes


@pytest.fixture(scope="module")
def ray_server(
    ray_address: str, sparse_tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalServer, Path]]:
    data = tmp_path_factory.mktemp("ray-serve-data")
    server = launch_server(
        sys.executable,
        sparse_tiny_model_dir,
        data,
        token="ray-token",
        extra_args=["--ray", ray_address, "--replicas", "2"],
        startup_timeout=LIMIT,
    )
    yield server, data
    server.stop(grace=30)


def wait_final(client: Client, job_ids: list[str], on_status=None) -> dict[str, JobStatus]:
    deadline, final = time.monotonic() + LIMIT, {}
    while len(final) < len(job_ids):
        assert time.monotonic() < deadline, f"jobs not finished in {LIMIT} s: {set(job_ids) - set(final)}"
        for job_id in job_ids:
            if job_id not in final:
                status = client.job(job_id)
                if on_status is not None:
                    on_status(status)
                if status.final:
                    final[job_id] = status
        time.sleep(0.2)
    return final


def replica_of(data: Path, job_id: str) -> dict | None:
    try:
        return json.loads((data / "jobs" / job_id / "replica.json").read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.ray
def test_four_jobs_on_two_replicas_through_the_client(ray_server: tuple[LocalServer, Path], tmp_path: Path) -> None:
    server, data = ray_server
    client = server.client(timeout=60)
    assert client.health()["protocol"] == 1
    assert {"/v1/jobs", "/v1/place"} <= set(json.loads(client.request("GET", "/openapi.json")[0])["paths"])
    with pytest.raises(ServerError) as refused:
        Client(server.url, "wrong").info()
    assert refused.value.status == 403
    jobs = [client.submit([VIEW], JobParams(seed=seed, name=f"job{seed}", **FAST)) for seed in range(4)]
    final = wait_final(client, [job.id for job in jobs])
    for job in jobs:
        status = final[job.id]
        assert status.state == DONE, status.error
        assert status.results == ["variant0.glb", "variant0.png"] and status.progress == 1.0
    glb = client.download_result(jobs[3].id, "variant0.glb", tmp_path / "job3.glb")
    assert gltf_issues(glb)["numErrors"] == 0
    assert len({replica_of(data, job.id)["actor"] for job in jobs}) == 2, "both replicas should have run jobs"
    assert [job.id for job in client.jobs()][:4] == [job.id for job in reversed(jobs)]
    info = client.info()
    assert info["device"].startswith("ray: 2 replica(s)") and info["queue_length"] == 0


@pytest.mark.ray
def test_progress_shows_while_a_replica_works_and_cancel_stops_it(ray_server: tuple[LocalServer, Path]) -> None:
    server, _ = ray_server
    client = server.client(timeout=60)
    job = client.submit([VIEW], JobParams(structure_steps=300, slat_steps=1, texture_size=64))
    steps: list[int] = []

    def cancel_once_sampling(status: JobStatus) -> None:
        if status.stage == "structure" and status.step >= 1:
            steps.append(status.step)
            if len(steps) == 2:  # two looks a moment apart: the step moved, then cancel
                client.cancel(job.id)

    status = wait_final(client, [job.id], cancel_once_sampling)[job.id]
    assert status.state == CANCELLED and status.results == []
    assert len(steps) >= 2 and steps == sorted(steps)
    assert status.step < 300, "the sampler ran to the end despite the cancel"


@pytest.mark.ray
def test_a_replica_killed_mid_job_runs_the_job_again_elsewhere(ray_server: tuple[LocalServer, Path]) -> None:
    server, data = ray_server
    client = server.client(timeout=60)
    params = {**FAST, "structure_steps": 40}
    jobs = [client.submit([VIEW], JobParams(seed=10 + i, **params)) for i in range(2)]
    victim: dict = {}

    def kill_first_replica_once_sampling(status: JobStatus) -> None:
        replica = replica_of(data, status.id)
        if not victim and status.stage == "structure" and status.step >= 1 and replica:
            os.kill(replica["pid"], signal.SIGKILL)  # a Serve replica of this test's Ray cluster
            victim.update(replica, job=status.id)

    final = wait_final(client, [job.id for job in jobs], kill_first_replica_once_sampling)
    assert victim, "no job reached the sampler"
    for job in jobs:
        assert final[job.id].state == DONE, final[job.id].error
    notices = final[victim["job"]].notices
    assert any("the replica running this job stopped" in n and "ran again" in n for n in notices), notices
    assert replica_of(data, victim["job"])["pid"] != victim["pid"]


def test_shipped_serve_config_builds_the_application() -> None:
    """``server/serve.yaml`` passes Ray Serve's own schema and its args build both deployments."""
    from ray.serve.schema import ServeDeploySchema

    from amodal3r.service.ray_serve import INGRESS, RECONSTRUCTOR, build_app

    config = yaml.safe_load((REPO_ROOT / "server" / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "amodal3r.service.ray_serve:build_app"
    app = build_app(application["args"])
    ingress = app._bound_deployment
    assert ingress.name == INGRESS
    reconstructor = ingress.init_args[0]._bound_deployment
    assert reconstructor.name == RECONSTRUCTOR
    scaling = reconstructor._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 8)
    assert (
        reconstructor.ray_actor_options["num_gpus"] == 1 and reconstructor._deployment_config.max_ongoing_requests == 1
    )

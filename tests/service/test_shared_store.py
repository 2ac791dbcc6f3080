"""The job store the Ray Serve ingress and replicas share: two stores on one folder, one truth."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from amodal3r.api.protocol import CANCELLED, DONE, QUEUED, RUNNING, JobStatus
from amodal3r.service.shared_store import SharedJobStore


def queued_job(store: SharedJobStore) -> str:
    """A queued job's record, written as the single-process store writes it."""
    job_id = secrets.token_hex(16)
    folder = store.folder(job_id)
    (folder / "results").mkdir(parents=True)
    status = JobStatus(id=job_id, state=QUEUED, created=time.time(), params={}, views=["a.png"], stage=QUEUED)
    (folder / "job.json").write_text(json.dumps(status.to_dict()))
    return job_id


def test_every_store_sees_every_change(tmp_path: Path) -> None:
    ingress, replica = SharedJobStore(tmp_path), SharedJobStore(tmp_path)
    job_id = queued_job(ingress)
    assert replica.get(job_id).state == QUEUED  # created after the replica's store was made
    assert replica.claim(job_id).state == RUNNING
    assert replica.claim(job_id) is None, "a job is claimed once"
    replica.update(job_id, stage="structure", step=3, total=25)
    seen = ingress.get(job_id)
    assert (seen.state, seen.stage, seen.step) == (RUNNING, "structure", 3)
    replica.update(job_id, persist=False, step=4)  # progress between writes stays with its replica
    assert ingress.get(job_id).step == 3
    assert [s.id for s in ingress.list()] == [job_id]


def test_cancel_reaches_the_replica_and_a_queued_job_ends_at_once(tmp_path: Path) -> None:
    ingress, replica = SharedJobStore(tmp_path), SharedJobStore(tmp_path)
    running, waiting = queued_job(ingress), queued_job(ingress)
    replica.claim(running)
    ingress.request_cancel(running)
    assert replica.cancel_requested(running) and ingress.get(running).state == RUNNING
    ingress.request_cancel(waiting)
    assert ingress.get(waiting).state == CANCELLED and replica.claim(waiting) is None


def test_requeue_after_a_dead_replica_keeps_the_reason_and_spares_finished_jobs(tmp_path: Path) -> None:
    store = SharedJobStore(tmp_path)
    lost, finished = queued_job(store), queued_job(store)
    for job_id in (lost, finished):
        store.claim(job_id)
        store.update(job_id, stage="slat", step=2, total=2, progress=0.7)
    store.update(finished, state=DONE, results=["variant0.glb"])
    again = store.requeue(lost, "the replica running this job stopped; it ran again")
    assert (again.state, again.step, again.progress) == (QUEUED, 0, 0.0)
    assert again.notices == ["the replica running this job stopped; it ran again"]
    assert store.requeue(finished, "no") is None and store.get(finished).results == ["variant0.glb"]
    store.record_replica(lost, {"actor": "SERVE_REPLICA::x", "pid": 1})
    assert store.replica(lost)["actor"] == "SERVE_REPLICA::x" and store.replica(finished) is None

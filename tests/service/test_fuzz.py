"""The HTTP API fuzzed from its own OpenAPI document with schemathesis: valid and invalid requests for
every operation, and not one server error (5xx) or reply outside the documented statuses, media
types and schemas.

Bounded: ``EXAMPLES`` requests per operation and generation mode, and ``BUDGET_S`` seconds in all
(examples past the budget are generated but not sent; the test then asserts each operation was still
exercised). The server runs as a real process with the network closed to it (offline Hub, a proxy
that refuses), so a generated valid download request cannot fetch anything.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from amodal3r.api.client import launch_server

EXAMPLES = 25
BUDGET_S = 45.0
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
POSTED = ("/v1/jobs", "/v1/place", "/v1/images", "/v1/segment", "/v1/models/download")
NO_NETWORK = {"HF_HUB_OFFLINE": "1", "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}


def fuzz(operation, mode: GenerationMode, auth: dict[str, str], deadline: float, sent: Counter) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def one(case) -> None:
        if time.monotonic() > deadline:
            return
        case.call_and_validate(headers=auth, checks=CHECKS, timeout=30)
        sent[operation.label] += 1

    one()


def check_document(document: dict) -> None:
    """The five POST bodies are described, and the token is required of every route."""
    paths = document["paths"]
    bodies = {path: paths[path]["post"]["requestBody"]["content"] for path in POSTED}
    assert set(bodies["/v1/jobs"]["multipart/form-data"]["schema"]["properties"]) >= {"params", "view7_mask"}
    assert bodies["/v1/jobs"]["multipart/form-data"]["encoding"] == {"params": {"contentType": "application/json"}}
    assert bodies["/v1/segment"]["multipart/form-data"]["schema"]["properties"]["params"]["properties"]["points"]
    assert bodies["/v1/images"]["multipart/form-data"]["schema"]["required"] == ["image"]
    place = bodies["/v1/place"]["multipart/form-data"]["schema"]
    assert place["required"] == ["params", "mesh", "view0_image"] and "view1_image" not in place["properties"]
    assert "components" in bodies["/v1/models/download"]["application/json"]["schema"]["properties"]
    assert document["security"] == [{"bearer": []}]
    assert set(paths["/v1/jobs"]["post"]["responses"]) == {
        "202",
        "400",
        "401",
        "403",
        "408",
        "413",
        "422",
        "503",
        "507",
    }


def test_the_api_survives_fuzzing_from_its_openapi_document(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = launch_server(
        sys.executable,
        tiny_model_dir,
        tmp_path / "data",
        token="fuzz-token",
        extra_args=["--device", "cpu", "--max-upload-mb", "2"],
        env={**NO_NETWORK, "NO_PROXY": "", "no_proxy": ""},
    )
    auth = {"Authorization": "Bearer fuzz-token"}
    try:
        document = json.loads(server.client().request("GET", "/openapi.json")[0])
        check_document(document)
        schema = schemathesis.openapi.from_url(f"{server.url}/v1/openapi.json", headers=auth)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == 13, [op.label for op in operations]
        sent: Counter = Counter()
        started = time.monotonic()
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(operation, mode, auth, started + BUDGET_S, sent)
        print(
            f"fuzzing: {sum(sent.values())} requests over {len(sent)} operations in {time.monotonic() - started:.1f} s"
        )
        assert set(sent) == {op.label for op in operations}, f"operations never reached: {sent}"
        assert server.alive() and not any("Traceback" in line for line in server.output), server.tail()
    finally:
        server.stop()

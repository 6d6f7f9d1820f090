"""No secret leaves DCU: not in its log, its events, its dead letters, its database or any
answer of its API, whatever the outcome of a request."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tests.e2e.helpers import stream_events
from tests.security.conftest import (
    API_TOKEN,
    FILE_PASSWORD,
    FILE_USER,
    HUB_PASSWORD,
    HUB_USER,
    PIPELINE_USER,
    REGISTRY_PASSWORD,
    REGISTRY_USER,
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    Reply,
    call,
    docker_auth,
    secret_forms,
    tree_bytes,
)
from tests.servers.dcu_process import DcuProcess
from tests.servers.images import PushedImages
from tests.servers.nats import NatsServer
from tests.servers.registry import Registry

pytestmark = pytest.mark.e2e


def registry_header(user: str, password: str, server: str) -> str:
    """``X-Registry-Auth`` as the engine edge builds it."""
    document = {"username": user, "password": password, "serveraddress": server}
    return base64.urlsafe_b64encode(json.dumps(document).encode()).decode()


def test_no_secret_appears_anywhere(
    pipeline_service: DcuProcess,
    pushed_images: PushedImages,
    registry: Registry,
    nats_server: NatsServer,
) -> None:
    service = pipeline_service
    answers: dict[str, bytes] = {}

    def ask(method: str, path: str, body: object = None, **kwargs: Any) -> Reply:
        reply = call(service, method, path, body, **kwargs)
        label = f"{method} {path} #{len(answers)} -> {reply.status}"
        answers[label] = reply.raw + json.dumps(reply.headers).encode()
        return reply

    # Given tasks that succeed, fail in the engine, and fail for their size elsewhere
    small = pushed_images["small"]
    ok = ask("POST", "/start", {"docker_image_name": small.reference}, token=API_TOKEN)
    assert ok.status == 200, ok.body
    missing_image = f"{registry.address}/dcu-missing:none"
    missing = ask("POST", "/start", {"docker_image_name": missing_image}, token=API_TOKEN)
    assert missing.status == 200, missing.body
    # and requests refused for a wrong token (holding the real one) and a registry
    wrong = ask(
        "POST",
        "/start",
        {"docker_image_name": small.reference},
        authorization=f"Bearer {API_TOKEN}-wrong",
    )
    assert wrong.status == 401, wrong.body
    refused = ask("POST", "/start", {"docker_image_name": "quay.io/x/y:1"}, token=API_TOKEN)
    assert refused.status == 400, refused.body
    ids = [ok.body["data"]["task_id"], missing.body["data"]["task_id"]]
    assert service.wait_terminal(ids[0], timeout=120)["state"] == "completed"
    failed = service.wait_terminal(ids[1], timeout=120)
    assert failed["state"] == "failed"
    assert "dcu-missing" in failed["error_message"]

    # When every kind of answer is fetched
    for task_id in ids:
        assert ask("GET", f"/status/{task_id}").status == 200
        assert ask("GET", f"/events/{task_id}").status == 200
        assert ask("GET", f"/events/{task_id}/stream").status == 200
    for path in (
        "/query?page_size=100",
        f"/query?username={PIPELINE_USER}",
        "/query?state=failed",
        "/openapi.json",
        "/health",
    ):
        assert ask("GET", path).status == 200, path
    assert ask("GET", "/nowhere").status == 404
    assert ask("DELETE", "/health").status == 405
    cleanup = ask("POST", "/cleanup", {"kind": "gzip", "timeout": 60}, token=API_TOKEN)
    assert cleanup.status == 200, cleanup.body
    assert ask("POST", "/cleanup", {"kind": "gzip"}).status == 401

    # and everything DCU wrote is collected
    nats = service.config["nats"]
    prefix, stream = nats["subject_prefix"], nats["stream"]
    events = stream_events(nats_server.url, stream, f"{prefix}.>")
    dead = stream_events(nats_server.url, stream, f"{prefix}.dead.>")
    log = service.log.read_bytes()
    places: dict[str, bytes] = {"service log": log}
    places.update(answers)
    for event in events:
        places[f"event seq {event['seq']}"] = json.dumps(event, ensure_ascii=False).encode()
    for letter in dead:
        places[f"dead letter seq {letter['seq']}"] = json.dumps(letter, ensure_ascii=False).encode()
    places.update(tree_bytes(service.workdir / "data", (".db", ".db-wal", ".db-shm")))
    # (proof that there was something to look at: the log is verbose, the failures are
    # in the stream and in the dead-letter subjects)
    assert b" DEBUG " in log
    assert f"by {PIPELINE_USER}".encode() in log
    assert {"uploaded", "failed"} <= {event.get("type") for event in events}
    assert dead, "the failed download left no dead letter"
    assert any(name.endswith(".db") for name in places)

    # Then no secret is in any of it, as such or base64-encoded
    secrets = secret_forms(
        S3_ACCESS_KEY,
        S3_SECRET_KEY,
        API_TOKEN,
        REGISTRY_USER,
        REGISTRY_PASSWORD,
        FILE_USER,
        FILE_PASSWORD,
        HUB_USER,
        HUB_PASSWORD,
    )
    secrets.update(
        {
            "registry auth (config)": docker_auth(REGISTRY_USER, REGISTRY_PASSWORD),
            "registry auth (file)": docker_auth(FILE_USER, FILE_PASSWORD),
            "registry auth (hub)": docker_auth(HUB_USER, HUB_PASSWORD),
            "X-Registry-Auth": registry_header(REGISTRY_USER, REGISTRY_PASSWORD, registry.address),
        }
    )
    leaks = [
        f"{label} in {place}"
        for place, content in places.items()
        for label, form in secrets.items()
        if form.encode() in content
    ]
    assert leaks == []
    # (and the config DCU was given really holds them, so the search looks for real values)
    config = (service.workdir / f"{service.name}.yaml").read_text()
    for value in (S3_ACCESS_KEY, S3_SECRET_KEY, API_TOKEN, REGISTRY_USER, REGISTRY_PASSWORD):
        assert value in config

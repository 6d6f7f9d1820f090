"""The registry allow-list: refused at the gateway, and again by the download stage."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest

from bus import Bus
from events.reference import parse_reference, registry_refusal
from events.schema import Event, Requested
from kernel.settings import NatsSettings
from tests.e2e.helpers import stream_events
from tests.security.conftest import GATEWAY_ALLOWED, JENKINS_TOKEN, call
from tests.servers.dcu_process import DcuProcess
from tests.servers.nats import NatsServer

ALLOWED_TEXT = "127.0.0.1:5000, registry.example:5000, docker.io"


@pytest.mark.parametrize(
    ("reference", "host"),
    [
        pytest.param("nginx", None, id="hub-shorthand"),
        pytest.param("library/nginx:1.25", None, id="hub-path"),
        pytest.param("docker.io/library/nginx", None, id="hub-explicit"),
        pytest.param("127.0.0.1:5000/app@sha256:" + "a" * 64, None, id="host-port"),
        pytest.param("REGISTRY.example:5000/app:1", None, id="host-case"),
        pytest.param("quay.io/evil/image:1", "quay.io", id="other-host"),
        pytest.param("127.0.0.1:5001/app", "127.0.0.1:5001", id="other-port"),
        pytest.param("registry.example/app", "registry.example", id="no-port"),
        pytest.param("index.docker.io/library/nginx", "index.docker.io", id="hub-alias"),
    ],
)
def test_the_rule(reference: str, host: str | None) -> None:
    allowed = [entry.lower() for entry in GATEWAY_ALLOWED]
    refusal = registry_refusal(parse_reference(reference), allowed)
    if host is None:
        assert refusal is None
    else:
        assert refusal == f"registry {host} is not allowed; allowed: {ALLOWED_TEXT}"
    assert registry_refusal(parse_reference(reference), []) is None  # empty: any


@pytest.mark.parametrize(
    "reference", ["quay.io/evil/image:1", "127.0.0.1:5001/app", "ghcr.io/x/y@sha256:" + "b" * 64]
)
def test_the_gateway_refuses_other_registries(auth_gateway: DcuProcess, reference: str) -> None:
    before = call(auth_gateway, "GET", "/query?page_size=1").body["data"]["total"]
    reply = call(
        auth_gateway, "POST", "/start", {"docker_image_name": reference}, token=JENKINS_TOKEN
    )
    assert reply.status == 400, reply.body
    assert reply.body["code"] == 40000
    host = parse_reference(reference).registry_host
    assert reply.body["message"] == f"registry {host} is not allowed; allowed: {ALLOWED_TEXT}"
    assert call(auth_gateway, "GET", "/query?page_size=1").body["data"]["total"] == before


def test_the_gateway_takes_allowed_registries(auth_gateway: DcuProcess) -> None:
    for reference in ("nginx:latest", "Registry.Example:5000/app:1"):
        body = {"docker_image_name": reference}
        reply = call(auth_gateway, "POST", "/start", body, token=JENKINS_TOKEN)
        assert reply.status == 200, reply.body


async def _publish(url: str, prefix: str, event: Event) -> None:
    nc = await nats.connect(url)
    try:
        await Bus(nc, NatsSettings(subject_prefix=prefix)).publish(event)
    finally:
        await nc.close()


def test_a_forged_event_for_another_registry_fails_at_download(
    pipeline_service: DcuProcess, nats_server: NatsServer
) -> None:
    # Given a `requested` event published straight to NATS, past the gateway's check
    nats_config = pipeline_service.config["nats"]
    event = Event(
        task_id=str(uuid.uuid4()),
        payload=Requested(username="mallory", docker_image_name="quay.io/evil/image:1"),
    )
    asyncio.run(_publish(nats_server.url, nats_config["subject_prefix"], event))
    # When the download stage takes it
    task = pipeline_service.wait_terminal(event.task_id, timeout=60)
    # Then the task fails with the allow-list's reason, before any pull was announced
    allowed = ", ".join(pipeline_service.config["docker"]["allowed_registries"])
    assert task["state"] == "failed"
    assert task["error_message"] == (
        f"download failed: registry quay.io is not allowed; allowed: {allowed}"
    )
    events = stream_events(
        nats_server.url,
        nats_config["stream"],
        f"{nats_config['subject_prefix']}.task.{event.task_id}.>",
    )
    assert [e["type"] for e in events] == ["requested", "failed"]

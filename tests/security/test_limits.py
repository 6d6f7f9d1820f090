"""Limits: unfinished tasks per user (429) and the maximum image size."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.helpers import stream_events
from tests.security.conftest import (
    API_TOKEN,
    GATEWAY_TOKENS,
    LIMITED_TOKEN,
    MAX_IMAGE_BYTES,
    OTHER_TOKEN,
    call,
    gateway_config,
)
from tests.servers.dcu_process import DcuProcess
from tests.servers.images import PushedImages
from tests.servers.nats import NatsServer

pytestmark = pytest.mark.e2e

IMAGE = "127.0.0.1:5000/team/app:1.0"
USER_LIMIT = 2


@pytest.fixture(scope="module")
def limited_gateway(
    nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DcuProcess]:
    """A gateway without workers: every task it records stays idle, so it stays counted."""
    config = gateway_config(
        nats_server,
        auth={"enabled": True, "tokens": GATEWAY_TOKENS},
        server={"max_active_tasks_per_user": USER_LIMIT},
    )
    workdir = tmp_path_factory.mktemp("limited-gateway")
    service = DcuProcess(workdir, config, ["gateway"], name="limited-gateway").start()
    try:
        yield service
    finally:
        service.stop()


def test_a_user_at_the_limit_gets_429_and_others_do_not(limited_gateway: DcuProcess) -> None:
    service = limited_gateway
    # Given a user with as many unfinished tasks as allowed (no worker runs them)
    started = []
    for _ in range(USER_LIMIT):
        reply = call(service, "POST", "/start", {"docker_image_name": IMAGE}, token=LIMITED_TOKEN)
        assert reply.status == 200, reply.body
        started.append(reply.body["data"]["task_id"])
    for task_id in started:
        assert call(service, "GET", f"/status/{task_id}").body["data"]["state"] == "idle"
    # When the user asks for one more
    reply = call(service, "POST", "/start", {"docker_image_name": IMAGE}, token=LIMITED_TOKEN)
    # Then it is refused with 429 in the envelope, and nothing is created
    assert reply.status == 429, reply.body
    assert reply.body["code"] == 42900
    assert reply.body["status"] == 429
    assert reply.body["data"] is None
    assert reply.body["message"] == (
        f"user limited already has {USER_LIMIT} unfinished tasks, the limit is {USER_LIMIT}; "
        "try again when one has ended"
    )
    # (a gateway alone writes no rows: the tasks are the requested events in the stream)
    nats = service.config["nats"]
    requested = stream_events(
        nats["url"], nats["stream"], f"{nats['subject_prefix']}.task.*.requested"
    )
    assert [e["payload"]["username"] for e in requested].count("limited") == USER_LIMIT
    # while another user is not held back by it
    reply = call(service, "POST", "/start", {"docker_image_name": IMAGE}, token=OTHER_TOKEN)
    assert reply.status == 200, reply.body


def test_an_image_over_the_size_limit_fails_the_task(
    pipeline_service: DcuProcess, pushed_images: PushedImages
) -> None:
    # Given an image larger than workers.max_image_bytes
    image = pushed_images["nested"]
    assert image.size_bytes > MAX_IMAGE_BYTES
    # When a task asks for it
    body = {"docker_image_name": image.reference}
    reply = call(pipeline_service, "POST", "/start", body, token=API_TOKEN)
    assert reply.status == 200, reply.body
    task = pipeline_service.wait_terminal(reply.body["data"]["task_id"], timeout=120)
    # Then it fails at download, naming the image, its size and the limit
    assert task["state"] == "failed"
    # (the registry engine judges the layers it would fetch before fetching them)
    message = task["error_message"]
    assert message.startswith(f"download failed: image {image.reference} has "), message
    assert message.endswith(
        f"bytes of compressed layers, over the limit of {MAX_IMAGE_BYTES} bytes"
    )
    size = int(message.removeprefix(f"download failed: image {image.reference} has ").split()[0])
    assert size > MAX_IMAGE_BYTES
    assert task["gzip_file_name"] is None

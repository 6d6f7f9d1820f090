"""``POST /bundle`` and the ``format`` of a start, in process: what is refused, with which
message, and what an accepted request publishes and ``/status`` shows (the packaging
itself is in ``tests/loaders/test_matrix.py``)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from events.formats import ArchiveFormat
from events.schema import Event, EventType, Requested
from gateway.keys import BUS
from kernel.settings import Settings
from tests.gateway.conftest import Gateway

IMAGES = ["127.0.0.1:5000/team/app:1.0", "127.0.0.1:5000/team/tool:2.0", "busybox:1.36"]


def _user() -> str:
    return f"bundler-{uuid.uuid4().hex[:8]}"


async def _requested(gateway: Gateway, task_id: str) -> Requested:
    event = await gateway.app[BUS].last_event(task_id, EventType.REQUESTED)
    assert isinstance(event, Event)
    assert isinstance(event.payload, Requested)
    return event.payload


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            {"images": []},
            "images must not be empty: a bundle holds at least one image",
            id="empty",
        ),
        pytest.param(
            {"images": "nginx"}, "images must be a list of image references", id="not-a-list"
        ),
        pytest.param(
            {"images": [f"r/app:{n}" for n in range(21)]},
            "images holds 21 references; at most 20 allowed (server.max_bundle_images)",
            id="too-many",
        ),
        pytest.param(
            {"images": ["nginx:1.27", "redis", "docker.io/library/nginx:1.27"]},
            "images[2] (docker.io/library/nginx:1.27) names the same image as images[0] "
            "(nginx:1.27); list each image once",
            id="duplicate",
        ),
        pytest.param(
            {"images": ["nginx", "Bad:Ref"]},
            "images[1]: repository name must be lowercase",
            id="invalid-reference",
        ),
        pytest.param(
            {"images": ["nginx", 5]},
            "images[1]: must be a string",
            id="not-a-string",
        ),
        pytest.param(
            {"name": "../etc"},
            "name '../etc' must be 1-100 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit",
            id="unsafe-name",
        ),
        pytest.param(
            {"format": "zip"},
            "format 'zip' is not one of: docker-archive+gzip, docker-archive, oci-archive",
            id="unknown-format",
        ),
    ],
)
async def test_a_bad_bundle_is_a_400_naming_the_problem(
    gateway: Gateway, change: dict[str, Any], message: str
) -> None:
    body = {"username": _user(), "name": "release-1", "images": IMAGES, **change}

    status, answer = await gateway.post("/bundle", body)

    assert (status, answer) == (
        400,
        {"code": 40000, "status": 400, "message": message, "data": None},
    )


async def test_a_bundle_is_one_task_naming_its_images(gateway: Gateway) -> None:
    username = _user()
    status, answer = await gateway.post(
        "/bundle",
        {"username": username, "name": "release-1", "images": IMAGES, "format": "oci-archive"},
    )
    assert status == 200, answer
    task_id = answer["data"]["task_id"]

    # Then its requested event names the images in order, the format and the name
    requested = await _requested(gateway, task_id)
    assert requested.images == IMAGES
    assert requested.format is ArchiveFormat.OCI
    assert requested.docker_image_name == "release-1"
    # and /status shows them before and after the subscriber records the task
    for _ in range(2):
        status, answer = await gateway.get(f"/status/{task_id}")
        assert status == 200, answer
        data = answer["data"]
        assert data["docker_image_name"] == "release-1"
        assert data["format"] == "oci-archive"
        assert [image["docker_image_name"] for image in data["images"]] == IMAGES
        event = await gateway.app[BUS].last_event(task_id, EventType.REQUESTED)
        await gateway.record(event)


@pytest.mark.parametrize("fmt", [None, *ArchiveFormat])
async def test_a_start_records_its_format_or_the_configured_one(
    gateway: Gateway, fmt: ArchiveFormat | None
) -> None:
    body: dict[str, Any] = {"username": _user(), "docker_image_name": IMAGES[0]}
    if fmt is not None:
        body["format"] = fmt.value

    status, answer = await gateway.post("/start", body)

    assert status == 200, answer
    requested = await _requested(gateway, answer["data"]["task_id"])
    assert requested.format is (fmt or gateway.settings.storage.archive_format)
    assert requested.images is None


async def test_the_docker_engine_refuses_what_it_cannot_write(
    settings: Settings, gateway: Gateway
) -> None:
    settings.download.engine = "docker"
    bundle = {"username": _user(), "images": IMAGES[:1]}
    oci = {"username": _user(), "docker_image_name": IMAGES[0], "format": "oci-archive"}

    refused = [await gateway.post("/bundle", bundle), await gateway.post("/start", oci)]

    assert [answer["message"] for _, answer in refused] == [
        "a bundle needs download.engine registry; this service runs the docker engine",
        "format oci-archive needs download.engine registry; this service runs the docker engine",
    ]
    assert [status for status, _ in refused] == [400, 400]

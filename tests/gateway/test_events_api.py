"""The event routes' refusals, in process (the history and the live streams of real tasks
are in ``tests/e2e/test_events_api.py``)."""

from __future__ import annotations

import uuid

import pytest

from tests.gateway.conftest import Gateway


@pytest.mark.parametrize(
    ("path", "status", "fragment"),
    [
        pytest.param("/events/not-a-uuid", 400, "is not a UUID", id="bad-id"),
        pytest.param(f"/events/{uuid.uuid4()}", 404, "no events for task", id="unknown-task"),
        pytest.param(
            f"/events/{uuid.uuid4()}?include_progress=maybe",
            400,
            "include_progress must be true or false",
            id="bad-flag",
        ),
        pytest.param("/events/not-a-uuid/stream", 400, "is not a UUID", id="stream-bad-id"),
        pytest.param(
            f"/events/{uuid.uuid4()}/stream", 404, "no events for task", id="stream-unknown-task"
        ),
        pytest.param("/events/stream?type=exploded", 400, "is not one of", id="unknown-type"),
    ],
)
async def test_refusals_are_envelopes(
    gateway: Gateway, path: str, status: int, fragment: str
) -> None:
    got, body = await gateway.get(path)

    assert got == status, body
    assert set(body) == {"code", "status", "message", "data"}
    assert body["status"] == status and body["code"] != 0
    assert fragment in body["message"], body["message"]

"""``POST /start``'s ``Idempotency-Key`` rule, in process (a repeated or reused key, and
what a start publishes, are in ``tests/e2e/test_start.py``). The header is sent with
``http.client`` exactly as given: raw bytes, repeats kept."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway import start
from tests.e2e.helpers import post_start
from tests.gateway.conftest import Gateway

KEY = start.IDEMPOTENCY_HEADER
IMAGE = "127.0.0.1:5000/team/app:1.0"
RULE = "Idempotency-Key must be 1-200 printable ASCII characters"


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        pytest.param([(KEY, b"")], f"{RULE}; got an empty value", id="empty"),
        pytest.param([(KEY, "k" * 201)], f"{RULE}; got 201 characters", id="201-characters"),
        pytest.param(
            [(KEY, b"build\t42")], f"{RULE}; got a control character at position 6", id="tab"
        ),
        pytest.param(
            [(KEY, "ключ-42".encode())],
            f"{RULE}; got a non-ASCII character at position 1",
            id="utf-8",
        ),
        pytest.param(
            [(KEY, b"build-\xe9")],
            f"{RULE}; got a non-ASCII character at position 7",
            id="latin-1",
        ),
        pytest.param(
            [(KEY, "a"), (KEY, "b")],
            f"{RULE}, in one header; got 2 Idempotency-Key headers",
            id="twice",
        ),
    ],
)
async def test_a_malformed_key_is_a_400(
    gateway: Gateway, headers: list[tuple[str, str | bytes]], message: str
) -> None:
    body = {"username": f"badkey-{uuid.uuid4().hex[:8]}", "docker_image_name": IMAGE}

    status, answer = await asyncio.to_thread(post_start, gateway, body, headers)

    assert status == 400, answer
    assert answer == {"code": 40000, "status": 400, "message": message, "data": None}

"""The HTTP contract of the gateway, in process: envelopes, status codes and messages.

The tables run against ``gateway.app.create_app`` under aiohttp's test server with a
real NATS and SQLite (see ``conftest.py``); the cases that need a running pipeline stay
in ``tests/e2e/test_api.py``.
"""

from __future__ import annotations

import json
import uuid

import pytest

from tests.gateway.conftest import Gateway, raw_request


def assert_envelope(status: int, body: dict, expected_status: int, fragment: str) -> None:
    assert status == expected_status, body
    assert set(body) == {"code", "status", "message", "data"}
    assert body["status"] == expected_status
    assert body["code"] != 0
    assert fragment in body["message"], body["message"]


@pytest.mark.parametrize(
    ("data", "status", "fragment"),
    [
        pytest.param(b"{not json", 400, "not valid JSON", id="malformed-json"),
        pytest.param(b"", 400, "empty", id="empty-body"),
        pytest.param(b"[1, 2]", 400, "JSON object", id="array-body"),
        pytest.param(
            b'{"username": "u", "docker_image_name": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            400,
            "nested too deeply",
            id="deep-nesting",
        ),
        pytest.param(
            b'{"username": "u", "docker_image_name": "nginx", "n": ' + b"7" * 5001 + b"}",
            400,
            "number too long",
            id="huge-integer",
        ),
        pytest.param(
            b'{"username": "u"}', 400, "missing field: docker_image_name", id="missing-image"
        ),
        pytest.param(
            b'{"docker_image_name": "nginx"}', 400, "missing field: username", id="missing-username"
        ),
        pytest.param(
            b'{"username": "u", "docker_image_name": "../etc/passwd"}',
            400,
            "not a valid image reference",
            id="dotdot",
        ),
        pytest.param(
            b'{"username": "u", "docker_image_name": "nginx; rm -rf /"}',
            400,
            "not allowed",
            id="shell",
        ),
        pytest.param(
            b'{"username": "u", "docker_image_name": 5}', 400, "must be a string", id="number"
        ),
        pytest.param(
            b'{"username": "", "docker_image_name": "nginx"}',
            400,
            "username must not be empty",
            id="empty-username",
        ),
        pytest.param(
            b'{"username": "u", "docker_image_name": "Nginx"}', 400, "lowercase", id="uppercase"
        ),
        pytest.param(
            b'{"username": "u", "docker_image_name": "nginx", "platform": "linux"}',
            400,
            "is not os/architecture[/variant]",
            id="platform-without-architecture",
        ),
        pytest.param(
            b'{"username": "u", "docker_image_name": "nginx", "platform": "a/b/c/d"}',
            400,
            "is not os/architecture[/variant]",
            id="platform-four-parts",
        ),
        pytest.param(
            b'{"username": "u", "docker_image_name": "nginx", "platform": "linux/amd 64"}',
            400,
            "is not os/architecture[/variant]",
            id="platform-space",
        ),
        pytest.param(
            b'{"username": "u", "docker_image_name": "nginx", "platform": ""}',
            400,
            "platform must be 1-64 characters",
            id="platform-empty",
        ),
        pytest.param(
            json.dumps(
                {"username": "u", "docker_image_name": "nginx", "platform": "linux/" + "a" * 80}
            ).encode(),
            400,
            "platform must be 1-64 characters",
            id="platform-too-long",
        ),
        pytest.param(
            b'{"username": "u", "docker_image_name": "nginx", "platform": ["linux", "amd64"]}',
            400,
            "platform must be a string",
            id="platform-list",
        ),
        pytest.param(
            b'{"username": "u", "docker_image_name": "nginx", "platform": null}',
            400,
            "platform must be a string",
            id="platform-null",
        ),
        pytest.param(
            json.dumps({"username": "u", "docker_image_name": "a" * 70_000}).encode(),
            413,
            "larger than",
            id="too-large",
        ),
    ],
)
async def test_bad_start_requests(
    gateway: Gateway, data: bytes, status: int, fragment: str
) -> None:
    code, body = await raw_request(gateway, "POST", "/start", data)
    assert_envelope(code, body, status, fragment)


async def test_bad_requests_create_no_task(gateway: Gateway) -> None:
    before = (await gateway.get("/query?page_size=100"))[1]["data"]["total"]
    await raw_request(gateway, "POST", "/start", b'{"username": "u", "docker_image_name": "A"}')
    after = (await gateway.get("/query?page_size=100"))[1]["data"]["total"]
    assert after == before


@pytest.mark.parametrize(
    ("method", "path", "status", "fragment"),
    [
        pytest.param("GET", f"/status/{uuid.uuid4()}", 404, "not found", id="unknown-task"),
        pytest.param("GET", "/status/not-a-uuid", 400, "not a UUID", id="bad-task-id"),
        pytest.param(
            "GET",
            "/query?page_size=0",
            400,
            "page_size must be between 1 and 100",
            id="page-size-zero",
        ),
        pytest.param(
            "GET",
            "/query?page_size=101",
            400,
            "page_size must be between 1 and 100",
            id="page-size-large",
        ),
        pytest.param("GET", "/query?page=abc", 400, "page must be an integer", id="page-text"),
        pytest.param("GET", "/query?state=running", 400, "is not one of", id="unknown-state"),
        pytest.param(
            "GET",
            "/query?docker_image_name=ng%00inx",
            400,
            "control characters",
            id="nul-in-filter",
        ),
        pytest.param("GET", "/nowhere", 404, "Not Found", id="unknown-route"),
        pytest.param("DELETE", "/health", 405, "Method Not Allowed", id="wrong-method"),
    ],
)
async def test_bad_reads(
    gateway: Gateway, method: str, path: str, status: int, fragment: str
) -> None:
    code, body = await raw_request(gateway, method, path)
    assert_envelope(code, body, status, fragment)


async def test_health(gateway: Gateway) -> None:
    status, body = await gateway.get("/health")
    assert status == 200
    assert body == {
        "code": 0,
        "status": 200,
        "message": "success",
        "data": {"status": "ok", "nats": "connected", "database": "ok"},
    }


async def test_empty_query_is_a_page_of_nothing(gateway: Gateway) -> None:
    status, body = await gateway.get("/query?username=nobody-at-all")
    assert status == 200
    assert body["data"] == {"total": 0, "items": []}


@pytest.mark.parametrize("path", ["/start", "/cleanup"])
@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        pytest.param(b'{"kind": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested", id="deep"),
        pytest.param(b'{"kind": ' + b"9" * 5001 + b"}", "number too long", id="huge-int"),
    ],
)
async def test_hostile_bodies_are_a_400_on_every_post(
    gateway: Gateway, path: str, data: bytes, fragment: str
) -> None:
    # Bodies far under the size limit that used to escape as 500s with a traceback
    code, body = await raw_request(gateway, "POST", path, data)
    assert_envelope(code, body, 400, fragment)
    assert "Traceback" not in gateway.log.read_text()

"""The HTTP contract of a real ``dcu serve``: envelopes, status codes and messages."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import pytest

from tests.servers.dcu_process import DcuProcess
from tests.servers.registry import Registry

pytestmark = pytest.mark.e2e


def raw_request(service: DcuProcess, method: str, path: str, data: bytes | None = None):
    request = urllib.request.Request(f"{service.base_url}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


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
def test_bad_start_requests(
    dcu_service: DcuProcess, data: bytes, status: int, fragment: str
) -> None:
    code, body = raw_request(dcu_service, "POST", "/start", data)
    assert_envelope(code, body, status, fragment)


def test_bad_requests_create_no_task(dcu_service: DcuProcess) -> None:
    before = dcu_service.get("/query?page_size=100")[1]["data"]["total"]
    raw_request(dcu_service, "POST", "/start", b'{"username": "u", "docker_image_name": "A"}')
    after = dcu_service.get("/query?page_size=100")[1]["data"]["total"]
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
def test_bad_reads(
    dcu_service: DcuProcess, method: str, path: str, status: int, fragment: str
) -> None:
    code, body = raw_request(dcu_service, method, path)
    assert_envelope(code, body, status, fragment)


def test_status_right_after_start_is_never_404(dcu_service: DcuProcess, registry) -> None:
    reference = f"{registry.address}/nothing-here:1"
    for _ in range(10):
        status, body = dcu_service.post("/start", {"username": "u", "docker_image_name": reference})
        assert status == 200
        status, body = dcu_service.get(f"/status/{body['data']['task_id']}")
        assert status == 200, body
        assert body["data"]["state"] in {"idle", "downloading", "failed"}


def test_status_shows_the_requested_platform_normalised(
    dcu_service: DcuProcess, registry: Registry
) -> None:
    # Given a start request naming a platform by an alias, in capitals
    reference = f"{registry.address}/nothing-here:1"
    status, body = dcu_service.post(
        "/start", {"username": "u", "docker_image_name": reference, "platform": "LINUX/aarch64"}
    )
    assert status == 200, body

    # When its status is read (the task may already have failed: nothing-here is absent)
    status, body = dcu_service.get(f"/status/{body['data']['task_id']}")

    # Then it shows the platform as the download stage will use it
    assert status == 200, body
    assert body["data"]["platform"] == "linux/arm64"


def test_health(dcu_service: DcuProcess) -> None:
    status, body = dcu_service.get("/health")
    assert status == 200
    assert body == {
        "code": 0,
        "status": 200,
        "message": "success",
        "data": {"status": "ok", "nats": "connected", "database": "ok"},
    }


def test_empty_query_is_a_page_of_nothing(dcu_service: DcuProcess) -> None:
    status, body = dcu_service.get("/query?username=nobody-at-all")
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
def test_hostile_bodies_are_a_400_on_every_post(
    dcu_service: DcuProcess, path: str, data: bytes, fragment: str
) -> None:
    # Bodies far under the size limit that used to escape as 500s with a traceback
    code, body = raw_request(dcu_service, "POST", path, data)
    assert_envelope(code, body, 400, fragment)
    assert "Traceback" not in dcu_service.log.read_text()

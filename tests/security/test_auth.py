"""Bearer tokens: settings, the token table, the OpenAPI document and a real ``dcu gateway``."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate
from pydantic import ValidationError

from gateway import openapi
from gateway.app import create_app
from gateway.auth import TokenTable
from kernel.settings import AuthSettings, Settings, describe_error, load_settings
from tests.security.conftest import (
    GATEWAY_TOKENS,
    JENKINS_TOKEN,
    OPS_TOKEN,
    Reply,
    call,
    gateway_config,
)
from tests.servers.dcu_process import DcuProcess
from tests.servers.nats import NatsServer

IMAGE = "127.0.0.1:5000/team/app:1.0"


def assert_unauthorized(reply: Reply, fragment: str) -> None:
    assert reply.status == 401, reply.body
    assert reply.body == {
        "code": 40100,
        "status": 401,
        "message": reply.body["message"],
        "data": None,
    }
    assert fragment in reply.body["message"]
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")


def task_total(service: DcuProcess, token: str | None = None) -> int:
    reply = call(service, "GET", "/query?page_size=1", token=token)
    assert reply.status == 200, reply.body
    total = reply.body["data"]["total"]
    assert isinstance(total, int)
    return total


# --- settings and the token table --------------------------------------------------------


def test_plain_and_hashed_tokens_identify_their_name() -> None:
    table = TokenTable(AuthSettings.model_validate({"tokens": GATEWAY_TOKENS}).tokens)
    assert table.identify(JENKINS_TOKEN) == "jenkins"
    assert table.identify(OPS_TOKEN) == "ops"
    assert table.identify(GATEWAY_TOKENS["ops"]) is None  # the hash is not the token
    assert table.identify(JENKINS_TOKEN + "x") is None
    assert table.identify("") is None
    assert table.identify("\udcff") is None  # a lone surrogate neither crashes nor matches


@pytest.mark.parametrize(
    ("tokens", "fragment"),
    [
        pytest.param({"ci": "short-token"}, "at least 16", id="too-short"),
        pytest.param({"ci": "has spaces in the token"}, "without spaces", id="spaces"),
        pytest.param({"ci": "sha256:abc123"}, "64 hex digits", id="short-hash"),
        pytest.param({"ci": "sha256:" + "z" * 64}, "64 hex digits", id="not-hex"),
        pytest.param({" ci": "a-long-enough-token-1"}, "surrounding spaces", id="spaced-name"),
        pytest.param({"": "a-long-enough-token-1"}, "1-100 characters", id="empty-name"),
        pytest.param(
            {"a": "a-long-enough-token-1", "b": "a-long-enough-token-1"},
            "'a' and 'b' are the same",
            id="duplicate",
        ),
        pytest.param(
            {
                "a": "a-long-enough-token-1",
                "b": "sha256:" + hashlib.sha256(b"a-long-enough-token-1").hexdigest(),
            },
            "'a' and 'b' are the same",
            id="duplicate-hashed",
        ),
    ],
)
def test_bad_tokens_are_refused_without_echoing_them(tokens: dict[str, str], fragment: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(auth={"enabled": True, "tokens": tokens})  # type: ignore[arg-type]
    message = describe_error(caught.value)
    assert message.startswith("auth.tokens: "), message
    assert fragment in message
    for value in tokens.values():
        assert value not in message


def test_tokens_come_from_json_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("auth:\n  enabled: false\n")
    monkeypatch.setenv("DCU_AUTH_ENABLED", "true")
    monkeypatch.setenv("DCU_AUTH_PROTECT_READS", "true")
    monkeypatch.setenv("DCU_AUTH_TOKENS", f'{{"jenkins": "{JENKINS_TOKEN}"}}')
    settings = load_settings(config)
    assert settings.auth.enabled and settings.auth.protect_reads
    assert {k: v.get_secret_value() for k, v in settings.auth.tokens.items()} == {
        "jenkins": JENKINS_TOKEN
    }
    assert JENKINS_TOKEN not in repr(settings)


# --- the OpenAPI document follows the settings -------------------------------------------


def document(**auth: Any) -> dict[str, Any]:
    settings = Settings(auth=AuthSettings.model_validate({"tokens": GATEWAY_TOKENS, **auth}))
    built = openapi.document(create_app(settings))
    validate(built)
    return built


def test_with_auth_posts_require_a_token_and_start_takes_the_name_from_it() -> None:
    built = document(enabled=True)
    for path, item in built["paths"].items():
        for method, operation in item.items():
            if method == "post":
                assert operation["security"] == [{"bearerAuth": []}], path
                assert "401" in operation["responses"], path
            else:
                assert "security" not in operation, path
    assert built["components"]["schemas"]["StartRequest"]["required"] == ["docker_image_name"]
    assert "429" in built["paths"]["/start"]["post"]["responses"]
    unauthorized = built["components"]["responses"]["Unauthorized"]
    assert "WWW-Authenticate" in unauthorized["headers"]


def test_protected_reads_are_documented_except_health() -> None:
    built = document(enabled=True, protect_reads=True)
    for path, item in built["paths"].items():
        for method, operation in item.items():
            if path == "/health":
                assert "security" not in operation
                continue
            assert operation["security"] == [{"bearerAuth": []}], f"{method} {path}"
            assert "401" in operation["responses"], f"{method} {path}"


# --- a real gateway ----------------------------------------------------------------------


def test_a_post_without_a_token_is_refused_and_creates_nothing(auth_gateway: DcuProcess) -> None:
    before = task_total(auth_gateway)
    reply = call(auth_gateway, "POST", "/start", {"username": "u", "docker_image_name": IMAGE})
    assert_unauthorized(reply, "missing bearer token")
    assert task_total(auth_gateway) == before


@pytest.mark.parametrize(
    ("authorization", "fragment"),
    [
        pytest.param(f"Bearer {JENKINS_TOKEN}x", "invalid bearer token", id="wrong-token"),
        pytest.param(f"Bearer {OPS_TOKEN[:-1]}", "invalid bearer token", id="prefix"),
        pytest.param(f"Bearer {GATEWAY_TOKENS['ops']}", "invalid bearer token", id="the-hash"),
        pytest.param(f"Basic {JENKINS_TOKEN}", "must be: Bearer", id="basic-scheme"),
        pytest.param("Bearer ", "must be: Bearer", id="empty-token"),
        pytest.param(JENKINS_TOKEN, "must be: Bearer", id="no-scheme"),
    ],
)
def test_a_wrong_token_is_refused(
    auth_gateway: DcuProcess, authorization: str, fragment: str
) -> None:
    before = task_total(auth_gateway)
    body = {"docker_image_name": IMAGE}
    reply = call(auth_gateway, "POST", "/start", body, authorization=authorization)
    assert_unauthorized(reply, fragment)
    assert task_total(auth_gateway) == before


def test_the_token_names_the_user_and_a_body_username_is_ignored(
    auth_gateway: DcuProcess,
) -> None:
    # Given a token for jenkins and a body naming someone else
    body = {"username": "mallory", "docker_image_name": IMAGE}
    # When the task is started
    reply = call(auth_gateway, "POST", "/start", body, token=JENKINS_TOKEN)
    # Then it is started as usual, and recorded under the token's name
    assert reply.status == 200, reply.body
    assert reply.body["message"] == "任务已启动"
    task = call(auth_gateway, "GET", f"/status/{reply.body['data']['task_id']}").body["data"]
    assert task["username"] == "jenkins"
    assert task["docker_image_name"] == IMAGE
    # and a body without a username is fine too
    reply = call(auth_gateway, "POST", "/start", {"docker_image_name": IMAGE}, token=JENKINS_TOKEN)
    assert reply.status == 200, reply.body


def test_a_hashed_token_works_like_the_token(auth_gateway: DcuProcess) -> None:
    reply = call(auth_gateway, "POST", "/start", {"docker_image_name": IMAGE}, token=OPS_TOKEN)
    assert reply.status == 200, reply.body
    task = call(auth_gateway, "GET", f"/status/{reply.body['data']['task_id']}").body["data"]
    assert task["username"] == "ops"


@pytest.mark.parametrize(
    ("username", "fragment"),
    [
        pytest.param("", "must not be empty", id="empty"),
        pytest.param(5, "must be a string", id="number"),
        pytest.param("a" * 101, "longer than 100", id="long"),
    ],
)
def test_a_given_username_is_still_checked(
    auth_gateway: DcuProcess, username: object, fragment: str
) -> None:
    body = {"username": username, "docker_image_name": IMAGE}
    reply = call(auth_gateway, "POST", "/start", body, token=JENKINS_TOKEN)
    assert reply.status == 400, reply.body
    assert fragment in reply.body["message"]


def test_reads_stay_open(auth_gateway: DcuProcess) -> None:
    for path in ("/query", "/health", "/openapi.json", f"/status/{uuid.uuid4()}"):
        reply = call(auth_gateway, "GET", path)
        assert reply.status in {200, 404}, (path, reply.body)
        assert "WWW-Authenticate" not in reply.headers


def test_cleanup_needs_a_token_and_runs_under_its_name(auth_gateway: DcuProcess) -> None:
    reply = call(auth_gateway, "POST", "/cleanup", {"kind": "gzip", "timeout": 0})
    assert_unauthorized(reply, "missing bearer token")
    body = {"kind": "gzip", "timeout": 0, "requested_by": "someone"}
    reply = call(auth_gateway, "POST", "/cleanup", body, token=OPS_TOKEN)
    assert reply.status == 202, reply.body  # no cleanup worker behind this gateway
    request_id = reply.body["data"]["request_id"]
    assert f"request {request_id} by ops published" in auth_gateway.log.read_text()


def test_unknown_routes_and_methods_keep_their_status(auth_gateway: DcuProcess) -> None:
    assert call(auth_gateway, "POST", "/nowhere", {}).status == 404
    assert call(auth_gateway, "PUT", "/start", {}).status == 405


def test_the_log_names_users_never_tokens(auth_gateway: DcuProcess) -> None:
    call(auth_gateway, "POST", "/start", {"docker_image_name": IMAGE}, token=JENKINS_TOKEN)
    call(auth_gateway, "POST", "/start", {}, authorization=f"Bearer {OPS_TOKEN}-wrong")
    log = auth_gateway.log.read_text()
    assert "by jenkins" in log
    assert "refused: invalid bearer token" in log
    for token in (JENKINS_TOKEN, OPS_TOKEN):
        assert token not in log


@pytest.fixture(scope="module")
def reads_gateway(
    nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DcuProcess]:
    config = gateway_config(
        nats_server, auth={"enabled": True, "tokens": GATEWAY_TOKENS, "protect_reads": True}
    )
    workdir = tmp_path_factory.mktemp("reads-gateway")
    service = DcuProcess(workdir, config, ["gateway"], name="reads-gateway").start()
    try:
        yield service
    finally:
        service.stop()


def test_protect_reads_guards_every_get_but_health(reads_gateway: DcuProcess) -> None:
    task_id = uuid.uuid4()
    for path in ("/query", f"/status/{task_id}", f"/events/{task_id}", "/openapi.json"):
        assert_unauthorized(call(reads_gateway, "GET", path), "missing bearer token")
        reply = call(reads_gateway, "GET", path, token=OPS_TOKEN)
        assert reply.status in {200, 404}, (path, reply.body)
    assert call(reads_gateway, "GET", "/health").status == 200
    served = call(reads_gateway, "GET", "/openapi.json", token=JENKINS_TOKEN).body
    assert served["paths"]["/query"]["get"]["security"] == [{"bearerAuth": []}]

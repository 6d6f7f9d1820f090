"""Pulling from a registry with token auth (distribution ``auth: token`` and a token server
written for the test), through a real ``dcu serve`` on the registry engine."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import service_config
from tests.e2e.helpers import fetch_object, load_and_get_id
from tests.servers.dcu_process import DcuProcess
from tests.servers.oci import layer_tar, push_image
from tests.servers.token_registry import TokenAuthRegistry

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenAuthRegistry]:
    server = TokenAuthRegistry(tmp_path_factory.mktemp("token-registry"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _service(workdir: Path, nats_server, docker_engine, s3_server, **docker) -> DcuProcess:
    config = service_config(
        nats=nats_server, engine=docker_engine, s3=s3_server, tag=uuid.uuid4().hex[:8]
    )
    config["docker"].update(docker)
    return DcuProcess(workdir, config, ["serve"], name="serve").start()


def test_a_token_auth_registry_is_pulled_with_credentials_and_refused_without(
    token_registry: TokenAuthRegistry,
    nats_server,
    docker_engine,
    s3_server,
    tmp_path: Path,
) -> None:
    # Given a private image in a registry that wants bearer tokens from its token server
    repo = f"private/{uuid.uuid4().hex[:8]}"
    headers = token_registry.auth_headers(repo, ("pull", "push"))
    image = push_image(
        token_registry.url, repo, "1.0", [layer_tar({"app/bin": 200_000})], headers=headers
    )
    credentials = {
        token_registry.address: {
            "username": token_registry.username,
            "password": token_registry.password,
        }
    }

    # When DCU runs without credentials for it, the task fails saying access was refused
    anonymous = _service(tmp_path / "anonymous", nats_server, docker_engine, s3_server)
    try:
        status, body = anonymous.post(
            "/start", {"username": "u", "docker_image_name": image.reference}
        )
        assert status == 200, body
        data = anonymous.wait_terminal(body["data"]["task_id"], timeout=120)
    finally:
        anonymous.stop()
    assert data["state"] == "failed"
    assert "refused access" in data["error_message"]
    assert "no credentials are configured" in data["error_message"]
    assert token_registry.address in data["error_message"]

    # When it runs with the registry's credentials configured
    token_registry.tokens.clear()
    service = _service(
        tmp_path / "with-credentials",
        nats_server,
        docker_engine,
        s3_server,
        registries=credentials,
    )
    try:
        status, body = service.post(
            "/start", {"username": "u", "docker_image_name": image.reference}
        )
        assert status == 200, body
        data = service.wait_terminal(body["data"]["task_id"], timeout=120)
        # Then the image is packaged, and loads as itself
        assert data["state"] == "completed", data
        archive = tmp_path / "archive.tar.gz"
        fetch_object(
            s3_server, service.config["minio"]["bucket"], data["minio_object_name"], archive
        )
        assert load_and_get_id(docker_engine, archive, [image.image_id]) == image.image_id
        # And the token server saw the credentials, asked for pull access only
        asked = token_registry.tokens.recorded()
        assert asked and all(r.username == token_registry.username for r in asked)
        assert {s for r in asked for s in r.scopes} == {f"repository:{repo}:pull"}
        assert token_registry.password not in service.log.read_text()
    finally:
        service.stop()

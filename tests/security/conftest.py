"""Real ``dcu`` processes for the security suite, and requests that carry bearer tokens.

Two services are shared by the whole package (started on first use, stopped at the end):

* ``auth_gateway``: ``dcu gateway`` alone (no persistence subscriber, no workers) with
  tokens and the registry allow-list. Nothing consumes its ``requested`` events; its
  tasks are answered ``idle`` from the stream and stay unfinished (which is what the
  per-user limit test, with a gateway of its own, relies on).
* ``pipeline_service``: ``dcu serve`` against the real engine, registry, S3 and NATS, with
  distinctive secrets everywhere (S3 keys, an API token, registry credentials from the
  config and from a Docker config file), the allow-list, a maximum image size between
  the SMALL and NESTED fixture images, and ``mode: debug`` logging.
"""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from tests.e2e.conftest import service_config
from tests.servers.dcu_process import DcuProcess
from tests.servers.docker_engine import DockerEngine
from tests.servers.nats import NatsServer
from tests.servers.registry import Registry
from tests.servers.s3 import S3Server

CLOSED_DOCKER = "unix:///nonexistent/docker.sock"

# auth_gateway's tokens: ops is configured by its sha256 only.
JENKINS_TOKEN = "jenkins-token-5f1c9a7e2b44"
OPS_TOKEN = "ops-token-c41d8e0a93b7d2"
LIMITED_TOKEN = "limited-token-77aa01bc3d9e"
OTHER_TOKEN = "other-token-0b6e2d48c1f5a3"
GATEWAY_TOKENS = {
    "jenkins": JENKINS_TOKEN,
    "ops": "sha256:" + hashlib.sha256(OPS_TOKEN.encode()).hexdigest(),
    "limited": LIMITED_TOKEN,
    "other": OTHER_TOKEN,
}
GATEWAY_ALLOWED = ["127.0.0.1:5000", "Registry.Example:5000", "docker.io"]

# pipeline_service's secrets: distinctive values the secrets test greps for.
S3_ACCESS_KEY = "S3AKIDd7c1e95f03ab"
S3_SECRET_KEY = "s3-secret-2b8f6e1a9c0d4e77"
API_TOKEN = "api-token-8e3b1f0c7a9d2e64"
REGISTRY_USER = "reg-user-4c9e1b"
REGISTRY_PASSWORD = "reg-pass-7f2a9d3c6b15"
FILE_USER = "file-user-91ab3e"
FILE_PASSWORD = "file-pass-5d7c2e8f4a60"
HUB_USER = "hub-user-3e7d05"
HUB_PASSWORD = "hub-pass-a19c4b7e2d83"
PIPELINE_USER = "ci-pipeline"
# Between the SMALL (~4 KB) and NESTED (~1.1 MB) fixture images.
MAX_IMAGE_BYTES = 256 * 1024


@dataclass(frozen=True)
class ClosedEngine:
    """Stands in for DockerEngine in ``service_config``: a socket nothing listens on."""

    host: str = CLOSED_DOCKER


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any
    raw: bytes = field(repr=False)


def call(
    service: DcuProcess,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    authorization: str | None = None,
    timeout: float = 30,
) -> Reply:
    """One request to ``service``; ``token`` becomes ``Authorization: Bearer <token>``."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if authorization is not None:
        headers["Authorization"] = authorization
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{service.base_url}{path}", data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, got = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            status, raw, got = exc.code, exc.read(), dict(exc.headers)
    parsed: Any = None
    if raw and got.get("Content-Type", "").startswith("application/json"):
        parsed = json.loads(raw)
    return Reply(status, got, parsed, raw)


def gateway_config(nats: NatsServer, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config for a service without a Docker engine, S3 or download worker."""
    tag = uuid.uuid4().hex[:8]
    engine = cast(DockerEngine, ClosedEngine())
    config = service_config(nats=nats, engine=engine, s3=None, tag=tag)
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def docker_auth(user: str, password: str) -> str:
    """The ``auth`` field ``docker login`` writes: base64 of ``user:password``."""
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="package")
def auth_gateway(
    nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DcuProcess]:
    config = gateway_config(
        nats_server,
        auth={"enabled": True, "tokens": GATEWAY_TOKENS},
        docker={"allowed_registries": GATEWAY_ALLOWED},
    )
    workdir = tmp_path_factory.mktemp("auth-gateway")
    service = DcuProcess(workdir, config, ["gateway"], name="auth-gateway").start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="package")
def pipeline_service(
    nats_server: NatsServer,
    docker_engine: DockerEngine,
    s3_server: S3Server,
    registry: Registry,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DcuProcess]:
    workdir = tmp_path_factory.mktemp("pipeline")
    docker_config = workdir / "docker-config.json"
    docker_config.write_text(
        json.dumps(
            {
                "auths": {
                    registry.address: {"auth": docker_auth(FILE_USER, FILE_PASSWORD)},
                    "https://index.docker.io/v1/": {"auth": docker_auth(HUB_USER, HUB_PASSWORD)},
                },
                "credsStore": "desktop",
            }
        )
    )
    config = service_config(
        nats=nats_server,
        engine=docker_engine,
        s3=None,
        s3_endpoint=s3_server.endpoint,  # moto takes any keys
        tag=uuid.uuid4().hex[:8],
        server={"mode": "debug"},
        auth={"enabled": True, "tokens": {PIPELINE_USER: API_TOKEN}},
        minio={"access_key": S3_ACCESS_KEY, "secret_key": S3_SECRET_KEY},
        docker={
            # the test registry has no auth: the engine is given credentials it never needs
            "registries": {
                registry.address: {"username": REGISTRY_USER, "password": REGISTRY_PASSWORD}
            },
            "config_file": str(docker_config),
            "allowed_registries": [registry.address, "docker.io"],
        },
        workers={"max_image_bytes": MAX_IMAGE_BYTES},
    )
    service = DcuProcess(workdir, config, ["serve"], name="pipeline").start()
    try:
        yield service
    finally:
        service.stop()


def secret_forms(*values: str) -> dict[str, str]:
    """Each value, and its base64 (standard and URL-safe, without padding, so the form
    found inside a longer encoding is matched too), labelled for messages."""
    forms: dict[str, str] = {}
    for value in values:
        forms[value] = value
        forms[f"base64({value})"] = base64.b64encode(value.encode()).decode().rstrip("=")
        forms[f"base64url({value})"] = base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")
    return forms


def tree_bytes(directory: Path, suffixes: tuple[str, ...]) -> dict[str, bytes]:
    """Contents of the files below ``directory`` whose names end with one of ``suffixes``."""
    return {
        str(path): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name.endswith(suffixes)
    }

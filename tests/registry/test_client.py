"""The registry client's transport rules, against small HTTP servers written for the test.

Each server is a real aiohttp server on a loopback address; they play the parts a real
registry plays badly or hostilely: a blob download cut half-way, a redirect to storage
on another host, a redirect or token realm pointing at the cloud metadata address.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from actors import registry_client
from actors.registry_client import (
    ForbiddenTarget,
    GuardedResolver,
    RegistryClient,
    RegistryRefused,
    RegistryUnavailable,
    check_target,
    parse_challenge,
)
from kernel.errors import ImageNotFound
from kernel.settings import DockerSettings, DownloadSettings, RegistryCredentials

BLOB = os.urandom(3 * 1024 * 1024 + 123)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
USER, PASSWORD = "jenkins", "s3cret-registry-password"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _serve(handler: Handler, host: str = "127.0.0.1") -> TestServer:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host=host)
    await server.start_server()
    return server


@pytest.fixture
async def servers() -> AsyncIterator[list[TestServer]]:
    started: list[TestServer] = []
    try:
        yield started
    finally:
        for server in started:
            await server.close()


@pytest.fixture
async def clients() -> AsyncIterator[list[RegistryClient]]:
    """Clients a test opens (append them); closed when it ends."""
    opened: list[RegistryClient] = []
    try:
        yield opened
    finally:
        for client in opened:
            await client.close()


def _client(host: str, *, credentials: bool = False, **download: Any) -> RegistryClient:
    docker = DockerSettings(
        registries=(
            {host: RegistryCredentials(username=USER, password=PASSWORD)} if credentials else {}
        )
    )
    settings = DownloadSettings(request_attempts=3, **download)
    return RegistryClient(settings, docker)


def _host(server: TestServer) -> str:
    return f"{server.host}:{server.port}"


# --- plain-Python rules -------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "scheme", "params"),
    [
        pytest.param(
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/nginx:pull"',
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/nginx:pull",
            },
            id="docker-hub",
        ),
        pytest.param('Basic realm="Registry Realm"', "basic", {"realm": "Registry Realm"}, id="b"),
        pytest.param(
            'Bearer realm="https://r.example/t",scope="repository:a:pull,push"',
            "bearer",
            {"realm": "https://r.example/t", "scope": "repository:a:pull,push"},
            id="comma-in-quotes",
        ),
    ],
)
def test_challenges_are_parsed(header: str, scheme: str, params: dict[str, str]) -> None:
    challenge = parse_challenge(header)
    assert challenge is not None
    assert challenge.scheme == scheme
    assert challenge.params == params


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "https://[fe80::1]:5000/v2/",
        "http://[::ffff:169.254.169.254]/",
        "ftp://registry.example/v2/",
        "file:///etc/passwd",
    ],
)
def test_link_local_and_odd_schemes_are_refused(url: str) -> None:
    with pytest.raises(ForbiddenTarget):
        check_target(url, "registry")


def test_ordinary_targets_pass() -> None:
    check_target("https://registry-1.docker.io/v2/", "registry")
    check_target("http://127.0.0.1:5000/v2/", "registry")
    check_target("http://10.1.2.3:5000/v2/", "registry")  # private is a deployment's choice


def test_endpoints_use_https_except_loopback_and_listed_hosts() -> None:
    client = _client("x", insecure_registries=["registry.lan:5000"])
    assert client.endpoint("docker.io").base_url == "https://registry-1.docker.io"
    assert client.endpoint("127.0.0.1:5000").base_url == "http://127.0.0.1:5000"
    assert client.endpoint("localhost:5000").base_url == "http://localhost:5000"
    assert client.endpoint("registry.lan:5000").base_url == "http://registry.lan:5000"
    assert client.endpoint("ghcr.io").base_url == "https://ghcr.io"


def test_mirrors_come_first() -> None:
    client = _client("x", mirrors={"docker.io": ["mirror.local:5000", "127.0.0.1:5001"]})
    assert [e.host for e in client.endpoints("docker.io")] == [
        "mirror.local:5000",
        "127.0.0.1:5001",
        "docker.io",
    ]
    assert [e.host for e in client.endpoints("ghcr.io")] == ["ghcr.io"]


class FakeDnsAnswering:
    """Stands in for DNS (a name that resolves to link-local cannot be set up here without
    editing /etc/hosts): answers every name with the given address."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[Any]:
        return [
            {
                "hostname": host,
                "host": self.address,
                "port": port,
                "family": family,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        return None


async def test_a_name_resolving_to_link_local_is_refused_after_resolution(clients) -> None:
    # Given the client's own connector, its DNS answering with the metadata address
    client = _client("innocent.example")
    clients.append(client)
    resolver = client.session.connector._resolver  # type: ignore[union-attr]
    assert isinstance(resolver, GuardedResolver)
    resolver._inner = FakeDnsAnswering("169.254.169.254")  # type: ignore[assignment]
    # When a registry of that name is asked, Then no connection is made to it
    with pytest.raises(ForbiddenTarget, match="metadata"):
        await client.get_manifest(client.endpoint("innocent.example"), "app", "1", "*/*")
    # And an ordinary answer passes the same resolver
    resolver._inner = FakeDnsAnswering("127.0.0.1")  # type: ignore[assignment]
    assert (await resolver.resolve("innocent.example", 80))[0]["host"] == "127.0.0.1"


# --- against servers ----------------------------------------------------------------


async def test_broken_blob_transfer_resumes_with_range(servers, clients, tmp_path: Path) -> None:
    # Given a registry whose first blob response stops half-way
    seen_ranges: list[str | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/v2/":
            return web.Response(status=200)
        seen_ranges.append(request.headers.get("Range"))
        if len(seen_ranges) == 1:
            response = web.StreamResponse(status=200, headers={"Content-Length": str(len(BLOB))})
            await response.prepare(request)
            await response.write(BLOB[: len(BLOB) // 2])
            assert request.transport is not None
            request.transport.close()  # the connection dies mid-body
            return response
        start = int(request.headers["Range"].removeprefix("bytes=").rstrip("-"))
        return web.Response(
            status=206,
            body=BLOB[start:],
            headers={"Content-Range": f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"},
        )

    server = await _serve(handler)
    servers.append(server)
    client = _client(_host(server))
    clients.append(client)
    # When the blob is fetched
    dest = tmp_path / "blob"
    got = await client.fetch_blob(
        client.endpoint(_host(server)), "team/app", DIGEST, len(BLOB), dest
    )
    # Then the second request asked for the rest only, and the result is whole
    assert seen_ranges[0] is None
    assert seen_ranges[1] is not None and seen_ranges[1].startswith("bytes=")
    assert int(seen_ranges[1].removeprefix("bytes=").rstrip("-")) > 0
    assert got.resumed == 1
    assert dest.read_bytes() == BLOB


async def test_a_blob_that_does_not_match_its_digest_is_refused(
    servers, clients, tmp_path: Path
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        # Flip the first byte: replacing it with a constant left BLOB intact 1 time in 256
        return web.Response(body=bytes([BLOB[0] ^ 0xFF]) + BLOB[1:])

    server = await _serve(handler)
    servers.append(server)
    client = _client(_host(server))
    clients.append(client)
    with pytest.raises(RegistryRefused, match="does not match its digest"):
        await client.fetch_blob(
            client.endpoint(_host(server)), "app", DIGEST, len(BLOB), tmp_path / "b"
        )


async def test_redirect_to_storage_drops_credentials(servers, clients, tmp_path: Path) -> None:
    # Given a registry that wants basic auth and sends blob GETs to storage elsewhere
    storage_headers: list[dict[str, str]] = []

    async def storage(request: web.Request) -> web.StreamResponse:
        storage_headers.append(dict(request.headers))
        return web.Response(body=BLOB)

    store = await _serve(storage, host="127.0.0.2")
    servers.append(store)

    async def registry(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != BASIC:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        return web.Response(
            status=307, headers={"Location": f"http://{_host(store)}/blobs/x?sig=presigned"}
        )

    server = await _serve(registry)
    servers.append(server)
    client = _client(_host(server), credentials=True)
    clients.append(client)
    # When the blob is fetched with credentials
    dest = tmp_path / "blob"
    await client.fetch_blob(client.endpoint(_host(server)), "app", DIGEST, len(BLOB), dest)
    # Then storage got the request, but never the registry's credentials
    assert len(storage_headers) == 1
    assert "Authorization" not in storage_headers[0]
    assert dest.read_bytes() == BLOB


async def test_redirect_to_metadata_address_is_refused(servers, clients, tmp_path: Path) -> None:
    async def registry(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=302, headers={"Location": "http://169.254.169.254/latest/meta-data/"}
        )

    server = await _serve(registry)
    servers.append(server)
    client = _client(_host(server))
    clients.append(client)
    with pytest.raises(ForbiddenTarget, match="link-local"):
        await client.fetch_blob(
            client.endpoint(_host(server)), "app", DIGEST, len(BLOB), tmp_path / "b"
        )


async def test_token_realm_on_metadata_address_is_refused(servers, clients) -> None:
    async def registry(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="http://169.254.169.254/token"'},
        )

    server = await _serve(registry)
    servers.append(server)
    client = _client(_host(server), credentials=True)
    clients.append(client)
    with pytest.raises(ForbiddenTarget, match="link-local"):
        await client.get_manifest(client.endpoint(_host(server)), "app", "1.0", "*/*")


async def test_credentials_go_only_to_a_trusted_realm(servers, clients) -> None:
    # Given a registry whose token realm is on another host
    realm_headers: list[dict[str, str]] = []

    async def realm(request: web.Request) -> web.StreamResponse:
        realm_headers.append(dict(request.headers))
        return web.json_response({"token": "anonymous-token"})

    realm_server = await _serve(realm, host="127.0.0.2")
    servers.append(realm_server)

    async def registry(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != "Bearer anonymous-token":
            return web.Response(
                status=401,
                headers={
                    "WWW-Authenticate": f'Bearer realm="http://{_host(realm_server)}/token",'
                    'service="svc"'
                },
            )
        return web.Response(body=b"{}", content_type="application/json")

    server = await _serve(registry)
    servers.append(server)
    host = _host(server)
    # When DCU pulls with credentials configured for the registry
    client = _client(host, credentials=True)
    clients.append(client)
    await client.get_manifest(client.endpoint(host), "app", "1.0", "*/*")
    # Then the realm was asked for a token, without the registry's credentials
    assert len(realm_headers) == 1
    assert "Authorization" not in realm_headers[0]
    # And once the realm is listed in download.token_realms, it gets them
    client = _client(host, credentials=True, token_realms=[_host(realm_server)])
    clients.append(client)
    await client.get_manifest(client.endpoint(host), "app", "1.0", "*/*")
    assert realm_headers[-1].get("Authorization") == BASIC


async def test_realm_outside_the_allow_list_is_refused(servers, clients) -> None:
    async def registry(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=401, headers={"WWW-Authenticate": 'Bearer realm="http://127.0.0.3:9/token"'}
        )

    server = await _serve(registry)
    servers.append(server)
    host = _host(server)
    client = RegistryClient(
        DownloadSettings(request_attempts=1), DockerSettings(allowed_registries=[host])
    )
    clients.append(client)
    with pytest.raises(ForbiddenTarget, match="not allowed"):
        await client.get_manifest(client.endpoint(host), "app", "1.0", "*/*")


async def test_missing_credentials_are_named(servers, clients) -> None:
    async def registry(request: web.Request) -> web.StreamResponse:
        return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})

    server = await _serve(registry)
    servers.append(server)
    client = _client(_host(server))
    clients.append(client)
    with pytest.raises(RegistryRefused, match="no credentials are configured"):
        await client.get_manifest(client.endpoint(_host(server)), "app", "1.0", "*/*")


async def test_server_errors_are_retried_then_reported(servers, clients, monkeypatch) -> None:
    monkeypatch.setattr(registry_client, "_BACKOFF_FIRST", 0.01)
    calls = 0

    async def registry(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        return web.Response(status=503)

    server = await _serve(registry)
    servers.append(server)
    client = _client(_host(server))
    clients.append(client)
    with pytest.raises(RegistryUnavailable, match="after 3 attempts"):
        await client.get_manifest(client.endpoint(_host(server)), "app", "1.0", "*/*")
    assert calls == 3


async def test_unknown_manifest_is_image_not_found(servers, clients) -> None:
    async def registry(request: web.Request) -> web.StreamResponse:
        return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)

    server = await _serve(registry)
    servers.append(server)
    client = _client(_host(server))
    clients.append(client)
    with pytest.raises(ImageNotFound, match="not found"):
        await client.get_manifest(client.endpoint(_host(server)), "app", "1.0", "*/*")

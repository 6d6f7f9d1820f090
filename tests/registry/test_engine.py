"""Registry-engine rules that need no registry, and the schema 1 refusal (which the real
registry here no longer accepts on push, so a small server written for the test serves it)."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from actors.registry_client import RegistryRefused
from actors.registry_engine import (
    RegistryEngine,
    repo_tags,
    reuse_key,
)
from events.formats import ArchiveFormat
from events.platform import parse_platform
from events.reference import parse_reference
from kernel.settings import load_settings
from tests.servers.base import free_port
from tests.servers.oci import layer_tar, push_image


@pytest.mark.parametrize(
    ("text", "path", "canonical"),
    [
        ("nginx", "library/nginx", "docker.io/library/nginx:latest"),
        ("nginx:1.25", "library/nginx", "docker.io/library/nginx:1.25"),
        ("docker.io/library/nginx:1", "library/nginx", "docker.io/library/nginx:1"),
        ("docker.io/me/app:2", "me/app", "docker.io/me/app:2"),
        ("me/app", "me/app", "docker.io/me/app:latest"),
        ("127.0.0.1:5000/team/app:v1", "team/app", "127.0.0.1:5000/team/app:v1"),
        ("ghcr.io/o/i@sha256:" + "a" * 64, "o/i", "ghcr.io/o/i@sha256:" + "a" * 64),
        # a digest reference that names a tag keeps the tag in every format
        ("ghcr.io/o/i:v2@sha256:" + "a" * 64, "o/i", "ghcr.io/o/i:v2"),
    ],
)
def test_names_as_the_engine_writes_them(text: str, path: str, canonical: str) -> None:
    ref = parse_reference(text)
    assert ref.repository == path
    assert ref.canonical == canonical
    # a docker archive's RepoTags are the qualified name; none for a bare digest
    assert repo_tags(ref) == (() if "@" in canonical else (canonical,))


def test_reuse_key_changes_with_the_manifest_the_tags_and_the_format() -> None:
    base = reuse_key("sha256:" + "1" * 64, ["a:1"])
    assert base == reuse_key("sha256:" + "1" * 64, ["a:1"], ArchiveFormat.DOCKER_GZIP)
    assert base != reuse_key("sha256:" + "2" * 64, ["a:1"])
    assert base != reuse_key("sha256:" + "1" * 64, ["a:2"])
    assert base != reuse_key("sha256:" + "1" * 64, ["a:1"], ArchiveFormat.DOCKER)
    assert base != reuse_key("sha256:" + "1" * 64, ["a:1"], ArchiveFormat.OCI)
    assert len(base) == 64


SCHEMA1 = {
    "schemaVersion": 1,
    "name": "old/app",
    "tag": "1",
    "architecture": "amd64",
    "fsLayers": [{"blobSum": "sha256:" + "0" * 64}],
    "history": [{"v1Compatibility": "{}"}],
}


async def test_a_schema_1_manifest_is_refused_with_a_reason(tmp_path) -> None:
    # Given a registry (FakeSchema1Registry) that only has a schema 1 manifest
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=json.dumps(SCHEMA1).encode(),
            content_type="application/vnd.docker.distribution.manifest.v1+prettyjws",
        )

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    engine = RegistryEngine(load_settings(None, storage={"work_path": str(tmp_path)}))
    try:
        ref = parse_reference(f"127.0.0.1:{server.port}/old/app:1")
        # When it is resolved, Then it is refused, saying what to do
        with pytest.raises(RegistryRefused, match=r"schema 1 .* push the image again"):
            await engine.resolve(ref, parse_platform("linux/amd64"), explicit=False)
    finally:
        await engine.close()
        await server.close()


async def test_a_failing_mirror_falls_through_to_the_registry(registry, tmp_path) -> None:
    # Given an image in the registry, and a mirror for it that refuses connections
    image = push_image(registry.url, "mirrored/app", "1", [layer_tar({"f": b"mirrored"})])
    dead = f"127.0.0.1:{free_port()}"
    settings = load_settings(
        None,
        storage={"work_path": str(tmp_path)},
        download={"mirrors": {registry.address: [dead]}, "request_attempts": 1},
    )
    engine = RegistryEngine(settings)
    try:
        # When it is resolved and downloaded
        ref = parse_reference(image.reference)
        resolved = await engine.resolve(ref, parse_platform("linux/amd64"), explicit=False)
        got = await engine.download([(ref, resolved)], tmp_path / "task")
    finally:
        await engine.close()
    # Then the registry itself served it, verified
    assert resolved.endpoint.host == registry.address
    assert got.plan.images[0].image_id == image.image_id
    assert got.plan.images[0].manifest_digest == image.manifest_digest
    assert [layer.diff_id for layer in got.plan.images[0].layers] == list(image.diff_ids)

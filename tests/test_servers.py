"""Smoke tests: every server fixture is a real, working server."""

from __future__ import annotations

import gzip
import io
import json
import socket
import time
import uuid
from pathlib import Path

import asyncpg
import nats
import pytest
from miniopy_async.api import Minio  # the package re-exports it implicitly (mypy strict)

from tests.servers.base import ServerStartError
from tests.servers.docker_engine import DockerEngine, ping_unix_socket
from tests.servers.images import PushedImages, small_by_digest, write_mixed
from tests.servers.nats import NatsServer
from tests.servers.postgres import create_database, drop_database
from tests.servers.registry import Registry
from tests.servers.s3 import S3Server


def test_docker_engine_answers_on_its_private_socket(docker_engine: DockerEngine) -> None:
    assert docker_engine.host.startswith("unix:///tmp/dcu-")
    assert ping_unix_socket(docker_engine.socket_path)

    version = docker_engine.docker("version", "--format", "{{json .Server}}")

    assert json.loads(version.stdout)["Version"]
    info = docker_engine.docker("info", "--format", "{{.Driver}} {{.DockerRootDir}}")
    assert info.stdout.split() == ["vfs", str(docker_engine.data_root)]


def test_registry_catalog_lists_pushed_small(
    registry: Registry, pushed_images: PushedImages
) -> None:
    small = pushed_images["small"]

    assert small.reference == f"{registry.address}/dcu-small:1.0"
    assert "dcu-small" in registry.catalog()
    assert small_by_digest(pushed_images).startswith(f"{registry.address}/dcu-small@sha256:")


def test_pushed_small_pulls_back_with_recorded_id(
    docker_engine: DockerEngine, pushed_images: PushedImages
) -> None:
    # Given SMALL was pushed and is not in the engine (other tests may have pulled it)
    small = pushed_images.small
    docker_engine.forget(small.image_id)
    absent = docker_engine.docker("image", "inspect", small.image_id, check=False)
    assert absent.returncode != 0

    try:
        # When it is pulled by tag and by digest
        docker_engine.docker("pull", "--quiet", small.reference)
        docker_engine.docker("pull", "--quiet", small.digest_reference)

        # Then both resolve to the recorded image ID
        for reference in (small.reference, small.digest_reference):
            inspected = docker_engine.docker("image", "inspect", "--format", "{{.Id}}", reference)
            assert inspected.stdout.strip() == small.image_id
    finally:
        docker_engine.forget(small.reference, small.digest_reference)


async def test_s3_server_stores_objects(s3_server: S3Server) -> None:
    bucket = f"dcu-{uuid.uuid4().hex[:8]}"
    async with Minio(
        s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False
    ) as client:
        await client.make_bucket(bucket)
        assert bucket in [b.name for b in await client.list_buckets()]

        await client.put_object(bucket, "hello.txt", io.BytesIO(b"hello"), 5)

        stat = await client.stat_object(bucket, "hello.txt")
        assert stat.size == 5


def test_s3_server_pause_makes_it_unresponsive(s3_server: S3Server) -> None:
    s3_server.pause()
    try:
        with socket.create_connection(("127.0.0.1", s3_server.port), timeout=2) as sock:
            sock.settimeout(0.5)
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            with pytest.raises(TimeoutError):
                sock.recv(1)
    finally:
        s3_server.resume()
    deadline = time.monotonic() + 10
    with socket.create_connection(("127.0.0.1", s3_server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        assert sock.recv(12).startswith(b"HTTP/1.")


async def test_nats_server_has_jetstream(nats_server: NatsServer) -> None:
    client = await nats.connect(nats_server.url)
    try:
        jetstream = client.jetstream()
        name = f"SMOKE_{uuid.uuid4().hex[:8]}"

        info = await jetstream.add_stream(name=name, subjects=[f"{name}.>"])
        ack = await jetstream.publish(f"{name}.hello", b"hi")

        assert info.config.name == name
        assert ack.stream == name
        await jetstream.delete_stream(name)
    finally:
        await client.close()


async def test_postgres_accepts_queries_on_a_fresh_database(postgres_dsn: str) -> None:
    assert postgres_dsn == "postgres://postgres@127.0.0.1:5432/test"
    dsn = create_database()
    try:
        assert dsn.startswith("postgres://postgres@127.0.0.1:5432/dcu_")
        connection = await asyncpg.connect(dsn)
        try:
            assert await connection.fetchval("select 1") == 1
        finally:
            await connection.close()
    finally:
        drop_database(dsn)


async def test_postgres_database_fixture(postgres_database: str) -> None:
    connection = await asyncpg.connect(postgres_database)
    try:
        assert (
            await connection.fetchval("select current_database()")
            == (postgres_database.rpartition("/")[2])
        )
    finally:
        await connection.close()


def test_a_second_engine_never_shares_a_socket(docker_engine: DockerEngine, tmp_path: Path) -> None:
    intruder = DockerEngine(tmp_path, socket_dir=docker_engine.socket_dir)

    with pytest.raises(ServerStartError, match="refusing to share"):
        intruder.start()
    assert docker_engine.ping()


def test_nested_image_keeps_its_repository_path_and_tag(
    registry: Registry, pushed_images: PushedImages
) -> None:
    nested = pushed_images["nested"]

    assert nested.reference == f"{registry.address}/team/sub/app:v1.2.3-rc.1"
    assert nested.tag == "v1.2.3-rc.1"
    assert nested.repository == f"{registry.address}/team/sub/app"
    assert "team/sub/app" in registry.catalog()


def test_mixed_data_is_deterministic_and_partly_compressible(tmp_path: Path) -> None:
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"

    write_mixed(first, 3 * 1024 * 1024 + 7, name="same")
    write_mixed(second, 3 * 1024 * 1024 + 7, name="same")

    data = first.read_bytes()
    assert len(data) == 3 * 1024 * 1024 + 7
    assert data == second.read_bytes()
    assert 0.3 < len(gzip.compress(data, compresslevel=1)) / len(data) < 0.8


def test_large_image_has_four_partly_compressible_layers(
    registry: Registry, pushed_images: PushedImages
) -> None:
    large = pushed_images["large"]

    manifest = registry.manifest("dcu-large", large.digest)

    layers = manifest["layers"]
    assert len(layers) == 4
    assert large.size_bytes == 300_000_000
    compressed = sum(layer["size"] for layer in layers)
    assert 0.3 * large.size_bytes < compressed < 0.8 * large.size_bytes

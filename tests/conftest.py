"""Session-wide real servers: Docker engine, registry, S3 (moto), NATS, PostgreSQL.

Every server runs on a free loopback port (or a private unix socket), is started
lazily by the first test that asks for it, and is stopped by its pid when the session
ends. A server that cannot start fails the test; nothing is ever skipped.

NATS comes two ways: ``nats_server``, the session's (tests share it, each on streams and
a subject prefix of its own), and ``nats_factory``, private servers (and clusters) for a
test that restarts or kills NATS. ``object_store`` is the object-store contract fixture:
the same test against the S3 store (moto) and the local store.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from actors.object_store import ObjectStore, open_store
from kernel.settings import MinioSettings
from tests.servers.docker_engine import DockerEngine
from tests.servers.images import PushedImages
from tests.servers.nats import NatsFactory, NatsServer
from tests.servers.postgres import create_database, drop_database
from tests.servers.postgres import postgres_dsn as ensure_postgres
from tests.servers.registry import Registry
from tests.servers.s3 import MIN_PART_SIZE, S3Server


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    engine = DockerEngine(tmp_path_factory.mktemp("dockerd"))
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    server = Registry(tmp_path_factory.mktemp("registry"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(store=tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_factory(tmp_path: Path) -> Iterator[NatsFactory]:
    """Private nats-servers for this test alone: ``nats_factory()`` starts one (its port
    and store kept across ``restart``), ``nats_factory.cluster()`` a three-node cluster.
    Every one is stopped after the test."""
    factory = NatsFactory(tmp_path / "nats")
    try:
        yield factory
    finally:
        factory.stop()


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """DSN of the shared ``test`` database; prefer ``postgres_database`` in tests."""
    return ensure_postgres()


@pytest.fixture
def postgres_database(postgres_dsn: str) -> Iterator[str]:
    """DSN of a fresh, empty ``dcu_<uuid8>`` database, dropped after the test."""
    dsn = create_database()
    try:
        yield dsn
    finally:
        drop_database(dsn)


@pytest.fixture(scope="session")
def pushed_images(
    docker_engine: DockerEngine,
    registry: Registry,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PushedImages]:
    """SMALL, LARGE and NESTED by name; each is built and pushed on first access."""
    contexts = tmp_path_factory.mktemp("image-contexts")
    try:
        yield PushedImages(docker_engine, registry, contexts)
    finally:
        shutil.rmtree(contexts, ignore_errors=True)


@pytest.fixture
async def client(nats_server: NatsServer, settings: Any) -> AsyncIterator[Client]:
    """A plain NATS connection to the session's server for a module whose ``settings``
    fixture (a ``kernel.settings.Settings``) names its streams; deletes them afterwards."""
    nc = await nats.connect(nats_server.url)
    try:
        yield nc
    finally:
        js = nc.jetstream()
        for info in await js.streams_info():
            if str(info.config.name).startswith(settings.nats.stream):
                await js.delete_stream(str(info.config.name))
        await nc.close()


@pytest.fixture(params=[pytest.param("s3", id="s3"), pytest.param("local", id="local")])
async def object_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ObjectStore]:
    """One contract, two stores: the S3 store on the session's moto server, and the local
    store under the test's tmp dir; a bucket of the test's own, created, and parts of
    ``MIN_PART_SIZE`` bytes (the smallest S3 takes). Only the ``s3`` case starts moto."""
    bucket = f"dcu-{uuid.uuid4().hex[:12]}"
    if request.param == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        settings = s3.minio_settings(bucket=bucket, part_size=MIN_PART_SIZE)
    else:
        settings = MinioSettings(endpoint="", local_path=str(tmp_path / "objects"), bucket=bucket)
    store = open_store(settings)
    try:
        await store.ensure_bucket()
        yield store
    finally:
        await store.close()

"""Fixtures for the persistence contract suite: every test runs against SQLite (a file in
the test's tmp dir) and PostgreSQL (a fresh ``dcu_<uuid8>`` database per test), plus a
private nats-server per subscriber test.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from bus import Bus
from kernel.settings import NatsSettings
from persistence.database import Database
from persistence.repository import TaskRepository
from tests.polling import eventually
from tests.servers.nats import NatsFactory, NatsServer
from tests.servers.postgres import create_database, drop_database
from tests.timeline import T0, Timeline

# Imported by the test modules from here.
__all__ = ["T0", "Timeline", "eventually", "table_columns", "table_indexes", "table_rows"]

BACKENDS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres")]

DatabaseFactory = Callable[[], Awaitable[Database]]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_urls(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty database URLs of the test's backend (dropped afterwards)."""
    created: list[str] = []
    if backend == "postgres":
        request.getfixturevalue("postgres_dsn")  # starts the cluster if needed

    def new_url() -> str:
        if backend == "sqlite":
            url = f"sqlite://{tmp_path / uuid.uuid4().hex[:8] / 'dcu.db'}"
        else:
            url = create_database()
        created.append(url)
        return url

    try:
        yield new_url
    finally:
        if backend == "postgres":
            for url in created:
                drop_database(url)


@pytest.fixture
async def open_database(database_urls: Callable[[], str]) -> AsyncIterator[DatabaseFactory]:
    """A factory of migrated, empty databases; every one is closed after the test."""
    opened: list[Database] = []

    async def new_database() -> Database:
        database = await Database.open(database_urls())
        opened.append(database)
        return database

    try:
        yield new_database
    finally:
        for database in opened:
            await database.close()


@pytest.fixture
async def database(open_database: DatabaseFactory) -> Database:
    return await open_database()


@pytest.fixture
def repository(database: Database) -> TaskRepository:
    return TaskRepository(database)


# -- raw table access -----------------------------------------------------------------


async def table_rows(database: Database, table: str, order_by: str) -> list[dict[str, Any]]:
    """Every row of ``table`` as dicts (values as the driver returns them), minus ``id``."""
    with database.activate():
        rows = await database.client.execute_query_dict(
            f'SELECT * FROM "{table}" ORDER BY {order_by}'
        )
    return [{k: v for k, v in row.items() if k != "id"} for row in rows]


async def table_columns(database: Database, table: str) -> dict[str, bool]:
    """Column name -> nullable, read from the live schema."""
    with database.activate():
        if database.dialect == "sqlite":
            rows = await database.client.execute_query_dict(f'PRAGMA table_info("{table}")')
            return {row["name"]: not row["notnull"] and not row["pk"] for row in rows}
        rows = await database.client.execute_query_dict(
            "SELECT column_name, is_nullable FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = $1",
            [table],
        )
        return {row["column_name"]: row["is_nullable"] == "YES" for row in rows}


async def table_indexes(database: Database, table: str) -> dict[tuple[str, ...], bool]:
    """Indexed column tuple -> unique, read from the live schema (primary key excluded)."""
    found: dict[tuple[str, ...], bool] = {}
    with database.activate():
        client = database.client
        if database.dialect == "sqlite":
            for index in await client.execute_query_dict(f'PRAGMA index_list("{table}")'):
                if index["origin"] == "pk":
                    continue
                info = await client.execute_query_dict(f'PRAGMA index_info("{index["name"]}")')
                columns = tuple(row["name"] for row in sorted(info, key=lambda r: r["seqno"]))
                found[columns] = bool(index["unique"])
            return found
        rows = await client.execute_query_dict(
            "SELECT i.indisunique AS is_unique, "
            "array_agg(a.attname ORDER BY k.ord) AS columns "
            "FROM pg_index i "
            "JOIN pg_class t ON t.oid = i.indrelid "
            "JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true "
            "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum "
            "WHERE t.relname = $1 AND t.relnamespace = current_schema()::regnamespace "
            "AND NOT i.indisprimary "
            "GROUP BY i.indexrelid, i.indisunique",
            [table],
        )
        for row in rows:
            found[tuple(row["columns"])] = bool(row["is_unique"])
    return found


# -- NATS -----------------------------------------------------------------------------


@pytest.fixture
def private_nats(nats_factory: NatsFactory) -> NatsServer:
    """A nats-server of this test alone (the restart test restarts it)."""
    return nats_factory()


@pytest.fixture
def nats_settings(private_nats: NatsServer) -> NatsSettings:
    return NatsSettings(url=private_nats.url, stream=f"T{uuid.uuid4().hex[:8]}", ack_wait=5.0)


@pytest.fixture
async def event_bus(private_nats: NatsServer, nats_settings: NatsSettings) -> AsyncIterator[Bus]:
    """The test's NATS connection with the streams set up (``Bus``, as the roles have)."""
    connection = await Bus.connect(private_nats.url, nats_settings, "persistence-tests")
    try:
        await connection.ensure_streams()
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def nats_client(event_bus: Bus) -> Client:
    return event_bus.nc


@pytest.fixture
def js(event_bus: Bus) -> JetStreamContext:
    return event_bus.js

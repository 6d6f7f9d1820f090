"""The database edge: opening Tortoise for one URL, migrating the schema, translating errors.

A ``Database`` owns one ``TortoiseContext`` (its connections and model registry) instead
of Tortoise's process-global state, so two databases can be open in one process (a
rebuild from the stream writes into a second one) and nothing depends on which task
happened to call ``Tortoise.init``. Code that queries models enters ``database.activate()``
first; ``persistence.repository`` does this for every call.

The schema is brought up to date with Tortoise's own migrations (``tortoise.migrations``,
new in 1.x; files in ``persistence/migrations``, applied names recorded in
``tortoise_migrations`` so the ``tortoise`` CLI's ``history``/``sqlmigrate`` work too),
never with ``generate_schemas``. Two processes migrating one PostgreSQL database at once
serialise on an advisory lock; on SQLite the loser of a race retries once and finds the
work done.

Errors: everything here and in the repository raises ``DatabaseError`` (an
``UpstreamError``) for a database failure, never a Tortoise, asyncpg or sqlite3 type.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.backends.base.config_generator import expand_db_url
from tortoise.context import TortoiseContext, _current_context
from tortoise.exceptions import BaseORMException
from tortoise.migrations.executor import MigrationExecutor

from kernel.errors import DcuError, UpstreamError
from persistence.models import APP_LABEL

log = logging.getLogger(__name__)

_open: set[Database] = set()

MODELS_MODULE = "persistence.models"
MIGRATIONS_MODULE = "persistence.migrations"

# pg_advisory_lock key held while migrating ("dcu_mig" in ASCII).
MIGRATION_LOCK_KEY = 0x6463755F6D6967

DB_ERRORS: tuple[type[BaseException], ...] = (
    BaseORMException,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    sqlite3.Error,
    OSError,
)


class DatabaseError(UpstreamError):
    """The database failed or refused a statement (unreachable, locked, schema missing)."""


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Re-raise a database library error as ``DatabaseError`` naming ``what`` failed."""
    try:
        yield
    except DcuError:
        raise
    except DB_ERRORS as exc:
        raise DatabaseError(f"{what}: {type(exc).__name__}: {exc}") from exc


def connection_name(dialect: str) -> str:
    """The Tortoise connection alias for ``dialect``.

    Tortoise caches each model's INSERT statement per (alias, table) in a process-wide
    dict; one alias per dialect keeps a SQLite statement from ever reaching PostgreSQL.
    """
    return f"dcu_{dialect}"


def tortoise_config(url: str) -> dict[str, Any]:
    alias = connection_name(dialect_of(url))
    return {
        "connections": {alias: url},
        "apps": {
            APP_LABEL: {
                "models": [MODELS_MODULE],
                "migrations": MIGRATIONS_MODULE,
                "default_connection": alias,
            }
        },
        "use_tz": True,
        "timezone": "UTC",
    }


def dialect_of(url: str) -> str:
    """``sqlite`` or ``postgres``; raises ValueError for any other URL scheme."""
    scheme = url.partition("://")[0]
    if scheme == "sqlite":
        return "sqlite"
    if scheme in {"postgres", "postgresql", "asyncpg"}:
        return "postgres"
    raise ValueError(f"unsupported database URL scheme {scheme!r} (sqlite:// or postgres://)")


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for an in-memory database."""
    path = str(expand_db_url(url)["credentials"]["file_path"])
    if not path or path == ":memory:":
        return None
    return Path(path).expanduser()


def _prepare_sqlite(url: str) -> None:
    path = _sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


@contextlib.asynccontextmanager
async def _file_lock(path: Path) -> AsyncIterator[None]:
    """An exclusive ``flock`` on ``path`` between processes of this host (SQLite lives on
    one host); waiting happens in a thread so the event loop keeps running."""
    with path.open("a") as handle:
        await asyncio.to_thread(fcntl.flock, handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class Database:
    """One open database: a Tortoise context bound to ``url``. Build it with ``open``.

    Databases of one dialect can be open side by side; opening a PostgreSQL and a SQLite
    database at once in one process raises DatabaseError, because Tortoise keeps the
    dialect's query builder on the (shared) model classes.
    """

    def __init__(self, url: str, context: TortoiseContext) -> None:
        self.url = url
        self.dialect = dialect_of(url)
        self.connection_name = connection_name(self.dialect)
        self._context = context
        self._closed = False

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True) -> Database:
        """Open ``url`` and (by default) migrate it to the latest schema.

        Creates the parent directory of a SQLite file. Raises ValueError for an
        unsupported URL, DatabaseError when the database cannot be reached or migrated
        (the connections opened so far are closed again) or when a database of the other
        dialect is open in this process.
        """
        if url.startswith("sqlite://"):
            with translated(f"cannot create the directory of {url}"):
                _prepare_sqlite(url)
        dialect = dialect_of(url)
        others = {db.dialect for db in _open} - {dialect}
        if others:
            # Tortoise keeps dialect-specific query builders on the model classes.
            raise DatabaseError(
                f"cannot open a {dialect} database while a {others.pop()} one is open "
                "in this process"
            )
        context = TortoiseContext()
        try:
            with _entered(context), translated(f"cannot open database {_safe(url)}"):
                await context.init(config=tortoise_config(url))
        except BaseException:
            with contextlib.suppress(*DB_ERRORS):
                await context.close_connections()
            raise
        database = cls(url, context)
        _open.add(database)
        if migrate:
            try:
                await database.migrate()
            except BaseException:
                await database.close()
                raise
        return database

    @property
    def client(self) -> BaseDBAsyncClient:
        """The connection client; only valid inside ``activate()``."""
        return self._context.db(self.connection_name)

    @contextlib.contextmanager
    def activate(self) -> Iterator[Database]:
        """Make this database the one Tortoise models use in the current task.

        Raises DatabaseError once the database is closed.
        """
        if self._closed:
            raise DatabaseError(f"database {_safe(self.url)} is closed")
        with _entered(self._context):
            yield self

    async def migrate(self) -> list[str]:
        """Apply every migration not yet applied; returns their names in order.

        Safe to run again (nothing to do returns ``[]``) and from two processes at once.
        Raises DatabaseError when a migration fails (the failed one is rolled back).
        """
        with self.activate(), translated(f"cannot migrate {_safe(self.url)}"):
            try:
                applied = await self._migrate_locked()
            except BaseORMException as exc:
                if "already exists" not in str(exc).lower():
                    raise
                # Another process created the objects between our plan and our DDL.
                log.info("database %s: concurrent migration detected, retrying", _safe(self.url))
                applied = await self._migrate_locked()
        for name in applied:
            log.info("database %s: applied migration %s", _safe(self.url), name)
        return applied

    async def _migrate_locked(self) -> list[str]:
        async with self._migration_lock():
            return await self._run_migrations()

    @contextlib.asynccontextmanager
    async def _migration_lock(self) -> AsyncIterator[None]:
        if self.dialect != "postgres":
            # Two processes migrating one SQLite file at once could wedge each other in
            # SQLite's locking (seen as a hang): they take turns on a lock file instead.
            database_file = _sqlite_file(self.url)
            if database_file is None:
                yield
                return
            async with _file_lock(database_file.with_name(database_file.name + ".migrate.lock")):
                yield
            return
        async with self.client.acquire_connection() as connection:
            await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
            try:
                yield
            finally:
                await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)

    async def _run_migrations(self) -> list[str]:
        applied: list[str] = []

        def progress(event: str, _app_label: str, name: str) -> None:
            if event == "apply_done":
                applied.append(name)

        apps = tortoise_config(self.url)["apps"]
        executor = MigrationExecutor(self.client, apps)
        await executor.migrate(direction="forward", progress=progress)
        return applied

    async def close(self) -> None:
        """Close every connection; closing twice is fine."""
        self._closed = True
        _open.discard(self)
        with translated(f"cannot close database {_safe(self.url)}"):
            await self._context.close_connections()


@contextlib.contextmanager
def _entered(context: TortoiseContext) -> Iterator[None]:
    """Make ``context`` current until the block ends.

    Not ``with context:``: TortoiseContext keeps the contextvar token on the instance, so
    two tasks using one database at once would reset each other's tokens.
    """
    token = _current_context.set(context)
    try:
        yield
    finally:
        _current_context.reset(token)


def _safe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}{sep}{user}@{host}"


async def migrate(url: str) -> list[str]:
    """Migrate the database at ``url`` and close it; returns the migration names applied."""
    database = await Database.open(url, migrate=False)
    try:
        return await database.migrate()
    finally:
        await database.close()

"""Opening, migrating and closing databases, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from tortoise.migrations.autodetector import MigrationAutodetector
from tortoise.migrations.executor import MigrationExecutor, MigrationTarget

from events.schema import Downloaded
from events.states import TaskState
from persistence import database as database_module
from persistence.database import (
    Database,
    DatabaseError,
    migrate,
    tortoise_config,
)
from persistence.models import APP_LABEL
from persistence.repository import ApplyOutcome, TaskRepository
from tests.persistence.conftest import Timeline, table_rows
from tests.servers.postgres import dsn_for

ALL_MIGRATIONS = [
    "0001_initial",
    "0002_registry_engine",
    "0003_refused_events",
    "0004_archive_formats",
]
ROOT = Path(__file__).resolve().parents[2]


async def test_migrations_apply_once_and_then_do_nothing(
    database_urls: Callable[[], str],
) -> None:
    url = database_urls()

    assert await migrate(url) == ALL_MIGRATIONS
    assert await migrate(url) == []

    database = await Database.open(url)  # migrates again on open: nothing to do
    try:
        assert await database.migrate() == []
        applied = await table_rows(database, "tortoise_migrations", "applied_at")
        assert [(row["app"], row["name"]) for row in applied] == [
            (APP_LABEL, name) for name in ALL_MIGRATIONS
        ]
    finally:
        await database.close()
        await database.close()  # closing twice is fine


async def test_two_processes_migrating_at_once_both_succeed(
    database_urls: Callable[[], str],
) -> None:
    url = database_urls()
    script = textwrap.dedent(
        f"""
        import asyncio
        from persistence.database import migrate
        print(",".join(asyncio.run(migrate({url!r}))))
        """
    )

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    first, second = await asyncio.gather(asyncio.to_thread(run), asyncio.to_thread(run))

    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    outputs = sorted([first.stdout.strip(), second.stdout.strip()])
    assert outputs == ["", ",".join(ALL_MIGRATIONS)]
    assert await migrate(url) == []


async def test_a_database_of_the_first_schema_is_upgraded_in_place(
    database_urls: Callable[[], str],
) -> None:
    # Given a database migrated to 0001 only, holding a task with details
    database = await Database.open(database_urls(), migrate=False)
    try:
        with database.activate():
            executor = MigrationExecutor(database.client, tortoise_config(database.url)["apps"])
            await executor.migrate([MigrationTarget(APP_LABEL, "0001_initial")])
        tasks = TaskRepository(database)
        timeline = Timeline()
        await tasks.apply(timeline.requested(), 1)
        with database.activate():
            await database.client.execute_query(
                'INSERT INTO "dcu_task_details" ("task_id", "image_id", "tar_bytes") '
                + ("VALUES (?, ?, ?)" if database.dialect == "sqlite" else "VALUES ($1, $2, $3)"),
                [timeline.task_id, "sha256:old", 5],
            )

        # When it is migrated
        assert await database.migrate() == ALL_MIGRATIONS[1:]

        # Then the old row is kept, the new facts unknown, and new events can record them
        detail = await tasks.get_detail(timeline.task_id)
        assert detail is not None
        assert (detail.image_id, detail.tar_bytes) == ("sha256:old", 5)
        assert (detail.platform, detail.manifest_digest, detail.engine, detail.reused) == (
            None,
            None,
            None,
            None,
        )
        assert (detail.fetched_bytes, detail.cached_bytes) == (None, None)
        downloaded = Downloaded(
            docker_image_name="nginx:latest",
            image_id="sha256:new",
            tar_path="/t",
            bytes=7,
            engine="registry",
            platform="linux/arm64",
            fetched_bytes=3,
            cached_bytes=4,
        )
        assert await tasks.apply(timeline.event(downloaded), 2) is ApplyOutcome.APPLIED
        detail = await tasks.get_detail(timeline.task_id)
        assert detail is not None
        assert (detail.engine, detail.platform, detail.reused) == ("registry", "linux/arm64", False)
        assert (detail.fetched_bytes, detail.cached_bytes) == (3, 4)
    finally:
        await database.close()


async def test_models_and_migrations_agree(database: Database) -> None:
    # A model change without its migration would show up here as a pending change.
    apps = tortoise_config(database.url)["apps"]
    with database.activate():
        context_apps = database._context.apps
        assert context_apps is not None
        writers = await MigrationAutodetector(context_apps, apps).changes()
    assert [writer.name for writer in writers] == []


async def test_an_unreachable_database_raises_database_error(backend: str, tmp_path: Path) -> None:
    if backend == "sqlite":
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        url = f"sqlite://{blocker / 'sub' / 'dcu.db'}"
    else:
        url = dsn_for("dcu_no_such_database")

    with pytest.raises(DatabaseError):
        await Database.open(url)
    assert not database_module._open


async def test_a_closed_database_cannot_be_used_by_its_repository(
    database: Database,
) -> None:
    tasks = TaskRepository(database)
    timeline = Timeline()
    await tasks.apply(timeline.requested(), 1)
    await tasks.ping()
    await database.close()

    with pytest.raises(DatabaseError, match="is closed"):
        await tasks.get(timeline.task_id)
    with pytest.raises(DatabaseError):
        await tasks.ping()


async def test_unsupported_urls_are_refused() -> None:
    with pytest.raises(ValueError):
        await Database.open("mysql://root@localhost/dcu")


async def test_sqlite_and_postgres_cannot_be_open_at_once(
    tmp_path: Path, postgres_dsn: str
) -> None:
    sqlite = await Database.open(f"sqlite://{tmp_path / 'dcu.db'}")
    try:
        with pytest.raises(DatabaseError, match="while a sqlite one is open"):
            await Database.open(postgres_dsn, migrate=False)
    finally:
        await sqlite.close()


async def test_two_processes_writing_at_once_never_fail(
    database_urls: Callable[[], str],
) -> None:
    # Given one database and two processes applying whole pipelines into it at once
    url = database_urls()
    await migrate(url)
    script = textwrap.dedent(
        f"""
        import asyncio
        from persistence.database import Database
        from persistence.repository import TaskRepository
        from tests.persistence.conftest import Timeline

        async def main():
            database = await Database.open({url!r})
            repository = TaskRepository(database)
            try:
                for _ in range(25):
                    for event in Timeline().happy_path():
                        await repository.apply(event, None)
            finally:
                await database.close()

        asyncio.run(main())
        """
    )

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    # When both run
    results = await asyncio.gather(asyncio.to_thread(run), asyncio.to_thread(run))

    # Then neither saw a database error and every task completed
    assert [r.returncode for r in results] == [0, 0], "".join(r.stderr for r in results)
    database = await Database.open(url)
    try:
        total, _ = await TaskRepository(database).query(page=1, page_size=1)
        completed, _ = await TaskRepository(database).query(
            state=TaskState.COMPLETED, page=1, page_size=1
        )
    finally:
        await database.close()
    assert (total, completed) == (50, 50)

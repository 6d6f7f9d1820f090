"""The long-term audit archive against a real nats-server and S3 (moto): segments in
order, chained by sha256; ``replay --from-archive`` rebuilds what the stream forgot; a
gap or an edited segment is refused (issue 8, "Long-term audit archive")."""

from __future__ import annotations

import dataclasses
import gzip
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

import bus
from actors.archiver import AuditArchiver, list_segments
from actors.object_store import ObjectStore, S3ObjectStore
from dcu.replay import ReplayRefused, replay
from events import audit_archive, subjects
from events.cleanup import CleanupEventType, CleanupKind
from events.schema import Progress
from kernel.settings import ArchiveSettings, MinioSettings, NatsSettings, Settings
from persistence.database import Database
from persistence.repository import TaskRepository
from tests.persistence.conftest import Timeline
from tests.servers.nats import NatsServer

FACTS = len(Timeline().happy_path())  # lifecycle facts of one completed task


@pytest.fixture
def settings(nats_server: NatsServer, s3_server: Any) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings(
        nats=NatsSettings(url=nats_server.url, stream=f"A{tag}", subject_prefix=f"a{tag}"),
        minio=MinioSettings(
            endpoint=s3_server.endpoint,
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
            bucket=f"audit-{tag}",
        ),
        archive=ArchiveSettings(segment_max_events=4),
    )


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[ObjectStore]:
    opened = S3ObjectStore(settings.minio)
    try:
        yield opened
    finally:
        await opened.close()


async def deletable_streams(client: Client, settings: Settings) -> None:
    """The wanted streams, except that the audit stream allows deleting messages (as an
    operator's hand-made one might), so a test can make the stream forget its head."""
    js = client.jetstream()
    wanted = bus.stream_configs(settings.nats)[0]
    await js.add_stream(dataclasses.replace(wanted, deny_delete=False, deny_purge=False))
    await bus.ensure_streams(js, settings.nats)


async def publish_tasks(client: Client, settings: Settings, count: int) -> list[Timeline]:
    timelines = [Timeline() for _ in range(count)]
    for timeline in timelines:
        for event in timeline.happy_path():
            await bus.Bus(client, settings.nats).publish(event)
        progress = timeline.event(Progress(stage="upload", bytes_done=7, bytes_total=7))
        await bus.Bus(client, settings.nats).publish(progress)
    return timelines


async def rows(url: str) -> list[Any]:
    database = await Database.open(url)
    try:
        repository = TaskRepository(database)
        _, tasks = await repository.query(page=1, page_size=100)
        found = []
        for task in sorted(tasks, key=lambda t: t.task_id):
            found.append(
                (
                    task,
                    await repository.get_detail(task.task_id),
                    await repository.transitions(task.task_id),
                )
            )
        return found
    finally:
        await database.close()


async def test_segments_are_written_in_order_and_chained(
    client: Client, settings: Settings, store: ObjectStore
) -> None:
    await bus.ensure_streams(client.jetstream(), settings.nats)
    await publish_tasks(client, settings, 1)  # FACTS facts, then a cleanup fact
    cleanup = subjects.cleanup(
        CleanupKind.GZIP, CleanupEventType.REQUESTED, settings.nats.subject_prefix
    )
    await client.jetstream().publish(cleanup, b'{"x":1}', headers={"Nats-Msg-Id": "c1"})
    archiver = AuditArchiver(settings, bus.Bus(client, settings.nats), store)

    written = await archiver.archive_once()

    prefix, stream = settings.minio.prefix, settings.nats.audit_stream
    total = FACTS + 1
    assert [audit_archive.parse_name(n, prefix, stream) for n in written] == [
        (first, min(first + 3, total)) for first in range(1, total + 1, 4)
    ]
    assert await list_segments(store, prefix, stream) == written
    previous = ""
    for name in written:
        info = await store.stat(name)
        body = await store.get_bytes(name)
        assert info is not None and body is not None
        assert info.metadata["sha256"] == audit_archive.sha256(body)
        assert info.metadata["prev-sha256"] == previous
        previous = info.metadata["sha256"]
    last = gzip.decompress(body).decode().splitlines()[-1]
    assert '"subject":"' + cleanup + '"' in last and '"msg_id":"c1"' in last
    # and a pass with nothing new writes nothing; a new fact goes in a new segment
    assert await archiver.archive_once() == []
    await publish_tasks(client, settings, 1)
    more = await archiver.archive_once()
    assert audit_archive.parse_name(more[0], prefix, stream) == (total + 1, total + 4)


async def test_replay_from_the_archive_rebuilds_what_the_stream_forgot(
    client: Client, settings: Settings, store: ObjectStore, nats_server: NatsServer, tmp_path: Path
) -> None:
    await deletable_streams(client, settings)
    await publish_tasks(client, settings, 3)
    live = f"sqlite://{tmp_path / 'live.db'}"
    await replay(settings, live)  # the database as it is with every fact
    # Given: the first facts are archived, later ones only in the stream
    await AuditArchiver(settings, bus.Bus(client, settings.nats), store).archive_once()
    await publish_tasks(client, settings, 1)
    await replay(settings, live)
    # When: the stream forgets its head (the first 12 facts)
    js = client.jetstream()
    for seq in range(1, 13):
        await js.delete_msg(settings.nats.audit_stream, seq)
    with pytest.raises(ReplayRefused, match="--from-archive"):
        await replay(settings, f"sqlite://{tmp_path / 'plain.db'}")

    rebuilt = f"sqlite://{tmp_path / 'rebuilt.db'}"
    report = await replay(settings, rebuilt, from_archive=True)

    # Then: the rebuild from archive and stream equals the database of every fact
    assert not report.partial and report.archived == 3 * FACTS
    assert report.counts.tasks == 4
    assert await rows(rebuilt) == await rows(live)


@pytest.mark.parametrize("damage", ["edited", "missing"])
async def test_a_damaged_archive_is_refused(
    client: Client,
    settings: Settings,
    store: ObjectStore,
    nats_server: NatsServer,
    tmp_path: Path,
    damage: str,
) -> None:
    await bus.ensure_streams(client.jetstream(), settings.nats)
    await publish_tasks(client, settings, 2)
    written = await AuditArchiver(settings, bus.Bus(client, settings.nats), store).archive_once()
    middle = written[1]
    if damage == "edited":
        info = await store.stat(middle)
        body = await store.get_bytes(middle)
        assert info is not None and body is not None
        text = gzip.decompress(body).replace(b"test_user", b"mallory__")
        await store.put_bytes(middle, gzip.compress(text), dict(info.metadata))
        expected = "was edited"
    else:
        await store.remove(middle)
        expected = "gap before"

    with pytest.raises(ReplayRefused, match=expected):
        await replay(settings, f"sqlite://{tmp_path / 'x.db'}", from_archive=True)
    assert not (tmp_path / "x.db").exists()

"""The stream topology on a real nats-server: three streams set up in one place, a
replay that refuses a stream whose head is gone, and the migration from the single
stream of earlier versions (issue 8, finding 1)."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StreamConfig

import bus
from dcu.migrate import migrate_streams
from dcu.replay import ReplayRefused, replay
from events import subjects
from events.cleanup import CleanupEventType, CleanupKind
from events.schema import Event, Progress
from kernel.settings import NatsSettings, Settings
from persistence.database import Database
from persistence.repository import TaskRepository
from tests.persistence.conftest import Timeline
from tests.servers.nats import NatsServer


@pytest.fixture
def settings(nats_server: NatsServer) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings(
        nats=NatsSettings(url=nats_server.url, stream=f"S{tag}", subject_prefix=f"s{tag}")
    )


async def publish(js: JetStreamContext, event: Event, prefix: str) -> None:
    subject = subjects.for_event(event, prefix)
    await js.publish(subject, event.encode(), headers={"Nats-Msg-Id": event.event_id})


async def test_setup_creates_three_streams_each_configured_for_its_purpose(
    client: Client, settings: Settings
) -> None:
    js = client.jetstream()
    nats_settings = settings.nats

    assert await bus.ensure_streams(js, nats_settings) == {}

    audit = (await js.stream_info(nats_settings.audit_stream)).config
    assert sorted(audit.subjects or []) == sorted(
        [f"{nats_settings.subject_prefix}.task.>", f"{nats_settings.subject_prefix}.cleanup.>"]
    )
    assert (audit.retention, audit.discard) == (RetentionPolicy.LIMITS, DiscardPolicy.NEW)
    assert (audit.deny_delete, audit.deny_purge) == (True, True)
    assert audit.max_bytes == nats_settings.audit_max_bytes and not audit.max_age
    progress = (await js.stream_info(nats_settings.progress_stream)).config
    assert progress.max_msgs_per_subject == 1
    assert progress.max_age == nats_settings.progress_max_age
    work = (await js.stream_info(nats_settings.work_stream)).config
    assert work.retention == RetentionPolicy.WORK_QUEUE
    # and each kind of message lands in its own stream
    timeline = Timeline()
    prefix = nats_settings.subject_prefix
    await publish(js, timeline.requested(), prefix)
    for done in (10, 20, 30):
        await publish(js, timeline.event(Progress(stage="download", bytes_done=done)), prefix)
    assert (await js.stream_info(nats_settings.audit_stream)).state.messages == 1
    [latest] = [
        json.loads((await js.get_last_msg(nats_settings.progress_stream, subject)).data or b"")
        for subject in [subjects.progress(timeline.task_id, prefix)]
    ]
    assert latest["payload"]["bytes_done"] == 30
    assert (await js.stream_info(nats_settings.progress_stream)).state.messages == 1


async def test_differences_are_reported_not_overwritten_unless_applied(
    client: Client, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    js = client.jetstream()
    nats_settings = settings.nats
    await bus.ensure_streams(js, nats_settings)
    # Given: an operator raised the audit stream's size limit by hand
    audit = (await js.stream_info(nats_settings.audit_stream)).config
    await js.update_stream(dataclasses.replace(audit, max_bytes=20 * 1024**3))

    found = await bus.ensure_streams(js, nats_settings)

    assert found == {
        nats_settings.audit_stream: [
            f"max_bytes: server has {20 * 1024**3}, settings want {nats_settings.audit_max_bytes}"
        ]
    }
    assert any("differs from the settings: max_bytes" in r.getMessage() for r in caplog.records)
    assert (await js.stream_info(nats_settings.audit_stream)).config.max_bytes == 20 * 1024**3
    # and with apply, the settings win
    await bus.ensure_streams(js, nats_settings, apply=True)
    audit = (await js.stream_info(nats_settings.audit_stream)).config
    assert audit.max_bytes == nats_settings.audit_max_bytes
    assert await bus.ensure_streams(js, nats_settings) == {}


async def test_setup_refuses_while_the_single_stream_of_earlier_versions_is_there(
    client: Client, settings: Settings
) -> None:
    js = client.jetstream()
    await js.add_stream(
        name=settings.nats.stream, subjects=[subjects.all_events(settings.nats.subject_prefix)]
    )
    with pytest.raises(bus.LegacyStream, match="dcu migrate-streams"):
        await bus.ensure_streams(js, settings.nats)


async def _rows(url: str) -> tuple[list[Any], list[Any], list[Any]]:
    database = await Database.open(url)
    try:
        repository = TaskRepository(database)
        _, tasks = await repository.query(page=1, page_size=100)
        details = [await repository.get_detail(t.task_id) for t in tasks]
        log = [await repository.transitions(t.task_id) for t in tasks]
        return sorted(tasks, key=lambda t: t.task_id), details, log
    finally:
        await database.close()


async def test_replay_refuses_a_stream_whose_head_is_gone(
    client: Client, settings: Settings, tmp_path: Path, nats_server: NatsServer
) -> None:
    js = client.jetstream()
    nats_settings = settings.nats
    prefix = nats_settings.subject_prefix
    # Given: an audit stream an operator created without deny_delete (the settings'
    # stream would refuse the deletion below), holding two tasks' histories
    wanted = bus.stream_configs(nats_settings)[0]
    await js.add_stream(dataclasses.replace(wanted, deny_delete=False, deny_purge=False))
    await bus.ensure_streams(js, nats_settings)
    first, second = Timeline(), Timeline()
    for event in [*first.happy_path(), *second.happy_path()]:
        await publish(js, event, prefix)
    # When: the head of the stream (the first task's ``requested``) is deleted
    await js.delete_msg(nats_settings.audit_stream, 1)

    with pytest.raises(ReplayRefused, match="no longer starts at its first fact"):
        await replay(settings, f"sqlite://{tmp_path / 'refused.db'}")

    # Then: nothing was written; with --allow-partial it rebuilds what is left and says so
    assert not (tmp_path / "refused.db").exists()
    report = await replay(settings, f"sqlite://{tmp_path / 'partial.db'}", allow_partial=True)
    assert report.partial and report.first_seq == 2
    assert report.counts.tasks == 1
    assert report.counts.applied == len(first.happy_path()) - 1 + len(second.happy_path())
    tasks, _, _ = await _rows(f"sqlite://{tmp_path / 'partial.db'}")
    assert [t.task_id for t in tasks] == [second.task_id]


async def test_replay_of_a_whole_stream_is_not_partial(
    client: Client, settings: Settings, tmp_path: Path, nats_server: NatsServer
) -> None:
    js = client.jetstream()
    await bus.ensure_streams(js, settings.nats)
    timeline = Timeline()
    for event in timeline.happy_path():
        await publish(js, event, settings.nats.subject_prefix)

    report = await replay(settings, f"sqlite://{tmp_path / 'whole.db'}")

    assert not report.partial and report.first_seq == 1
    assert (report.counts.tasks, report.counts.applied) == (1, len(timeline.happy_path()))


async def test_migration_moves_the_facts_of_the_single_stream_in_order(
    client: Client, settings: Settings, nats_server: NatsServer
) -> None:
    js = client.jetstream()
    nats_settings = settings.nats
    prefix = nats_settings.subject_prefix
    # Given: the single stream of an earlier version, with its durables, holding task
    # facts, progress, a cleanup fact, a queue message and a dead letter
    await js.add_stream(
        StreamConfig(name=nats_settings.stream, subjects=[subjects.all_events(prefix)])
    )
    await js.add_consumer(nats_settings.stream, durable_name="download")
    timeline = Timeline()
    facts = timeline.happy_path()
    published: list[tuple[str, str]] = []
    for index, event in enumerate(facts):
        subject = f"{prefix}.task.{event.task_id}.{event.type}"
        await js.publish(subject, event.encode(), headers={"Nats-Msg-Id": event.event_id})
        published.append((subject, event.event_id))
        if index == 1:  # the old layout kept progress beside the facts
            progress = timeline.event(Progress(stage="download", bytes_done=5))
            old = f"{prefix}.task.{event.task_id}.progress"
            await js.publish(old, progress.encode(), headers={"Nats-Msg-Id": progress.event_id})
    cleanup = subjects.cleanup(CleanupKind.GZIP, CleanupEventType.REQUESTED, prefix)
    await js.publish(cleanup, b'{"kind":"gzip"}', headers={"Nats-Msg-Id": "cleanup-1"})
    published.append((cleanup, "cleanup-1"))
    await js.publish(f"{prefix}.queue.download", b"{}", headers={"Nats-Msg-Id": "q-1"})
    await js.publish(f"{prefix}.dead.download", b'{"error":"x"}', headers={"Nats-Msg-Id": "d-1"})

    report = await migrate_streams(settings)

    assert (report.read, report.facts, report.dead_letters, report.skipped) == (
        len(facts) + 4,
        len(facts) + 1,
        1,
        2,
    )
    assert not report.old_stream_deleted
    audit = nats_settings.audit_stream
    state = (await js.stream_info(audit)).state
    copied = [await js.get_msg(audit, seq) for seq in range(1, state.last_seq + 1)]
    assert [(m.subject, (m.headers or {})["Nats-Msg-Id"]) for m in copied] == published
    dead = await js.get_last_msg(nats_settings.work_stream, f"{prefix}.dead.download")
    assert dead.data == b'{"error":"x"}'
    assert await bus.ensure_streams(js, nats_settings) == {}
    # Run again (a migration that stopped half-way is resumed): nothing is copied twice,
    # and the old stream is deleted once the copy is complete
    again = await migrate_streams(settings, delete_old=True)
    assert again.old_stream_deleted and again.facts == len(facts) + 1
    assert (await js.stream_info(audit)).state.messages == len(facts) + 1
    names = [str(i.config.name) for i in await js.streams_info()]
    assert nats_settings.stream not in names


async def test_settings_for_a_cluster_work_against_a_single_server(
    client: Client, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    js = client.jetstream()
    three = settings.nats.model_copy(update={"replicas": 3})
    assert bus.cluster_size(client) == 1

    await bus.ensure_streams(js, three, peers=bus.cluster_size(client))

    for name in (three.audit_stream, three.progress_stream, three.work_stream):
        assert (await js.stream_info(name)).config.num_replicas == 1
    assert any("nats.replicas is 3" in r.getMessage() for r in caplog.records)
    assert await bus.ensure_streams(js, three, peers=1) == {}

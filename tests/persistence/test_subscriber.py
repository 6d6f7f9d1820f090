"""The persistence subscriber and the stream rebuild, against a real nats-server and both
database backends."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from nats.js import JetStreamContext

from bus import Bus
from events import subjects
from events.schema import Event, EventType
from events.states import TaskState
from kernel.errors import BusError, NotFound
from kernel.settings import NatsSettings
from persistence.database import Database, DatabaseError
from persistence.repository import ApplyOutcome, TaskRepository
from persistence.subscriber import (
    PersistenceSubscriber,
    ReplayCounts,
    consumer_name,
    rebuild_from_stream,
)
from tests.persistence.conftest import Timeline, eventually, table_rows
from tests.servers.nats import NatsServer, durable_caught_up

SubscriberFactory = Callable[..., Awaitable[PersistenceSubscriber]]


@pytest.fixture
async def start_subscriber(event_bus: Bus) -> AsyncIterator[SubscriberFactory]:
    """Starts subscribers (quick fetch timeout) and stops every one after the test."""
    started: list[PersistenceSubscriber] = []

    async def start(sink: object, **options: float) -> PersistenceSubscriber:
        options.setdefault("fetch_timeout", 1.0)
        subscriber = PersistenceSubscriber(event_bus, sink, **options)  # type: ignore[arg-type]
        await subscriber.start()
        started.append(subscriber)
        return subscriber

    try:
        yield start
    finally:
        for subscriber in started:
            await subscriber.stop(grace=5)


async def publish_all(
    js: JetStreamContext, settings: NatsSettings, events: list[Event]
) -> list[int]:
    prefix = settings.subject_prefix
    return [
        (
            await js.publish(
                subjects.for_event(event, prefix),
                event.encode(),
                headers={"Nats-Msg-Id": event.event_id},
            )
        ).seq
        for event in events
    ]


async def drained(js: JetStreamContext, settings: NatsSettings) -> bool:
    return await durable_caught_up(js, settings.audit_stream, consumer_name(settings))


async def publish_raw(
    js: JetStreamContext, settings: NatsSettings, task_id: str, kind: str, data: bytes
) -> int:
    subject = f"{settings.subject_prefix}.task.{task_id}.{kind}"
    ack = await js.publish(subject, data, headers={"Nats-Msg-Id": str(uuid.uuid4())})
    return int(ack.seq)


def poison_requested(timeline: Timeline) -> bytes:
    """A ``requested`` event whose username holds a lone surrogate in JSON escape form:
    json.loads accepts it, no database driver can encode it."""
    data = timeline.requested().to_dict()
    data["payload"]["username"] = "u\ud800"
    raw = json.dumps(data).encode()
    assert b"\\ud800" in raw
    return raw


def unknown_type(timeline: Timeline, kind: str = "scanned") -> bytes:
    """A well-formed event of a type this version does not know (a newer producer's)."""
    return json.dumps({**timeline.requested().to_dict(), "type": kind, "payload": {}}).encode()


async def redelivered(js: JetStreamContext, settings: NatsSettings) -> bool:
    info = await js.consumer_info(settings.audit_stream, consumer_name(settings))
    return bool(info.num_redelivered)


def state_is(
    repository: TaskRepository, task_id: str, state: TaskState
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            return (await repository.get(task_id)).state is state
        except Exception:
            return False

    return check


async def test_published_events_become_rows(
    js: JetStreamContext,
    nats_settings: NatsSettings,
    repository: TaskRepository,
    start_subscriber: SubscriberFactory,
) -> None:
    # Given a running subscriber
    await start_subscriber(repository)
    first, second = Timeline(), Timeline()

    # When two pipelines publish their events, interleaved
    events = [e for pair in zip(first.happy_path(), second.happy_path(), strict=True) for e in pair]
    seqs = await publish_all(js, nats_settings, events)

    # Then both tasks complete and the log carries the stream sequences
    await eventually(state_is(repository, first.task_id, TaskState.COMPLETED), what="first task")
    await eventually(state_is(repository, second.task_id, TaskState.COMPLETED), what="second task")
    log = await repository.transitions(first.task_id)
    assert [entry.stream_seq for entry in log] == seqs[0::2]
    assert all(entry.applied for entry in log)
    await eventually(lambda: drained(js, nats_settings), what="consumer drained")


async def test_garbage_is_refused_and_later_events_still_land(
    js: JetStreamContext,
    nats_settings: NatsSettings,
    repository: TaskRepository,
    start_subscriber: SubscriberFactory,
) -> None:
    await start_subscriber(repository)
    timeline = Timeline()
    subject = subjects.task_event(
        timeline.task_id, EventType.REQUESTED, nats_settings.subject_prefix
    )

    first = await js.publish(subject, b"\xff not an event at all\x00")
    second = await js.publish(subject, b'{"type": "requested", "task_id": "x"}')
    await publish_all(js, nats_settings, timeline.happy_path()[:2])

    await eventually(state_is(repository, timeline.task_id, TaskState.DOWNLOADING), what="task")
    await eventually(lambda: drained(js, nats_settings), what="consumer drained")
    info = await js.consumer_info(nats_settings.audit_stream, consumer_name(nats_settings))
    assert info.num_redelivered == 0
    # Both are kept, newest first, with their bytes (escaped) and what the envelope says
    newest, oldest = await repository.refused_events()
    assert (oldest.stream_seq, newest.stream_seq) == (first.seq, second.seq)
    assert (oldest.stream, oldest.subject) == (nats_settings.audit_stream, subject)
    assert oldest.raw == "\\xff not an event at all\\x00"
    assert (oldest.task_id, oldest.event_id, oldest.event_type) == (None, None, None)
    assert oldest.reason.startswith("not an event: event is not JSON")
    assert (newest.task_id, newest.event_id, newest.event_type) == ("x", None, "requested")
    assert newest.reason.startswith("not an event: not a DCU event")
    assert not oldest.raw_truncated and not newest.raw_truncated


async def test_an_event_no_database_can_store_is_refused_and_the_next_one_lands(
    js: JetStreamContext,
    nats_settings: NatsSettings,
    repository: TaskRepository,
    start_subscriber: SubscriberFactory,
) -> None:
    # Given a running subscriber
    await start_subscriber(repository, retry_delay=0.1)
    poisoned, healthy = Timeline(), Timeline()

    # When an event holding a lone surrogate is followed by a normal one for another task
    seq = await publish_raw(
        js, nats_settings, poisoned.task_id, "requested", poison_requested(poisoned)
    )
    await publish_all(js, nats_settings, [healthy.requested()])

    # Then the normal one is recorded, the poison one refused with its position and reason
    await eventually(state_is(repository, healthy.task_id, TaskState.IDLE), what="next event")
    await eventually(lambda: drained(js, nats_settings), what="nothing pending")
    [refused] = await repository.refused_events()
    assert (refused.stream_seq, refused.task_id, refused.event_type) == (
        seq,
        poisoned.task_id,
        "requested",
    )
    assert "surrogate" in refused.reason
    assert "\\ud800" in refused.raw
    assert await repository.transitions(poisoned.task_id) == []
    info = await js.consumer_info(nats_settings.audit_stream, consumer_name(nats_settings))
    assert info.num_redelivered == 0


async def test_an_unknown_type_is_refused_after_its_grace_and_the_next_event_lands(
    js: JetStreamContext,
    nats_settings: NatsSettings,
    repository: TaskRepository,
    start_subscriber: SubscriberFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="persistence.subscriber")
    # Given a subscriber that waits 1 s for a newer replica to take an unknown type
    await start_subscriber(repository, unknown_type_grace=1.0, unknown_retry_delay=0.1)
    newer, healthy = Timeline(), Timeline()

    # When a newer producer's event is followed by a known one
    seq = await publish_raw(js, nats_settings, newer.task_id, "scanned", unknown_type(newer))
    await publish_all(js, nats_settings, [healthy.requested()])

    # Then it was offered again, then refused, and the known one is recorded after it
    await eventually(state_is(repository, healthy.task_id, TaskState.IDLE), what="next event")
    await eventually(lambda: drained(js, nats_settings), what="nothing pending")
    offered_again = [r for r in caplog.records if "for a newer replica" in r.getMessage()]
    assert offered_again
    [refused] = await repository.refused_events()
    assert (refused.stream_seq, refused.task_id, refused.event_type) == (
        seq,
        newer.task_id,
        "scanned",
    )
    assert refused.reason == "unknown event type 'scanned'"  # as a replay records it


async def test_an_unknown_type_within_its_grace_stays_pending(
    js: JetStreamContext,
    nats_settings: NatsSettings,
    repository: TaskRepository,
    start_subscriber: SubscriberFactory,
) -> None:
    # Given a subscriber with the default grace of minutes
    await start_subscriber(repository, unknown_retry_delay=0.1)
    newer, healthy = Timeline(), Timeline()

    # When a newer producer's event arrives, then a known one
    await publish_raw(js, nats_settings, newer.task_id, "scanned", unknown_type(newer))
    await publish_all(js, nats_settings, [healthy.requested()])

    # Then the unknown one is offered again (for a newer replica), not terminated, and
    # the known one waits behind it: the stream order holds
    await eventually(lambda: redelivered(js, nats_settings), what="unknown type offered again")
    info = await js.consumer_info(nats_settings.audit_stream, consumer_name(nats_settings))
    assert (info.num_ack_pending, info.num_pending) == (1, 1)
    assert await repository.refused_events() == []
    with pytest.raises(NotFound):
        await repository.get(healthy.task_id)


async def test_events_keep_landing_across_a_nats_restart(
    js: JetStreamContext,
    nats_settings: NatsSettings,
    event_bus: Bus,
    private_nats: NatsServer,
    repository: TaskRepository,
    start_subscriber: SubscriberFactory,
) -> None:
    subscriber = await start_subscriber(repository)
    timeline = Timeline()
    events = timeline.happy_path()
    await publish_all(js, nats_settings, events[:3])
    await eventually(
        state_is(repository, timeline.task_id, TaskState.DOWNLOADING), what="first half"
    )

    # When the server restarts (same port, same store) mid-stream
    await asyncio.to_thread(private_nats.restart)

    # Then the events published after it still land
    deadline = time.monotonic() + 20
    for event in events[3:]:
        while True:
            try:
                await event_bus.publish(event)
                break
            except BusError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    await eventually(
        state_is(repository, timeline.task_id, TaskState.COMPLETED), timeout=30, what="second half"
    )
    assert subscriber.running


class FlakySink:
    """Fails the first attempt at each event in ``fail_once``, like a database outage."""

    def __init__(self, repository: TaskRepository, fail_once: set[str]) -> None:
        self.repository = repository
        self.fail_once = set(fail_once)
        self.applied: list[str] = []
        self.attempts: list[str] = []

    async def record_refused(self, **fields: Any) -> bool:
        return await self.repository.record_refused(**fields)

    async def apply(self, event: Event, stream_seq: int | None) -> ApplyOutcome:
        self.attempts.append(event.event_id)
        if event.event_id in self.fail_once:
            self.fail_once.discard(event.event_id)
            raise DatabaseError("database is down")
        outcome = await self.repository.apply(event, stream_seq)
        self.applied.append(event.event_id)
        return outcome


async def test_a_database_failure_is_retried_later_in_stream_order(
    js: JetStreamContext,
    nats_settings: NatsSettings,
    repository: TaskRepository,
    start_subscriber: SubscriberFactory,
) -> None:
    timeline = Timeline()
    events = timeline.happy_path()
    sink = FlakySink(repository, {events[1].event_id, events[4].event_id})
    await start_subscriber(sink, retry_delay=0.2)

    await publish_all(js, nats_settings, events)

    await eventually(lambda: drained(js, nats_settings), what="consumer drained")
    assert sink.applied == [event.event_id for event in events]
    assert sink.attempts.count(events[1].event_id) == 2
    assert sink.attempts.count(events[4].event_id) == 2
    assert await repository.refused_events() == []


class RefusalOutage:
    """A repository whose first attempt at recording a refusal fails like a database outage."""

    def __init__(self, repository: TaskRepository) -> None:
        self.repository = repository
        self.refusals = 0

    async def apply(self, event: Event, stream_seq: int | None) -> ApplyOutcome:
        return await self.repository.apply(event, stream_seq)

    async def record_refused(self, **fields: Any) -> bool:
        self.refusals += 1
        if self.refusals == 1:
            raise DatabaseError("database is down")
        return await self.repository.record_refused(**fields)


async def test_a_refusal_the_database_cannot_record_is_retried_in_order(
    js: JetStreamContext,
    nats_settings: NatsSettings,
    repository: TaskRepository,
    start_subscriber: SubscriberFactory,
) -> None:
    sink = RefusalOutage(repository)
    await start_subscriber(sink, retry_delay=0.2)
    poisoned, healthy = Timeline(), Timeline()

    seq = await publish_raw(
        js, nats_settings, poisoned.task_id, "requested", poison_requested(poisoned)
    )
    await publish_all(js, nats_settings, [healthy.requested()])

    # The poison message is not dropped unrecorded: it is retried, then refused
    await eventually(state_is(repository, healthy.task_id, TaskState.IDLE), what="next event")
    await eventually(lambda: drained(js, nats_settings), what="nothing pending")
    assert sink.refusals == 2
    [refused] = await repository.refused_events()
    assert refused.stream_seq == seq


class SlowSink:
    """Takes ``hold`` seconds over the first event (a slow database), records attempts."""

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self.attempts: list[str] = []

    async def apply(self, event: Event, stream_seq: int | None) -> ApplyOutcome:
        self.attempts.append(event.event_id)
        if len(self.attempts) == 1:
            await asyncio.sleep(self.hold)
        return ApplyOutcome.APPLIED

    async def record_refused(self, **fields: Any) -> bool:
        raise AssertionError(f"nothing should be refused: {fields['reason']}")


async def test_a_slow_apply_is_kept_alive_not_redelivered_to_another_replica(
    js: JetStreamContext, nats_settings: NatsSettings, event_bus: Bus
) -> None:
    # Given two replicas sharing the durable consumer, with a 1 s ack wait
    settings = nats_settings.model_copy(update={"ack_wait": 1.0})
    sink = SlowSink(hold=2.5)
    replicas = [
        PersistenceSubscriber(Bus(event_bus.nc, settings), sink, fetch_timeout=0.5)  # type: ignore[arg-type]
        for _ in range(2)
    ]
    for replica in replicas:
        await replica.start()
    try:
        # When one of them takes more than twice the ack wait over an event
        event = Timeline().requested()
        await publish_all(js, settings, [event])
        await eventually(lambda: drained(js, settings), what="event acknowledged")

        # Then the other replica never got it: the apply was kept alive
        assert sink.attempts == [event.event_id]
        info = await js.consumer_info(settings.audit_stream, consumer_name(settings))
        assert info.num_redelivered == 0
    finally:
        for replica in replicas:
            await replica.stop(grace=5)


async def test_stop_returns_promptly_while_waiting_for_messages(
    repository: TaskRepository, start_subscriber: SubscriberFactory
) -> None:
    subscriber = await start_subscriber(repository, fetch_timeout=30.0)
    await asyncio.sleep(0.2)

    began = time.monotonic()
    await subscriber.stop(grace=5)

    assert time.monotonic() - began < 2
    assert not subscriber.running


async def test_rebuild_from_the_stream_reproduces_every_row(
    js: JetStreamContext,
    nats_settings: NatsSettings,
    event_bus: Bus,
    open_database: Callable[[], Awaitable[Database]],
    start_subscriber: SubscriberFactory,
) -> None:
    # Given a live database fed by the subscriber with a realistic mix of events
    live = TaskRepository(await open_database())
    await start_subscriber(live)
    done, failed, gateway = Timeline(), Timeline(), Timeline()
    prefix = nats_settings.subject_prefix
    happy = done.happy_path()
    await publish_all(js, nats_settings, [happy[0], happy[1], done.progress(10), done.progress(20)])
    await publish_all(js, nats_settings, happy[2:])
    await publish_all(
        js, nats_settings, [failed.requested("redis:7", "bob"), failed.failed("boom")]
    )
    # an illegal move, a redelivery under a new message id, an unknown task, garbage
    await publish_all(js, nats_settings, [failed.happy_path()[1]])
    await js.publish(
        subjects.for_event(happy[3], prefix), happy[3].encode(), headers={"Nats-Msg-Id": "again"}
    )
    await publish_all(js, nats_settings, [Timeline().failed("who?")])
    await js.publish(subjects.every_task(prefix=prefix).replace(">", "x.requested"), b"garbage")
    poisoned = Timeline()
    await publish_raw(js, nats_settings, poisoned.task_id, "requested", poison_requested(poisoned))
    # the gateway creates its task right after publishing it
    requested = gateway.requested("alpine:3", platform="linux/arm64")
    await publish_all(js, nats_settings, [requested])
    await live.create_if_absent(requested)
    await publish_all(js, nats_settings, [gateway.happy_path()[1], gateway.progress(5)])
    await eventually(lambda: drained(js, nats_settings), what="live database caught up")

    # When the stream is replayed into an empty database
    rebuilt = await open_database()
    counts = await rebuild_from_stream(event_bus, TaskRepository(rebuilt))

    # Then every table matches the live one field by field (ids aside), refusals included
    assert counts == ReplayCounts(applied=14, refused=2, tasks=3, progress=2)
    for table, order in [
        ("dcu_tasks", "task_id"),
        ("dcu_task_transitions", "event_id"),
        ("dcu_task_details", "task_id"),
        ("dcu_refused_events", "stream_seq"),
    ]:
        expected = await table_rows(live.database, table, order)
        assert expected, table
        assert await table_rows(rebuilt, table, order) == expected, table
    record = await live.get(done.task_id)
    assert record.state is TaskState.COMPLETED


async def test_rebuild_of_a_stream_without_task_events_applies_nothing(
    js: JetStreamContext, nats_settings: NatsSettings, event_bus: Bus, repository: TaskRepository
) -> None:
    nothing = ReplayCounts(applied=0, refused=0, tasks=0)
    assert await rebuild_from_stream(event_bus, repository) == nothing
    await js.publish(f"{nats_settings.subject_prefix}.cleanup.gzip.started", b"{}")

    assert await rebuild_from_stream(event_bus, repository) == nothing
    total, _ = await repository.query(page=1, page_size=10)
    assert total == 0


async def test_a_restarted_subscriber_resumes_its_durable_consumer(
    js: JetStreamContext,
    nats_settings: NatsSettings,
    repository: TaskRepository,
    start_subscriber: SubscriberFactory,
) -> None:
    timeline = Timeline()
    events = timeline.happy_path()
    first = await start_subscriber(repository)
    await publish_all(js, nats_settings, events[:2])
    await eventually(lambda: drained(js, nats_settings), what="first part recorded")
    await first.stop(grace=5)

    # Events published while no subscriber runs wait in the durable consumer
    await publish_all(js, nats_settings, events[2:])
    await start_subscriber(repository)

    await eventually(state_is(repository, timeline.task_id, TaskState.COMPLETED), what="task")
    await eventually(lambda: drained(js, nats_settings), what="rest recorded")
    info = await js.consumer_info(nats_settings.audit_stream, consumer_name(nats_settings))
    assert info.delivered.stream_seq == len(events)
    assert info.num_redelivered == 0

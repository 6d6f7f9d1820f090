"""The persistence subscriber and the stream rebuild, against a real nats-server and both
database backends."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from nats.js import JetStreamContext

from dcu import bus
from dcu.errors import BusError
from dcu.settings import NatsSettings
from events import subjects
from events.schema import Event, EventType
from events.states import TaskState
from persistence.database import Database, DatabaseError
from persistence.repository import ApplyOutcome, TaskRepository
from persistence.subscriber import PersistenceSubscriber, consumer_name, rebuild_from_stream
from tests.persistence.conftest import Timeline, eventually, table_rows
from tests.servers.nats import NatsServer

SubscriberFactory = Callable[..., Awaitable[PersistenceSubscriber]]


@pytest.fixture
async def start_subscriber(
    js: JetStreamContext, nats_settings: NatsSettings
) -> AsyncIterator[SubscriberFactory]:
    """Starts subscribers (quick fetch timeout) and stops every one after the test."""
    started: list[PersistenceSubscriber] = []

    async def start(sink: object, **options: float) -> PersistenceSubscriber:
        options.setdefault("fetch_timeout", 1.0)
        subscriber = PersistenceSubscriber(js, nats_settings, sink, **options)  # type: ignore[arg-type]
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
    return [await bus.publish(js, event, settings.subject_prefix) for event in events]


async def drained(js: JetStreamContext, settings: NatsSettings) -> bool:
    info = await js.consumer_info(settings.stream, consumer_name(settings))
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


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


async def test_garbage_is_terminated_and_later_events_still_land(
    js: JetStreamContext,
    nats_settings: NatsSettings,
    repository: TaskRepository,
    start_subscriber: SubscriberFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="persistence.subscriber")
    await start_subscriber(repository)
    timeline = Timeline()
    subject = subjects.task_event(
        timeline.task_id, EventType.REQUESTED, nats_settings.subject_prefix
    )

    await js.publish(subject, b"\xff not an event at all")
    await js.publish(subject, b'{"type": "requested", "task_id": "x"}')
    await publish_all(js, nats_settings, timeline.happy_path()[:2])

    await eventually(state_is(repository, timeline.task_id, TaskState.DOWNLOADING), what="task")
    await eventually(lambda: drained(js, nats_settings), what="consumer drained")
    info = await js.consumer_info(nats_settings.stream, consumer_name(nats_settings))
    assert info.num_redelivered == 0
    terminated = [r for r in caplog.records if "terminating message" in r.getMessage()]
    assert len(terminated) == 2
    assert "not an event at all" in terminated[0].getMessage()


async def test_events_keep_landing_across_a_nats_restart(
    js: JetStreamContext,
    nats_settings: NatsSettings,
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
                await bus.publish(js, event, nats_settings.subject_prefix)
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
    # the gateway creates its task right after publishing it
    requested = gateway.requested("alpine:3", platform="linux/arm64")
    await publish_all(js, nats_settings, [requested])
    await live.create_if_absent(requested)
    await publish_all(js, nats_settings, [gateway.happy_path()[1], gateway.progress(5)])
    await eventually(lambda: drained(js, nats_settings), what="live database caught up")

    # When the stream is replayed into an empty database
    rebuilt = await open_database()
    count = await rebuild_from_stream(js, nats_settings, TaskRepository(rebuilt))

    # Then every table matches the live one field by field (ids aside)
    assert count == 17
    for table, order in [
        ("dcu_tasks", "task_id"),
        ("dcu_task_transitions", "event_id"),
        ("dcu_task_details", "task_id"),
    ]:
        expected = await table_rows(live.database, table, order)
        assert expected, table
        assert await table_rows(rebuilt, table, order) == expected, table
    record = await live.get(done.task_id)
    assert record.state is TaskState.COMPLETED


async def test_rebuild_of_a_stream_without_task_events_applies_nothing(
    js: JetStreamContext, nats_settings: NatsSettings, repository: TaskRepository
) -> None:
    assert await rebuild_from_stream(js, nats_settings, repository) == 0
    await js.publish(f"{nats_settings.subject_prefix}.cleanup.gzip.started", b"{}")

    assert await rebuild_from_stream(js, nats_settings, repository) == 0
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
    info = await js.consumer_info(nats_settings.stream, consumer_name(nats_settings))
    assert info.delivered.stream_seq == len(events)
    assert info.num_redelivered == 0

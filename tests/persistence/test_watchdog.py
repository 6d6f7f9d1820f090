"""The stuck-task watchdog on both database backends, with an injected clock and a fake of
the stream's last-event lookup; the real lookup (``bus.Bus.last_activity``)
against a real nats-server."""

from __future__ import annotations

import contextlib
import uuid
from datetime import datetime, timedelta

import nats
import pytest
from nats.js.errors import NotFoundError

from bus import Bus, StreamEvent
from events import subjects
from events.schema import (
    Downloaded,
    DownloadStarted,
    Event,
    EventType,
    Failed,
    once_per_task_id,
)
from kernel.settings import NatsSettings
from persistence.repository import TaskRepository
from persistence.watchdog import StuckTaskWatchdog
from tests.persistence.conftest import T0, Timeline

STUCK_AFTER = 3600.0


class FakeLastEvent:
    """A fake of the stream lookup: answers what the test says the stream's latest event
    of each task is (None: the stream holds none of it)."""

    def __init__(self) -> None:
        self.latest: dict[str, StreamEvent] = {}
        self.asked: list[str] = []

    def set(self, task_id: str, event_type: EventType, time: datetime) -> None:
        self.latest[task_id] = StreamEvent(str(event_type), time)

    async def __call__(self, task_id: str) -> StreamEvent | None:
        self.asked.append(task_id)
        return self.latest.get(task_id)


class Published:
    """Collects what the watchdog publishes, in place of the bus."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def __call__(self, event: Event) -> None:
        self.events.append(event)


def _watchdog(
    repository: TaskRepository, stream: FakeLastEvent, publish: Published, now: datetime
) -> StuckTaskWatchdog:
    return StuckTaskWatchdog(
        repository, publish, stream, stuck_after=STUCK_AFTER, interval=1.0, clock=lambda: now
    )


async def _downloading(repository: TaskRepository) -> tuple[Timeline, datetime]:
    """A task whose download started; returns its timeline and the start's time."""
    timeline = Timeline()
    started = timeline.event(DownloadStarted(worker="w1"))
    for event in (timeline.requested(), started):
        await repository.apply(event)
    return timeline, started.time


async def test_an_idle_task_is_never_failed(repository: TaskRepository) -> None:
    # Given a task queued for hours behind a backlog (or with no download worker at all)
    timeline = Timeline()
    await repository.apply(timeline.requested())
    stream, publish = FakeLastEvent(), Published()
    stream.set(timeline.task_id, EventType.REQUESTED, T0)
    # When the watchdog sweeps ten deadlines later
    now = T0 + timedelta(seconds=10 * STUCK_AFTER)
    failed = await _watchdog(repository, stream, publish, now).sweep()
    # Then the task is left idle
    assert failed == []
    assert publish.events == []


async def test_a_silent_running_task_is_failed_saying_what_was_seen(
    repository: TaskRepository,
) -> None:
    # Given a download that started and went silent, in the database and in the stream
    timeline, started = await _downloading(repository)
    stream, publish = FakeLastEvent(), Published()
    stream.set(timeline.task_id, EventType.DOWNLOAD_STARTED, started)
    # When the watchdog sweeps past the deadline
    now = started + timedelta(seconds=STUCK_AFTER + 123)
    failed = await _watchdog(repository, stream, publish, now).sweep()
    # Then it publishes the task's one failure, with what it saw in both places
    assert failed == [timeline.task_id]
    [event] = publish.events
    assert event.event_id == once_per_task_id(timeline.task_id, EventType.FAILED)
    assert isinstance(event.payload, Failed)
    assert event.payload.stage == "download"
    when = started.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert event.payload.reason == (
        f"stuck: no event for {int(STUCK_AFTER) + 123}s in the stream (last: download_started "
        f"at {when}) and no progress since {when}, while downloading "
        "(workers.stuck_after=3600s); its download workers are gone or stalled"
    )


async def test_a_running_task_the_stream_holds_nothing_of_is_failed(
    repository: TaskRepository,
) -> None:
    timeline, started = await _downloading(repository)
    stream, publish = FakeLastEvent(), Published()
    now = started + timedelta(seconds=STUCK_AFTER + 1)
    assert await _watchdog(repository, stream, publish, now).sweep() == [timeline.task_id]
    [event] = publish.events
    assert isinstance(event.payload, Failed)
    assert event.payload.reason.startswith("stuck: no event of it in the stream and no progress")


async def test_a_task_the_database_lags_behind_is_not_failed(
    repository: TaskRepository,
) -> None:
    # Given a download whose database row is old, but whose stream shows a recent event
    # (the persistence subscriber is behind)
    timeline, started = await _downloading(repository)
    now = started + timedelta(seconds=STUCK_AFTER + 600)
    stream, publish = FakeLastEvent(), Published()
    stream.set(timeline.task_id, EventType.PROGRESS, now - timedelta(seconds=5))
    # When the watchdog sweeps
    failed = await _watchdog(repository, stream, publish, now).sweep()
    # Then the task is left running
    assert failed == []
    assert publish.events == []
    assert stream.asked == [timeline.task_id]


@pytest.mark.parametrize(
    "last",
    [
        pytest.param(EventType.DOWNLOADED, id="queued-for-compress"),
        pytest.param(EventType.COMPRESSED, id="queued-for-upload"),
        pytest.param(EventType.UPLOADED, id="completed-database-behind"),
        pytest.param(EventType.FAILED, id="failed-database-behind"),
    ],
)
async def test_a_task_that_is_not_running_in_the_stream_is_not_failed(
    repository: TaskRepository, last: EventType
) -> None:
    # Given a task whose latest event, long ago, says it waits for its next stage's
    # worker, or already ended (and the database has not caught up)
    timeline, _ = await _downloading(repository)
    await repository.apply(
        timeline.event(
            Downloaded(docker_image_name="nginx:latest", image_id="sha256:a", tar_path="", bytes=1)
        )
    )
    stream, publish = FakeLastEvent(), Published()
    stream.set(timeline.task_id, last, timeline.now)
    # When the watchdog sweeps ten deadlines later
    now = timeline.now + timedelta(seconds=10 * STUCK_AFTER)
    failed = await _watchdog(repository, stream, publish, now).sweep()
    # Then it is left alone
    assert failed == []
    assert publish.events == []


# -- the stream lookup, against nats-server ------------------------------------------


async def test_last_task_event_is_the_latest_event_of_the_task_in_the_streams(
    nats_server,
) -> None:
    # Given the streams as DCU sets them up, holding a task's facts and progress reports
    # and a later fact of another task
    tag = uuid.uuid4().hex[:8]
    settings = NatsSettings(url=nats_server.url, stream=f"W{tag}", subject_prefix=f"w{tag}")
    prefix = settings.subject_prefix
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()

    async def publish(event: Event) -> datetime:
        """Publish ``event``; the time its stream stored it."""
        ack = await js.publish(subjects.for_event(event, prefix), event.encode())
        return (await js.get_msg(ack.stream, ack.seq)).time

    try:
        await Bus(nc, settings).ensure_streams()
        timeline, other = Timeline(str(uuid.uuid4())), Timeline(str(uuid.uuid4()))
        await publish(timeline.requested())
        await publish(timeline.progress(10))
        started = await publish(timeline.event(DownloadStarted(worker="w1")))
        await publish(other.requested())
        # When the task's latest event is looked up
        last = await Bus(nc, settings).last_activity(timeline.task_id)
        # Then it is the later of its facts and reports, dated by its stream
        assert last == StreamEvent("download_started", started)
        assert last is not None and last.time.tzinfo is not None
        # and a progress report after it is later still
        reported = await publish(timeline.progress(20))
        assert await Bus(nc, settings).last_activity(timeline.task_id) == StreamEvent(
            "progress", reported
        )
        # and a task the streams hold nothing of has none
        assert await Bus(nc, settings).last_activity(str(uuid.uuid4())) is None
        # nor does an id that is not one subject token (it would match other tasks)
        assert await Bus(nc, settings).last_activity("*") is None
    finally:
        for info in await js.streams_info():
            if info.config.name and info.config.name.startswith(settings.stream):
                with contextlib.suppress(NotFoundError):
                    await js.delete_stream(info.config.name)
        await nc.close()

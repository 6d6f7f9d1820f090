"""Running the persistence subscriber as a component (``dcu persist``, ``dcu serve``)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable
from datetime import datetime

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from dcu import bus
from dcu.errors import BusError
from dcu.settings import NatsSettings, Settings
from events import subjects
from events.schema import Event, EventType
from persistence.database import close_database, init_database
from persistence.repository import TaskRepository
from persistence.subscriber import PersistenceSubscriber
from persistence.watchdog import StreamEvent, StuckTaskWatchdog

# What a task id must be to stand for exactly one subject token.
_SUBJECT_TOKEN = re.compile(r"[^.*>\s]+")


async def last_task_event(
    js: JetStreamContext, settings: NatsSettings, task_id: str
) -> StreamEvent | None:
    """The task's latest event, progress reports included: its type and the time its
    stream stored it. The newer of two last-message-by-subject gets: the task's latest
    fact in the audit stream (``<prefix>.task.<task_id>.>``; nats-server answers a
    wildcard subject with the newest message matching it) and its latest report in the
    progress stream (``<prefix>.progress.<task_id>``). None when neither stream holds
    anything of the task (never published, or aged out), or when ``task_id`` is not one
    subject token (it could match other tasks). Raises BusError when a stream cannot be
    asked.
    """
    if not _SUBJECT_TOKEN.fullmatch(task_id):
        return None
    prefix = settings.subject_prefix
    fact = await _last_message(js, settings.audit_stream, subjects.one_task(task_id, prefix))
    report = await _last_message(js, settings.progress_stream, subjects.progress(task_id, prefix))
    found = []
    if fact is not None:
        found.append(StreamEvent(type=fact[0].rsplit(".", 1)[-1], time=fact[1]))
    if report is not None:
        found.append(StreamEvent(type=str(EventType.PROGRESS), time=report[1]))
    return max(found, key=lambda event: event.time, default=None)


async def _last_message(
    js: JetStreamContext, stream: str, subject: str
) -> tuple[str, datetime] | None:
    """Subject and stored time of the newest message on ``subject`` in ``stream``; None
    when there is none (or no such stream). Raises BusError."""
    try:
        msg = await js.get_last_msg(stream, subject)
    except NotFoundError:
        return None
    except (NatsError, TimeoutError) as exc:
        raise BusError(f"cannot look up {subject} in {stream}: {exc}") from exc
    if msg.subject is None or msg.time is None:
        raise BusError(f"{stream} answered {subject} without a subject or a time")
    return msg.subject, msg.time


@contextlib.asynccontextmanager
async def subscriber_running(settings: Settings, nats_url: str) -> AsyncIterator[None]:
    """The subscriber on its own NATS connection; the database must already be open."""
    nc = await bus.connect(nats_url, settings.nats, "dcu-persistence")
    try:
        js = nc.jetstream()
        repository = TaskRepository()
        subscriber = PersistenceSubscriber(
            js,
            settings.nats,
            repository,
            unknown_retry_delay=settings.persistence.unknown_retry_delay,
            unknown_type_grace=settings.persistence.unknown_type_grace,
        )
        await subscriber.start()
        stop = asyncio.Event()
        watchdog_task: asyncio.Task[None] | None = None
        if settings.workers.stuck_after > 0:

            async def publish(event: Event) -> None:
                await bus.publish(js, event, settings.nats.subject_prefix)

            async def last_event(task_id: str) -> StreamEvent | None:
                return await last_task_event(js, settings.nats, task_id)

            watchdog = StuckTaskWatchdog(
                repository,
                publish,
                last_event,
                stuck_after=settings.workers.stuck_after,
                interval=settings.workers.watchdog_interval,
            )
            watchdog_task = asyncio.create_task(watchdog.run(stop))
        try:
            yield
        finally:
            stop.set()
            if watchdog_task is not None:
                await watchdog_task
            await subscriber.stop(grace=settings.workers.shutdown_grace)
    finally:
        await nc.drain()


async def run_persistence(settings: Settings, nats_url: str, until: Awaitable[None]) -> None:
    await init_database(settings.database.tortoise_url())
    try:
        async with subscriber_running(settings, nats_url):
            await until
    finally:
        await close_database()

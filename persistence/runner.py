"""Running the persistence subscriber as a component (``dcu persist``, ``dcu serve``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable

from dcu import bus
from dcu.settings import Settings
from events.schema import Event
from persistence.database import close_database, init_database
from persistence.repository import TaskRepository
from persistence.subscriber import PersistenceSubscriber
from persistence.watchdog import StuckTaskWatchdog


@contextlib.asynccontextmanager
async def subscriber_running(settings: Settings, nats_url: str) -> AsyncIterator[None]:
    """The subscriber on its own NATS connection; the database must already be open."""
    nc = await bus.connect(nats_url, settings.nats, "dcu-persistence")
    try:
        js = nc.jetstream()
        await bus.ensure_stream(js, settings.nats)
        repository = TaskRepository()
        subscriber = PersistenceSubscriber(js, settings.nats, repository)
        await subscriber.start()
        stop = asyncio.Event()
        watchdog_task: asyncio.Task[None] | None = None
        if settings.workers.stuck_after > 0:

            async def publish(event: Event) -> None:
                await bus.publish(js, event, settings.nats.subject_prefix)

            watchdog = StuckTaskWatchdog(
                repository,
                publish,
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

"""Running the persistence subscriber as a component (``dcu persist``, ``dcu serve``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable

from bus import Bus
from events.schema import Event
from kernel.settings import Settings
from persistence.database import close_database, init_database
from persistence.repository import TaskRepository
from persistence.subscriber import PersistenceSubscriber
from persistence.watchdog import StuckTaskWatchdog


@contextlib.asynccontextmanager
async def subscriber_running(settings: Settings, nats_url: str) -> AsyncIterator[None]:
    """The subscriber and the watchdog on the role's own NATS connection; the database
    must already be open."""
    bus = await Bus.connect(nats_url, settings.nats, "dcu-persistence")
    try:
        repository = TaskRepository()
        subscriber = PersistenceSubscriber(
            bus,
            repository,
            unknown_retry_delay=settings.persistence.unknown_retry_delay,
            unknown_type_grace=settings.persistence.unknown_type_grace,
        )
        await subscriber.start()
        stop = asyncio.Event()
        watchdog_task: asyncio.Task[None] | None = None
        if settings.workers.stuck_after > 0:

            async def publish(event: Event) -> None:
                await bus.publish(event)

            watchdog = StuckTaskWatchdog(
                repository,
                publish,
                bus.last_activity,
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
        await bus.close()


async def run_persistence(settings: Settings, nats_url: str, until: Awaitable[None]) -> None:
    await init_database(settings.database.tortoise_url())
    try:
        async with subscriber_running(settings, nats_url):
            await until
    finally:
        await close_database()

"""Running the persistence subscriber as a component (``dcu persist``, ``dcu serve``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from bus import Bus
from events.schema import Event
from kernel.settings import Settings
from persistence.database import Database
from persistence.repository import TaskRepository
from persistence.subscriber import PersistenceSubscriber
from persistence.watchdog import StuckTaskWatchdog


@contextlib.asynccontextmanager
async def persistence_running(settings: Settings) -> AsyncIterator[None]:
    """The subscriber and the watchdog on the role's own database and NATS connection
    (``settings.nats.url``), stopped in reverse order of start when the block ends."""
    database = await Database.open(settings.database.tortoise_url())
    try:
        async with _subscriber_running(settings, TaskRepository(database)):
            yield
    finally:
        await database.close()


@contextlib.asynccontextmanager
async def _subscriber_running(
    settings: Settings, repository: TaskRepository
) -> AsyncIterator[None]:
    bus = await Bus.connect(settings.nats.url, settings.nats, "dcu-persistence")
    try:
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

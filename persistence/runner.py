"""Running the persistence subscriber as a component (``dcu persist``, ``dcu serve``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable

from dcu import bus
from dcu.settings import Settings
from persistence.database import close_database, init_database
from persistence.repository import TaskRepository
from persistence.subscriber import PersistenceSubscriber


@contextlib.asynccontextmanager
async def subscriber_running(settings: Settings, nats_url: str) -> AsyncIterator[None]:
    """The subscriber on its own NATS connection; the database must already be open."""
    nc = await bus.connect(nats_url, settings.nats, "dcu-persistence")
    try:
        js = nc.jetstream()
        await bus.ensure_stream(js, settings.nats)
        subscriber = PersistenceSubscriber(js, settings.nats, TaskRepository())
        await subscriber.start()
        try:
            yield
        finally:
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

"""``dcu replay``: rebuild the task database from the JetStream stream (the audit log)."""

from __future__ import annotations

import logging

from dcu import bus
from dcu.settings import Settings
from persistence.database import Database
from persistence.repository import TaskRepository
from persistence.subscriber import rebuild_from_stream

log = logging.getLogger(__name__)


async def replay(settings: Settings, nats_url: str, target_url: str) -> int:
    """Apply every task event still in the stream to ``target_url``; returns how many.

    Meant for an empty database (an audit copy, or a lost one): the schema is migrated
    first. Applying is idempotent by event id, so replaying into a database that already
    holds some of the events only adds what is missing.
    Raises BusError or DatabaseError when either side fails.
    """
    database = await Database.open(target_url)
    try:
        nc = await bus.connect(nats_url, settings.nats, "dcu-replay")
        try:
            applied = await rebuild_from_stream(
                nc.jetstream(), settings.nats, TaskRepository(database)
            )
        finally:
            await nc.close()
    finally:
        await database.close()
    log.info("replayed %d events from stream %s", applied, settings.nats.stream)
    return applied

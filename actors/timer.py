"""The cleanup timer: publishes a ``cleanup.<kind>.requested`` event on every cron tick.

For each kind (``storage.cleanup_gzip_cron``, ``storage.cleanup_minio_cron``, evaluated
in UTC) the timer sleeps until the next tick and publishes the request with
``Nats-Msg-Id = cleanup-<kind>-<tick>``. Several replicas may run: each publishes every
tick, and JetStream's de-duplication (``bus.DUPLICATE_WINDOW``, 120 s) stores it once,
so the cleanup worker runs it once.

Ticks are never replayed: a tick that passed while no timer ran is skipped, and so is a
tick a running timer only noticed more than ``MAX_LATENESS`` after it (a suspended
host, a clock jump), because by then a duplicate could slip past the de-duplication
window. The next tick cleans whatever the missed one would have.

The wall clock and the sleep function are injected: tests drive the timer with a fake
clock instead of waiting. Long sleeps are cut into ``MAX_SLEEP`` slices and the wall
clock re-read after each, so a clock adjusted meanwhile is followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from datetime import datetime

from bus import DUPLICATE_WINDOW, Bus
from events import subjects
from events.cleanup import CRON_KEYS, CleanupKind, next_tick, scheduled_request
from events.schema import utcnow
from kernel.errors import BusError
from kernel.settings import Settings

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[None]]

# Seconds after its tick a tick is still published: half the de-duplication window, so
# a late replica's copy is always recognised as a duplicate of an on-time one.
MAX_LATENESS = DUPLICATE_WINDOW / 2
# Longest single sleep before the wall clock is read again.
MAX_SLEEP = 60.0
# Pause between attempts to publish a tick while NATS does not acknowledge.
RETRY_PAUSE = 5.0


def schedules(settings: Settings) -> dict[CleanupKind, str]:
    """Each kind's cron expression (the settings have checked them)."""
    storage = settings.storage
    return {
        CleanupKind.GZIP: storage.cleanup_gzip_cron,
        CleanupKind.OBJECTS: storage.cleanup_minio_cron,
    }


class CleanupTimer:
    """Publishes cleanup requests on the configured cron ticks until stopped.

    Raises ValueError (naming the settings key) at construction for an invalid cron
    expression, so a bad schedule stops ``dcu serve`` / ``dcu timer`` at start-up.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = utcnow,
        sleep: Sleep = asyncio.sleep,
        name: str | None = None,
    ) -> None:
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:timer"
        self._clock = clock
        self._sleep = sleep
        self.schedules = schedules(settings)

    async def run(self, stop: asyncio.Event) -> None:
        """Publish ticks until ``stop`` is set. Raises BusError when NATS cannot be
        reached at start; later outages only cost the ticks they outlast."""
        bus = await Bus.connect(self.settings.nats.url, self.settings.nats, self.name)
        try:
            log.info(
                "cleanup timer %s started: %s",
                self.name,
                ", ".join(f"{kind} at '{cron}' UTC" for kind, cron in self.schedules.items()),
            )
            async with asyncio.TaskGroup() as group:
                for kind, cron in self.schedules.items():
                    group.create_task(self._schedule(bus, kind, cron, stop))
        finally:
            await bus.close()
            log.info("cleanup timer %s stopped", self.name)

    async def _schedule(self, bus: Bus, kind: CleanupKind, cron: str, stop: asyncio.Event) -> None:
        after = self._clock()
        while not stop.is_set():
            tick = next_tick(cron, after, key=CRON_KEYS[kind])
            if not await self._sleep_until(tick, stop):
                return
            late = (self._clock() - tick).total_seconds()
            if late > MAX_LATENESS:
                log.warning(
                    "cleanup %s: tick %s noticed %.0f s late; skipped (not replayed)",
                    kind,
                    tick.isoformat(),
                    late,
                )
            else:
                await self._publish(bus, kind, tick, stop)
            after = max(tick, self._clock())

    async def _sleep_until(self, moment: datetime, stop: asyncio.Event) -> bool:
        """Sleep until the wall clock reaches ``moment``; False when stopped first."""
        while not stop.is_set():
            remaining = (moment - self._clock()).total_seconds()
            if remaining <= 0:
                return True
            await self._pause(min(remaining, MAX_SLEEP), stop)
        return False

    async def _pause(self, seconds: float, stop: asyncio.Event) -> None:
        """The injected sleep, cut short when ``stop`` is set."""
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (sleeper, stopper):
                waiter.cancel()
            for waiter in (sleeper, stopper):
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter

    async def _publish(
        self, bus: Bus, kind: CleanupKind, tick: datetime, stop: asyncio.Event
    ) -> None:
        event = scheduled_request(kind, tick, self.name, now=self._clock())
        subject = subjects.for_cleanup(event, self.settings.nats.subject_prefix)
        while not stop.is_set():
            try:
                published = await bus.publish_raw(subject, event.encode(), event.msg_id)
            except BusError as exc:
                late = (self._clock() - tick).total_seconds()
                if late + RETRY_PAUSE > MAX_LATENESS:
                    log.error("cleanup %s: tick %s not published: %s", kind, event.msg_id, exc)
                    return
                log.warning("cleanup %s: publishing tick %s failed: %s", kind, event.msg_id, exc)
                await self._pause(RETRY_PAUSE, stop)
                continue
            if published.duplicate:
                log.info("cleanup %s: tick %s already published by another timer", kind, tick)
            else:
                log.info("cleanup %s: requested for tick %s (seq %d)", kind, tick, published.seq)
            return

"""Fixtures for the cleanup tests: a controllable clock, and a uuid-named stream and
prefix on the session's nats-server. (The object stores, S3 on moto and a local
directory, are ``object_store`` of ``tests/conftest.py``.)"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import nats
import pytest
from nats.js import JetStreamContext

from bus import Bus as NatsBus
from kernel.settings import NatsSettings, Settings, StorageSettings
from tests.servers.nats import NatsServer


@dataclass
class FakeClock:
    """Wall clock for the timer: ``sleep`` moves it forward instead of waiting.

    The timer runs one schedule loop per cleanup kind (``loops`` of them) on this clock.
    Time only moves when every live loop is asleep, and then to the earliest wake-up, so
    one loop can never race the clock past another loop's tick while that one is busy
    publishing (a discrete-event clock). A sleep that would carry the clock past
    ``horizon`` never returns (the timer's stop event ends it); ``parked`` counts such
    sleeps, i.e. loops that are done for the test. ``overshoot`` adds seconds to every
    sleep, as a suspended host would.
    """

    now: datetime
    horizon: datetime
    overshoot: float = 0.0
    loops: int = 2
    parked: int = 0
    sleeps: list[float] = field(default_factory=list)
    _pending: list[tuple[datetime, int, asyncio.Future[None]]] = field(default_factory=list)

    def __call__(self) -> datetime:
        return self.now

    def _advance(self) -> None:
        self._pending = [item for item in self._pending if not item[2].done()]
        if self._pending and len(self._pending) >= self.loops - self.parked:
            self._pending.sort(key=lambda item: (item[0], item[1]))
            target, _, waiter = self._pending.pop(0)
            self.now = max(self.now, target)
            waiter.set_result(None)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        target = self.now + timedelta(seconds=seconds + self.overshoot)
        if target > self.horizon:
            self.parked += 1
            self._advance()
            await asyncio.Event().wait()  # cancelled by the timer when it stops
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((target, len(self.sleeps), waiter))
        self._advance()
        await waiter


@dataclass
class Bus:
    """A uuid stream and subject prefix of their own on the session's nats-server."""

    url: str
    settings: NatsSettings

    @property
    def prefix(self) -> str:
        return self.settings.subject_prefix

    def dcu_settings(self, **storage: str) -> Settings:
        return Settings(nats=self.settings, storage=StorageSettings.model_validate(storage))


@pytest.fixture
async def event_bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    tag = uuid.uuid4().hex[:10]
    settings = NatsSettings(url=nats_server.url, stream=f"CLEAN_{tag}", subject_prefix=f"c{tag}")
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await NatsBus(nc, settings).ensure_streams()
        yield Bus(url=nats_server.url, settings=settings)
        for stream in (settings.audit_stream, settings.progress_stream, settings.work_stream):
            await js.delete_stream(stream)
    finally:
        await nc.close()


@pytest.fixture
async def jetstream(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_server.url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()

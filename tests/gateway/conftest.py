"""The gateway in process: ``gateway.app.create_app`` under aiohttp's test server.

Each test gets the whole application (middlewares, routes, its database and NATS cleanup
contexts) on a loopback port, against the session's real nats-server (streams and
subject prefix of the test's own, set up as ``dcu serve`` sets them up and deleted
afterwards) and a real SQLite file in the test's tmp dir. No Docker engine, no S3, no
``dcu`` process: nothing consumes the ``requested`` events a test publishes, and rows
exist only where a test records events into the database (``Gateway.record``).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client

from bus import Bus
from events.schema import Event
from gateway.app import create_app
from gateway.keys import API, REPOSITORY
from kernel.settings import DatabaseSettings, NatsSettings, Settings
from persistence.repository import ApplyOutcome, TaskRepository
from tests.servers.nats import NatsServer

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class Gateway:
    """The in-process gateway and a client for it, as ``DcuProcess`` is for a process:
    ``get``/``post`` send JSON and return ``(status, decoded body)``, ``request`` sends raw
    bytes, ``log`` is what the application logged during the test."""

    client: TestClient[web.Request, web.Application]
    settings: Settings
    log: Path
    _seq: int = field(default=0, repr=False)

    @property
    def app(self) -> web.Application:
        return self.client.app

    @property
    def repository(self) -> TaskRepository:
        return self.app[REPOSITORY]

    @property
    def port(self) -> int:
        port = self.client.port
        assert port is not None
        return port

    async def request(
        self,
        method: str,
        path: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        async with self.client.request(
            method, f"{API}{path}", data=data, headers=headers
        ) as response:
            return response.status, json.loads(await response.read())

    async def get(self, path: str) -> tuple[int, Any]:
        return await self.request("GET", path)

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        return await self.request(
            "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )

    async def record(self, *events: Event) -> list[ApplyOutcome]:
        """Apply ``events`` to the gateway's database, in order, at the next stream
        sequences, as the persistence subscriber would."""
        outcomes = []
        for event in events:
            self._seq += 1
            outcomes.append(await self.repository.apply(event, self._seq))
        return outcomes


async def raw_request(
    service: Gateway, method: str, path: str, data: bytes | None = None
) -> tuple[int, Any]:
    """``method path`` with ``data`` sent as is; the status and the decoded body."""
    return await service.request(method, path, data)


@pytest.fixture
def settings(nats_server: NatsServer, tmp_path: Path) -> Settings:
    """The gateway's settings: NATS streams and subject prefix of the test's own, and a
    SQLite file in its tmp dir. ``tests/conftest.py``'s ``client`` deletes the streams."""
    tag = uuid.uuid4().hex[:8]
    return Settings(
        nats=NatsSettings(url=nats_server.url, stream=f"GW_{tag}", subject_prefix=f"gw{tag}"),
        database=DatabaseSettings(path=str(tmp_path / "data" / "dcu.db")),
    )


@pytest.fixture
async def gateway(settings: Settings, client: Client, tmp_path: Path) -> AsyncIterator[Gateway]:
    """``create_app(settings)`` served on loopback, its streams set up first (the gateway
    publishes to them) and its log captured in ``Gateway.log``."""
    await Bus(client, settings.nats).ensure_streams()
    log = tmp_path / "gateway.log"
    handler = logging.FileHandler(log)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO))
    try:
        async with TestClient(TestServer(create_app(settings))) as http:
            yield Gateway(http, settings, log)
    finally:
        root.setLevel(level)
        root.removeHandler(handler)
        handler.close()

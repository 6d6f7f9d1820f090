"""Fixtures for the broker tests: a private nats-server per test (from ``nats_factory``:
some tests stop or restart it), uuid-named streams, subject prefixes and queues, and
harnesses that run the same contract tests against the JetStream broker and dramatiq's
StubBroker.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import nats
import nats.js.errors
import pytest
from dramatiq.brokers.stub import StubBroker
from nats.js import api

from dramatiq_jetstream import JetStreamBroker, durable_name
from tests.e2e.helpers import subject_matches
from tests.polling import wait_until
from tests.servers.nats import NatsFactory, NatsServer

WORKER_TIMEOUT_MS = 250


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run one nats-py coroutine from a synchronous test."""
    return asyncio.run(coro)


def declare(
    broker: dramatiq.Broker,
    fn: Callable[..., Any],
    *,
    queue_name: str,
    actor_name: str,
    **options: Any,
) -> dramatiq.Actor[Any, Any]:
    """Declare ``fn`` as an actor on ``broker`` (typed wrapper around ``dramatiq.actor``)."""
    decorate = dramatiq.actor(
        queue_name=queue_name, actor_name=actor_name, broker=broker, **options
    )
    return decorate(fn)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@dataclass
class StoredMessage:
    subject: str
    headers: dict[str, str]
    data: bytes

    def json(self) -> Any:
        return json.loads(self.data)


class NatsTool:
    """Direct nats-py access to the test's server, independent of the broker under test."""

    def __init__(self, url: str, stream: str) -> None:
        self.url = url
        self.stream = stream

    async def _with_js(self, action: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
        nc = await nats.connect(self.url)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    def create_stream(self, subjects: list[str]) -> None:
        run(self._with_js(lambda js: js.add_stream(name=self.stream, subjects=subjects)))

    def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        run(self._with_js(lambda js: js.publish(subject, payload, headers=headers)))

    def publish_json(self, subject: str, obj: Any, msg_id: str | None = None) -> None:
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        self.publish(subject, json.dumps(obj).encode(), headers)

    def consumer_info(self, queue_name: str) -> api.ConsumerInfo:
        info: api.ConsumerInfo = run(
            self._with_js(lambda js: js.consumer_info(self.stream, durable_name(queue_name)))
        )
        return info

    def messages(self, subject_filter: str | None = None) -> list[StoredMessage]:
        """Every message in the stream (optionally on subjects matching a filter)."""

        async def read(js: Any) -> list[StoredMessage]:
            state = (await js.stream_info(self.stream)).state
            found = []
            for seq in range(state.first_seq, state.last_seq + 1):
                try:
                    raw = await js.get_msg(self.stream, seq=seq)
                except nats.js.errors.NotFoundError:
                    continue
                found.append(StoredMessage(raw.subject, dict(raw.headers or {}), raw.data or b""))
            return found

        stored: list[StoredMessage] = run(self._with_js(read))
        if subject_filter is None:
            return stored
        return [m for m in stored if subject_matches(subject_filter, m.subject)]


class Recorder:
    """Thread-safe record of actor calls, with waiting."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()

    def add(self, *call: Any) -> None:
        with self._lock:
            self.calls.append((time.monotonic(), *call))

    def wait_for(self, count: int, timeout: float = 15.0) -> list[tuple[Any, ...]]:
        return wait_until(
            self.snapshot,
            until=lambda calls: len(calls) >= count,
            timeout=timeout,
            what=f"{count} calls",
            interval=0.01,
        )

    def snapshot(self) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self.calls)

    def __len__(self) -> int:
        with self._lock:
            return len(self.calls)


@dataclass
class JetStreamEnv:
    """One test's server, stream and prefix; makes brokers and workers and cleans them up."""

    server: NatsServer
    stream: str
    prefix: str
    tool: NatsTool
    brokers: list[JetStreamBroker] = field(default_factory=list)
    workers: list[dramatiq.Worker] = field(default_factory=list)

    def broker(self, **kwargs: Any) -> JetStreamBroker:
        kwargs.setdefault("ack_wait", 2.0)
        broker = JetStreamBroker(
            url=self.server.url, stream=self.stream, subject_prefix=self.prefix, **kwargs
        )
        self.brokers.append(broker)
        return broker

    def worker(self, broker: dramatiq.Broker, threads: int = 2) -> dramatiq.Worker:
        worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=WORKER_TIMEOUT_MS)
        worker.start()
        self.workers.append(worker)
        return worker

    def stop_worker(self, worker: dramatiq.Worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
            worker.stop(timeout=10_000)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop(timeout=10_000)
        for broker in self.brokers:
            broker.close()


@pytest.fixture
def js_env(nats_factory: NatsFactory) -> Iterator[JetStreamEnv]:
    """A private server: some tests stop or restart it."""
    server = nats_factory()
    prefix = unique("t")
    stream = unique("S")
    tool = NatsTool(server.url, stream)
    tool.create_stream([f"{prefix}.>"])
    env = JetStreamEnv(server=server, stream=stream, prefix=prefix, tool=tool)
    try:
        yield env
    finally:
        env.close()


class BrokerHarness:
    """What a contract test needs from a broker implementation."""

    name: str

    def broker(self) -> dramatiq.Broker:
        raise NotImplementedError

    def worker(self, broker: dramatiq.Broker) -> dramatiq.Worker:
        raise NotImplementedError

    def join(self, broker: dramatiq.Broker, queue_name: str, timeout: int) -> None:
        broker.join(queue_name, timeout=timeout)

    def dead_letter_errors(self, broker: dramatiq.Broker, queue_name: str) -> list[str]:
        raise NotImplementedError

    def assert_settled(self, broker: dramatiq.Broker, queue_name: str) -> None:
        raise NotImplementedError


class JetStreamHarness(BrokerHarness):
    name = "jetstream"

    def __init__(self, env: JetStreamEnv) -> None:
        self.env = env

    def broker(self) -> dramatiq.Broker:
        return self.env.broker(ack_wait=1.0)

    def worker(self, broker: dramatiq.Broker) -> dramatiq.Worker:
        return self.env.worker(broker)

    def dead_letter_errors(self, broker: dramatiq.Broker, queue_name: str) -> list[str]:
        dead = self.env.tool.messages(f"{self.env.prefix}.dead.{queue_name}")
        return [m.json()["error"] for m in dead]

    def assert_settled(self, broker: dramatiq.Broker, queue_name: str) -> None:
        for name in (queue_name, f"{queue_name}.DQ"):
            info = self.env.tool.consumer_info(name)
            assert (info.num_pending, info.num_ack_pending) == (0, 0), name


class StubHarness(BrokerHarness):
    name = "stub"

    def __init__(self) -> None:
        self.brokers: list[StubBroker] = []
        self.workers: list[dramatiq.Worker] = []

    def broker(self) -> dramatiq.Broker:
        broker = StubBroker()
        self.brokers.append(broker)
        return broker

    def worker(self, broker: dramatiq.Broker) -> dramatiq.Worker:
        worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=WORKER_TIMEOUT_MS)
        worker.start()
        self.workers.append(worker)
        return worker

    def join(self, broker: dramatiq.Broker, queue_name: str, timeout: int) -> None:
        assert isinstance(broker, StubBroker)
        broker.join(queue_name, timeout=timeout, fail_fast=False)

    def dead_letter_errors(self, broker: dramatiq.Broker, queue_name: str) -> list[str]:
        assert isinstance(broker, StubBroker)
        return [
            f"{type(m._exception).__name__}: {m._exception}"
            for m in broker.dead_letters_by_queue[queue_name]
        ]

    def assert_settled(self, broker: dramatiq.Broker, queue_name: str) -> None:
        assert isinstance(broker, StubBroker)
        for name in (queue_name, f"{queue_name}.DQ"):
            assert broker.queues[name].unfinished_tasks == 0, name

    def close(self) -> None:
        for worker in self.workers:
            worker.stop(timeout=10_000)
        for broker in self.brokers:
            broker.close()


@pytest.fixture(params=["jetstream", "stub"])
def harness(request: pytest.FixtureRequest) -> Iterator[BrokerHarness]:
    if request.param == "jetstream":
        yield JetStreamHarness(request.getfixturevalue("js_env"))
        return
    stub = StubHarness()
    try:
        yield stub
    finally:
        stub.close()

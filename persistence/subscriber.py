"""The persistence subscriber: every task event on the stream, recorded in stream order.

``PersistenceSubscriber`` reads the durable pull consumer ``<stream>-persistence``
(``<prefix>.task.>``, explicit ack, deliver all, one message in flight) and hands each
event to the repository, one at a time, in stream order:

* decoded and recorded (whatever the state machine said): ack;
* not an event (``DecodeError``): logged with the start of the raw bytes, ``term()``;
* the database failed: logged, ``nak`` with a growing delay. With one message in flight
  nothing overtakes it, so the order holds and nothing is lost while the database is down.

NATS outages are ridden out: nats-py reconnects, and the fetch loop keeps going after
timeouts and errors with a short backoff. ``rebuild_from_stream`` replays the whole stream
into an empty database with an ephemeral ordered consumer (``dcu replay``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Protocol

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError

from dcu import bus
from dcu.errors import BusError, DcuError
from dcu.settings import NatsSettings
from events import subjects
from events.schema import DecodeError, Event
from persistence.repository import ApplyOutcome

log = logging.getLogger(__name__)

RAW_LOG_LIMIT = 200  # bytes of an undecodable message shown in the log


class EventSink(Protocol):
    """Where the subscriber puts events: ``TaskRepository`` or a test double."""

    async def apply(self, event: Event, stream_seq: int | None) -> ApplyOutcome: ...


def consumer_name(settings: NatsSettings) -> str:
    return f"{settings.stream}-persistence"


def consumer_config(settings: NatsSettings) -> ConsumerConfig:
    """The durable consumer: every task event from the start, one unacked at a time."""
    return ConsumerConfig(
        durable_name=consumer_name(settings),
        description="DCU persistence: records every task event in the database",
        filter_subject=subjects.every_task(prefix=settings.subject_prefix),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait,
        max_deliver=-1,  # a database outage must never drop an event
        max_ack_pending=1,  # strict stream order, even across naks
    )


class PersistenceSubscriber:
    """Feeds the durable consumer's events to ``repository.apply`` until stopped."""

    def __init__(
        self,
        js: JetStreamContext,
        settings: NatsSettings,
        repository: EventSink,
        *,
        fetch_timeout: float = 5.0,
        retry_delay: float = 1.0,
        max_retry_delay: float = 60.0,
    ) -> None:
        self._js = js
        self._settings = settings
        self._repository = repository
        self._fetch_timeout = fetch_timeout
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._subscription: JetStreamContext.PullSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._busy = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Create the stream and durable consumer when missing and start consuming.

        Raises BusError when JetStream cannot be reached; RuntimeError when started twice.
        """
        if self._task is not None:
            raise RuntimeError("persistence subscriber already started")
        name = consumer_name(self._settings)
        try:
            await bus.ensure_stream(self._js, self._settings)
            await self._ensure_consumer()
            self._subscription = await self._js.pull_subscribe_bind(
                durable=name, stream=self._settings.stream
            )
        except (NatsError, TimeoutError) as exc:
            raise BusError(f"cannot start consumer {name}: {exc}") from exc
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name=name)
        log.info("persistence subscriber %s started", name)

    async def _ensure_consumer(self) -> None:
        """Create the durable consumer, or update what the server lets change in place."""
        config = consumer_config(self._settings)
        try:
            await self._js.add_consumer(self._settings.stream, config)
        except APIError as exc:
            # e.g. "deliver policy can not be updated": keep the existing consumer
            await self._js.consumer_info(self._settings.stream, consumer_name(self._settings))
            log.warning("consumer %s kept as it is: %s", config.durable_name, exc)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop fetching, let the message in hand finish (up to ``grace`` s), then return.

        A message cut off by the grace period is redelivered later (applying it again is
        a no-op). Never raises for the subscriber's own failures.
        """
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            if not self._busy:
                task.cancel()
            done, _ = await asyncio.wait({task}, timeout=grace)
            if not done:
                log.warning("persistence subscriber: message not done after %ss, cancelling", grace)
                task.cancel()
            [result] = await asyncio.gather(task, return_exceptions=True)
            if isinstance(result, Exception):
                log.error("persistence subscriber ended with %r", result)
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(NatsError, TimeoutError):
                await subscription.unsubscribe()
        log.info("persistence subscriber %s stopped", consumer_name(self._settings))

    async def _run(self) -> None:
        assert self._subscription is not None
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                messages = await self._subscription.fetch(1, timeout=self._fetch_timeout)
            except (NatsTimeoutError, TimeoutError):
                continue
            except Exception as exc:  # keep consuming whatever NATS does
                log.warning("persistence fetch failed, retrying in %.1fs: %r", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            for message in messages:
                self._busy = True
                try:
                    await self._handle(message)
                finally:
                    self._busy = False

    async def _handle(self, message: Msg) -> None:
        sequence = message.metadata.sequence.stream
        try:
            event = Event.decode(message.data)
        except DecodeError as exc:
            log.error(
                "terminating message %s on %s, not an event (%s): %r",
                sequence,
                message.subject,
                exc,
                exc.raw[:RAW_LOG_LIMIT],
            )
            await _settle(message.term(), "term", sequence)
            return
        try:
            outcome = await self._repository.apply(event, sequence)
        except Exception as exc:  # the database failed (or a bug): retry later, in order
            delay = self._redelivery_delay(message.metadata.num_delivered)
            report = log.error if isinstance(exc, DcuError) else log.exception
            report(
                "task %s: cannot record %s event %s (seq %s), retrying in %.1fs: %s",
                event.task_id,
                event.type,
                event.event_id,
                sequence,
                delay,
                exc,
            )
            await _settle(message.nak(delay=delay), "nak", sequence)
            return
        log.debug("task %s: seq %s %s -> %s", event.task_id, sequence, event.type, outcome)
        await _settle(message.ack(), "ack", sequence)

    def _redelivery_delay(self, delivered: int | None) -> float:
        attempt = max(1, delivered or 1)
        return float(min(self._retry_delay * 2 ** min(attempt - 1, 16), self._max_retry_delay))


async def _settle(acknowledgement: Awaitable[None], kind: str, seq: int) -> None:
    """Send an ack/nak/term; a failure only means JetStream redelivers the message."""
    try:
        await acknowledgement
    except Exception as exc:
        log.warning("cannot %s message %s (it will be redelivered): %r", kind, seq, exc)


async def rebuild_from_stream(
    js: JetStreamContext,
    settings: NatsSettings,
    repository: EventSink,
    *,
    idle_timeout: float = 10.0,
) -> int:
    """Apply every task event on the stream, from sequence 1, in order; returns how many.

    Meant for an empty database (``dcu replay``): with an ephemeral ordered consumer (no
    durable state on the server) it reads ``<prefix>.task.>`` until it has caught up with
    the stream. Undecodable messages are logged and skipped (not counted).
    Raises BusError when JetStream cannot be read or goes quiet for ``idle_timeout``
    seconds before the end, and DatabaseError when the database fails.
    """
    subject = subjects.every_task(prefix=settings.subject_prefix)
    try:
        subscription = await js.subscribe(
            subject,
            stream=settings.stream,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
    except (NatsError, TimeoutError) as exc:
        raise BusError(f"cannot read stream {settings.stream}: {exc}") from exc
    applied = 0
    try:
        try:
            info = await subscription.consumer_info()
        except (NatsError, TimeoutError) as exc:
            raise BusError(f"cannot read stream {settings.stream}: {exc}") from exc
        if not info.num_pending and not (info.delivered and info.delivered.consumer_seq):
            return 0
        while True:
            try:
                message = await subscription.next_msg(timeout=idle_timeout)
            except (NatsError, TimeoutError) as exc:
                raise BusError(f"stream {settings.stream} went quiet mid-replay: {exc!r}") from exc
            metadata = message.metadata
            sequence = metadata.sequence.stream
            try:
                event = Event.decode(message.data)
            except DecodeError as exc:
                log.error(
                    "replay: skipping message %s, not an event (%s): %r",
                    sequence,
                    exc,
                    exc.raw[:RAW_LOG_LIMIT],
                )
            else:
                await repository.apply(event, sequence)
                applied += 1
            if not metadata.num_pending:
                break
    finally:
        with contextlib.suppress(NatsError, TimeoutError):
            await subscription.unsubscribe()
    log.info("replay: applied %s events from stream %s", applied, settings.stream)
    return applied

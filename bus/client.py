"""``Bus``: one NATS connection and everything DCU does with it.

Connecting (with the configured credentials, to one server or a cluster), publishing
every event family with its id as ``Nats-Msg-Id``, the "has this task got event X"
lookups, reading a subject's history, live subscriptions and durable pull consumers.
Every nats-py error leaves as ``BusError`` (``bus.errors.translating``); callers see
``StoredMessage``, ``Delivery`` and ``LiveSubscription``, never a nats-py type.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NamedTuple, Protocol

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RawStreamMsg
from nats.js.errors import APIError, NotFoundError

from bus import streams
from bus.errors import translating
from events import subjects
from events.audit_archive import StoredMessage
from events.schema import DecodeError, Event, EventType
from kernel.errors import BusError, UpstreamTimeout
from kernel.settings import NatsSettings

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 10.0  # seconds JetStream has to acknowledge a publish
LOOKUP_TIMEOUT = 5.0  # seconds for a JetStream API request
MSG_ID = "Nats-Msg-Id"


def connect_options(settings: NatsSettings) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` from settings; never logged (secrets)."""
    options: dict[str, Any] = {
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
    }
    if settings.user:
        options["user"] = settings.user
        options["password"] = settings.password.get_secret_value()
    if settings.token.get_secret_value():
        options["token"] = settings.token.get_secret_value()
    if settings.creds_file:
        options["user_credentials"] = settings.creds_file
    if settings.tls_ca_file:
        options["tls"] = ssl.create_default_context(cafile=settings.tls_ca_file)
    return options


def servers(url: str) -> list[str]:
    """``nats.url`` may list several servers of one cluster, separated by commas."""
    return [part.strip() for part in url.split(",") if part.strip()]


class Publishable(Protocol):
    """What ``Bus.publish`` takes: a task event or a cleanup event."""

    def encode(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Published:
    seq: int
    duplicate: bool  # JetStream already held this Nats-Msg-Id (within its window)


class StreamEvent(NamedTuple):
    """A task's latest stored event: its type (the subject's last token, ``progress`` for
    a report) and the time the stream stored it."""

    type: str
    time: datetime


def stored(message: Msg) -> StoredMessage:
    """A delivered JetStream message as the stream stores it."""
    metadata = message.metadata
    return StoredMessage(
        stream=metadata.stream,
        seq=metadata.sequence.stream,
        subject=message.subject,
        time=metadata.timestamp,
        msg_id=(message.headers or {}).get(MSG_ID, ""),
        data=message.data,
    )


def _from_raw(stream: str, raw: RawStreamMsg, what: str) -> StoredMessage:
    """A message a direct get returned; raises BusError when it came without its time."""
    if raw.time is None:
        raise BusError(f"the stream answered {what} without a time")
    return StoredMessage(
        stream=stream,
        seq=int(raw.seq or 0),
        subject=str(raw.subject),
        time=raw.time,
        msg_id=(raw.headers or {}).get(MSG_ID, ""),
        data=raw.data or b"",
    )


class Delivery:
    """One message of a durable consumer, to be settled once (ack, nak, term)."""

    def __init__(self, message: Msg) -> None:
        self._message = message
        self.stored = stored(message)

    @property
    def num_delivered(self) -> int:
        return int(self._message.metadata.num_delivered or 1)

    async def ack(self) -> None:
        """Ack and wait for the server's confirmation. Raises BusError."""
        async with translating(f"cannot ack message {self.stored.seq}"):
            await self._message.ack_sync(timeout=LOOKUP_TIMEOUT)

    async def nak(self, delay: float | None = None) -> None:
        async with translating(f"cannot nak message {self.stored.seq}"):
            await self._message.nak(delay=delay)

    async def term(self) -> None:
        async with translating(f"cannot terminate message {self.stored.seq}"):
            await self._message.term()

    async def in_progress(self) -> None:
        async with translating(f"cannot extend message {self.stored.seq}"):
            await self._message.in_progress()


class PullConsumer:
    """A bound durable pull consumer, fetching one message at a time."""

    def __init__(self, subscription: JetStreamContext.PullSubscription, name: str) -> None:
        self._subscription = subscription
        self.name = name

    async def next(self, timeout: float) -> Delivery | None:
        """The next message, None when none came within ``timeout``. Raises BusError."""
        async with translating(f"cannot fetch from {self.name}"):
            try:
                messages = await self._subscription.fetch(1, timeout=timeout)
            except NatsTimeoutError:
                return None
        return Delivery(messages[0]) if messages else None

    async def close(self) -> None:
        try:
            await self._subscription.unsubscribe()
        except (NatsError, TimeoutError, ValueError) as exc:
            log.debug("unsubscribing %s: %r", self.name, exc)


class LiveSubscription:
    """Core NATS subscriptions feeding a callback; ``close`` ends them."""

    def __init__(self, subscriptions: list[Subscription]) -> None:
        self._subscriptions = subscriptions

    async def close(self) -> None:
        for subscription in self._subscriptions:
            try:
                await subscription.unsubscribe()
            except (NatsError, TimeoutError) as exc:
                log.debug("unsubscribing: %r", exc)


@dataclass(frozen=True, slots=True)
class ConsumerLag:
    """A durable consumer's backlog, as JetStream reports it."""

    stream: str
    durable: str
    pending: int
    """Messages of its stream not yet delivered to it."""
    ack_pending: int
    """Delivered and not yet acknowledged."""
    redelivered: int
    """Held messages that were delivered more than once."""


class Bus:
    """One NATS connection (per role) with the DCU operations on it."""

    def __init__(self, nc: Client, settings: NatsSettings) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=LOOKUP_TIMEOUT)
        self.settings = settings

    @classmethod
    async def connect(cls, url: str, settings: NatsSettings, name: str) -> Bus:
        """Raises BusError (without the credentials) when NATS cannot be reached."""

        async def log_error(exc: Exception) -> None:
            log.warning("nats connection %s: %s", name, exc)

        try:
            nc = await nats.connect(
                servers(url), name=name, error_cb=log_error, **connect_options(settings)
            )
        except (OSError, NatsError, TimeoutError) as exc:
            raise BusError(f"cannot connect to NATS at {url}: {exc}") from exc
        return cls(nc, settings)

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def close(self) -> None:
        """Drain (deliver what is in flight) and close; never raises."""
        if self.nc.is_closed:
            return
        try:
            await self.nc.drain()
        except (NatsError, TimeoutError) as exc:
            log.debug("draining the NATS connection: %r", exc)
            await self.nc.close()

    # -- setup -------------------------------------------------------------------------

    async def ensure_streams(self, *, apply: bool = False) -> dict[str, list[str]]:
        """See ``bus.streams.ensure_streams``; replicas capped at the cluster's size."""
        return await streams.ensure_streams(
            self.js, self.settings, apply=apply, peers=streams.cluster_size(self.nc)
        )

    async def stream_subjects(self, stream: str) -> list[str] | None:
        """The subjects ``stream`` takes; None when there is no such stream."""
        async with translating(f"cannot read stream {stream}"):
            try:
                return list((await self.js.stream_info(stream)).config.subjects or [])
            except NotFoundError:
                return None

    async def retire_stream(self, stream: str, subjects_now: list[str]) -> None:
        """Delete ``stream``'s consumers and move it onto ``subjects_now`` (its stored
        messages keep their subjects), freeing its subjects for other streams."""
        async with translating(f"cannot retire stream {stream}"):
            for consumer in await self.js.consumers_info(stream):
                await self.js.delete_consumer(stream, str(consumer.name))
            config = (await self.js.stream_info(stream)).config
            await self.js.update_stream(replace(config, subjects=subjects_now))

    async def delete_stream(self, stream: str) -> None:
        async with translating(f"cannot delete stream {stream}"):
            await self.js.delete_stream(stream)

    # -- observing ---------------------------------------------------------------------

    async def consumer_lag(self) -> list[ConsumerLag]:
        """Every durable consumer of the three streams (a missing stream has none);
        ephemeral readers are left out. Raises BusError."""
        settings = self.settings
        found: list[ConsumerLag] = []
        for stream in (settings.audit_stream, settings.progress_stream, settings.work_stream):
            async with translating(f"cannot list the consumers of {stream}"):
                try:
                    infos = await self.js.consumers_info(stream)
                except NotFoundError:
                    continue
            found.extend(
                ConsumerLag(
                    stream=stream,
                    durable=info.config.durable_name,
                    pending=int(info.num_pending or 0),
                    ack_pending=int(info.num_ack_pending or 0),
                    redelivered=int(info.num_redelivered or 0),
                )
                for info in infos
                if info.config.durable_name
            )
        return found

    async def dead_letter_counts(self) -> dict[str, int]:
        """Dead letters in the work stream by queue (``<prefix>.dead.<queue>``); queues
        without any are absent. Raises BusError."""
        settings = self.settings
        stream = settings.work_stream
        prefix = f"{settings.subject_prefix}.dead."
        async with translating(f"cannot read the dead letters of {stream}"):
            try:
                info = await self.js.stream_info(
                    stream, subjects_filter=subjects.every_dead(settings.subject_prefix)
                )
            except NotFoundError:
                return {}
        return {
            subject.removeprefix(prefix): int(count)
            for subject, count in (info.state.subjects or {}).items()
        }

    # -- publishing ----------------------------------------------------------------------

    async def publish(self, event: Event) -> Published:
        """Publish a task event (progress goes to the progress stream) and wait for the
        ack. Its id is the ``Nats-Msg-Id``, so the same event is stored once."""
        subject = subjects.for_event(event, self.settings.subject_prefix)
        return await self.publish_raw(subject, event.encode(), event.event_id)

    async def publish_raw(self, subject: str, data: bytes, msg_id: str) -> Published:
        """Publish bytes (a cleanup event, a forged test event) with ``msg_id``.
        Raises BusError when the stream does not acknowledge."""
        async with translating(f"cannot publish on {subject}"):
            ack = await self.js.publish(
                subject, data, headers={MSG_ID: msg_id}, timeout=PUBLISH_TIMEOUT
            )
        return Published(seq=int(ack.seq), duplicate=bool(ack.duplicate))

    # -- lookups (one direct get each, no consumer) --------------------------------------

    async def _last(self, stream: str, subject: str) -> StoredMessage | None:
        async with translating(f"cannot look up {subject}"):
            try:
                raw = await self.js.get_last_msg(stream, subject)
            except NotFoundError:
                return None
        return _from_raw(stream, raw, subject)

    def _stream_of(self, event_type: EventType) -> str:
        if event_type is EventType.PROGRESS:
            return self.settings.progress_stream
        return self.settings.audit_stream

    async def has_event(self, task_id: str, event_type: EventType) -> bool:
        """Whether the stream holds an ``event_type`` event of ``task_id``."""
        subject = subjects.task_event(task_id, event_type, self.settings.subject_prefix)
        return await self._last(self._stream_of(event_type), subject) is not None

    async def last_event(self, task_id: str, event_type: EventType) -> Event | None:
        """The task's latest ``event_type`` event; None when there is none. Raises
        DecodeError when the stored bytes are not an event."""
        subject = subjects.task_event(task_id, event_type, self.settings.subject_prefix)
        found = await self._last(self._stream_of(event_type), subject)
        return None if found is None else Event.decode(found.data)

    async def latest_progress(self, task_id: str) -> tuple[int, Event] | None:
        """The task's latest progress report with its progress-stream sequence."""
        found = await self._last(
            self.settings.progress_stream,
            subjects.progress(task_id, self.settings.subject_prefix),
        )
        if found is None:
            return None
        try:
            return found.seq, Event.decode(found.data)
        except DecodeError:
            return None

    async def last_activity(self, task_id: str) -> StreamEvent | None:
        """The newer of the task's latest fact (any type: a last-by-subject get on the
        wildcard ``<prefix>.task.<id>.>``) and its latest progress report. None for a
        task the streams hold nothing of, and for an id that is not one subject token
        (it could match other tasks)."""
        if not subjects.is_token(task_id):
            return None
        prefix = self.settings.subject_prefix
        candidates = [
            await self._last(self.settings.audit_stream, subjects.one_task(task_id, prefix)),
            await self._last(self.settings.progress_stream, subjects.progress(task_id, prefix)),
        ]
        found = [c for c in candidates if c is not None]
        if not found:
            return None
        latest = max(found, key=lambda c: c.time)
        kind = "progress" if latest.stream == self.settings.progress_stream else None
        return StreamEvent(type=kind or latest.subject.rsplit(".", 1)[-1], time=latest.time)

    async def message(self, stream: str, seq: int) -> StoredMessage | None:
        """Message ``seq`` of ``stream``; None when the stream does not hold it."""
        async with translating(f"cannot read message {seq} of {stream}"):
            try:
                raw = await self.js.get_msg(stream, seq)
            except NotFoundError:
                return None
        return _from_raw(stream, raw, f"message {seq} of {stream}")

    async def stream_state(self, stream: str) -> tuple[int, int, int]:
        """``(first sequence, last sequence, messages)`` of ``stream``."""
        async with translating(f"cannot read stream {stream}"):
            state = (await self.js.stream_info(stream)).state
        return int(state.first_seq or 0), int(state.last_seq or 0), int(state.messages or 0)

    # -- reading a subject's history -----------------------------------------------------

    async def read(
        self,
        stream: str,
        subject: str,
        *,
        start_seq: int = 1,
        idle_timeout: float = 10.0,
        deadline: Callable[[], float] | None = None,
    ) -> AsyncGenerator[StoredMessage, None]:
        """Every message on ``subject`` in ``stream`` from ``start_seq``, in order, with
        an ephemeral ordered consumer (no state left on the server), until caught up.

        Raises BusError when the stream cannot be read, UpstreamTimeout when it stays
        quiet for ``idle_timeout`` seconds before the end or ``deadline`` (returning the
        seconds left) runs out. Close it (``aclosing``) when stopping early.
        """
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        if start_seq > 1:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq
            )
        async with translating(f"cannot read stream {stream}"):
            subscription = await self.js.subscribe(
                subject, stream=stream, ordered_consumer=True, config=config
            )
        try:
            async with translating(f"cannot read stream {stream}"):
                info = await subscription.consumer_info()
            if not info.num_pending and not (info.delivered and info.delivered.consumer_seq):
                return
            while True:
                wait = idle_timeout if deadline is None else min(idle_timeout, deadline())
                if wait <= 0:
                    raise UpstreamTimeout(f"reading {subject} took too long; try again")
                async with translating(f"cannot read stream {stream}"):
                    try:
                        message = await subscription.next_msg(timeout=wait)
                    except NatsTimeoutError as exc:
                        raise UpstreamTimeout(
                            f"stream {stream} went quiet while reading {subject}"
                        ) from exc
                yield stored(message)
                if not message.metadata.num_pending:
                    return
        finally:
            try:
                await subscription.unsubscribe()
            except (NatsError, TimeoutError) as exc:
                log.debug("unsubscribing a reader of %s: %r", stream, exc)

    def history(
        self, task_id: str, *, deadline: Callable[[], float] | None = None
    ) -> AsyncGenerator[StoredMessage, None]:
        """The task's facts in the audit stream, in order (see ``read``)."""
        return self.read(
            self.settings.audit_stream,
            subjects.one_task(task_id, self.settings.subject_prefix),
            deadline=deadline,
            idle_timeout=5.0,
        )

    # -- live subscriptions --------------------------------------------------------------

    async def live(
        self, subject_list: list[str], deliver: Callable[[str, bytes], Awaitable[None]]
    ) -> LiveSubscription:
        """Core NATS subscriptions calling ``deliver(subject, data)`` for each message,
        confirmed by the server (flush) before this returns. Raises BusError."""

        async def on_message(message: Msg) -> None:
            await deliver(message.subject, message.data)

        opened: list[Subscription] = []
        try:
            async with translating(f"cannot subscribe to {', '.join(subject_list)}"):
                for subject in subject_list:
                    opened.append(await self.nc.subscribe(subject, cb=on_message))
                await self.nc.flush(timeout=int(LOOKUP_TIMEOUT))
        except BusError:
            await LiveSubscription(opened).close()
            raise
        return LiveSubscription(opened)

    # -- durable consumers ---------------------------------------------------------------

    async def durable(
        self,
        stream: str,
        name: str,
        filter_subject: str,
        *,
        description: str = "",
        max_ack_pending: int = 1,
    ) -> PullConsumer:
        """Create the durable pull consumer ``name`` on ``stream`` (every message from the
        start, explicit acks, ``nats.ack_wait``, never given up on) or keep an existing
        one whose settings the server will not change in place, and bind to it.
        Raises BusError."""
        config = ConsumerConfig(
            durable_name=name,
            description=description or None,
            filter_subject=filter_subject,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait,
            max_deliver=-1,
            max_ack_pending=max_ack_pending,
        )
        async with translating(f"cannot set up consumer {name} on {stream}"):
            try:
                await self.js.add_consumer(stream, config)
            except APIError as exc:
                # e.g. "deliver policy can not be updated": keep the existing consumer
                await self.js.consumer_info(stream, name)
                log.warning("consumer %s kept as it is: %s", name, exc)
            subscription = await self.js.pull_subscribe_bind(durable=name, stream=stream)
        return PullConsumer(subscription, name)

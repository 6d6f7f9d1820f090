"""A dramatiq broker on NATS JetStream.

Dramatiq's own brokers own their queues; here every queue is a view onto a JetStream
stream that the caller created beforehand and that covers ``<prefix>.queue.>`` (and
``<prefix>.dead.>``). The broker owns one nats-py client on its own event-loop thread;
dramatiq's threads (consumer threads, worker threads, callers of ``Actor.send``) hop onto
that loop and wait for the result, and every nats-py error becomes
``dramatiq.errors.ConnectionClosed`` (``ConnectionFailed`` when the first connection
cannot be opened) at this boundary.

How dramatiq's concepts map onto JetStream:

=====================  =================================================================
dramatiq               JetStream
=====================  =================================================================
queue ``q``            subject ``<prefix>.queue.q`` (dramatiq-encoded messages, marked
                       with the ``Dramatiq-Message`` header) plus any event subjects bound
                       with :meth:`JetStreamBroker.bind_events`, which may live in another
                       stream
consumer of ``q``      the durable pull consumer ``durable_name("q")`` with explicit ack
                       and ``ack_wait`` on the broker's stream (queue subject and bound
                       events of that stream) and, for events bound from another stream,
                       a durable of the same name there.  Every replica that declares
                       ``q`` fetches from those durables, so work is split between them;
                       another queue bound to the same events is another durable and gets
                       its own copy of each event (fan-out)
retry                  ``-NAK`` with a delay (:class:`dramatiq_jetstream.Retries`): the
                       same stored message comes back after the backoff, and the retry
                       count is JetStream's delivery count.  Nothing is re-published, so
                       there is no second write that could fail on its own
delay queue ``q.DQ``   subject ``<prefix>.queue.q.DQ`` and its own durable, for messages
                       sent with a delay.  As in dramatiq's other brokers, a delayed
                       message carries ``options["eta"]``; the worker holds it in memory
                       until the eta passes, enqueues it on ``q`` and then acks it
dead-letter queue      subject ``<prefix>.dead.q``: ``nack`` publishes a JSON document
                       with the message and its failure, then terminates the JetStream
                       message (``+TERM``).  If the publish fails the message is not
                       terminated and dramatiq retries the nack
max_deliver            counted by the broker, not the server (the durables have no server
                       limit, which would drop messages silently): a message delivered
                       more than ``max_deliver`` times without being settled (its workers
                       keep dying) is failed with :class:`DeliveriesExceeded` without
                       running, so middleware sees it and it is dead-lettered
lease / heartbeat      while a message is outstanding (fetched and not yet acked, nacked
                       or requeued, including messages waiting in the worker's delay
                       queue) a task on the broker loop sends ``+WPI`` (in progress)
                       every ``ack_wait / 3`` seconds.  Long work is never redelivered
                       while its process lives; a dead process's messages come back to
                       another replica ``ack_wait`` after its last keep-alive
requeue                ``-NAK``: redelivered to any replica at once
=====================  =================================================================

Every publish carries its own ``Nats-Msg-Id`` (a fresh uuid), reused only when the same
publish is retried after a timeout so JetStream deduplicates it.  Dramatiq's
``message_id`` cannot be used: a delayed message is a *new* publish of the same message
(same ``message_id``) back onto the queue, and JetStream would silently drop it as a
duplicate inside its duplicate window.

An ack, nak or term answered by "no responders" means the durable was deleted (or
re-created): there is nothing left to settle, so it is final and logged once per durable
instead of being retried forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import nats
import nats.errors
import nats.js.errors
from dramatiq.broker import Broker, Consumer, MessageProxy
from dramatiq.common import compute_backoff, current_millis, dq_name, q_name
from dramatiq.errors import (
    ConnectionClosed,
    ConnectionFailed,
    DecodeError,
    DramatiqError,
    QueueJoinTimeout,
    QueueNotFound,
)
from dramatiq.message import Message
from dramatiq.middleware import Middleware, MiddlewareError
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

__all__ = [
    "DRAMATIQ_HEADER",
    "DeliveriesExceeded",
    "JetStreamBroker",
    "JetStreamConsumer",
    "JetStreamMessageProxy",
    "SettleLater",
    "dead_subject",
    "durable_name",
    "queue_subject",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_E = TypeVar("_E", bound=DramatiqError)

#: Header that marks a payload as a dramatiq-encoded message; anything else arriving on a
#: queue's subjects is treated as a plain JSON event.
DRAMATIQ_HEADER: Final = "Dramatiq-Message"
_DRAMATIQ_HEADER_VALUE: Final = "1"
_MSG_ID_HEADER: Final = api.Header.MSG_ID.value

#: Seconds allowed for one JetStream API request, publish acknowledgement or confirmed ack.
_REQUEST_TIMEOUT: Final = 5.0
#: Seconds ``enqueue`` keeps retrying a publish while the server is unreachable.
_PUBLISH_DEADLINE: Final = 15.0
#: Seconds allowed for connecting and for an orderly close.
_CONNECT_TIMEOUT: Final = 30.0
_CLOSE_TIMEOUT: Final = 10.0
#: Connection attempts before the first connect gives up (reconnects are unlimited).
_INITIAL_CONNECT_ATTEMPTS: Final = 2
#: The shortest pull request sent to the server, in seconds.
_MIN_FETCH: Final = 0.05
#: A consumer reading several durables (events bound from another stream) asks each but
#: the last for this long before waiting on the last one.
_SHORT_FETCH: Final = 0.1
#: How much of an undecodable payload is logged.
_LOGGED_BYTES: Final = 200

_ACK: Final = b"+ACK"
_NAK: Final = b"-NAK"
_TERM: Final = b"+TERM"

_TRANSIENT_ERRORS: Final = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)

_DURABLE_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_SUBJECT_UNSAFE = re.compile(r"[\s*>]")


class DeliveriesExceeded(Exception):
    """A message was delivered more than ``max_deliver`` times without being settled."""


class SettleLater(MiddlewareError, ConnectionClosed):
    """Raise from a ``before_ack``/``before_nack`` hook to keep the message and have
    dramatiq try the whole settlement again a few seconds later.

    Dramatiq's ``emit_before`` swallows other exceptions, and its worker retries a
    settlement only after a connection error: this is both, so a hook whose own work
    must happen first (recording a failure before the dead letter) is never skipped.
    """

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.message = message


def _error(cls: type[_E], *args: object) -> _E:
    """Build one of dramatiq's errors, whose constructors carry no annotations."""
    factory: Callable[..., _E] = cls
    return factory(*args)


def queue_subject(prefix: str, queue_name: str) -> str:
    """The subject dramatiq messages for ``queue_name`` (a queue or delay queue) go to."""
    return f"{prefix}.queue.{queue_name}"


def dead_subject(prefix: str, queue_name: str) -> str:
    """The subject messages that failed for good on ``queue_name`` are published to."""
    return f"{prefix}.dead.{q_name(queue_name)}"


def durable_name(queue_name: str) -> str:
    """The JetStream durable consumer name of a queue or delay queue.

    Durable names cannot contain ``.``, ``*``, ``>`` or whitespace, so such characters
    become ``_`` and a short hash of the original name is appended to keep names that only
    differ in those characters (``a.DQ`` and ``a_DQ``) apart.
    """
    safe = _DURABLE_UNSAFE.sub("_", queue_name)
    if safe == queue_name:
        return safe
    digest = hashlib.sha256(queue_name.encode()).hexdigest()[:8]
    return f"{safe}-{digest}"


def _subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` is one token, a trailing ``>`` one or more."""
    pattern_tokens = pattern.split(".")
    subject_tokens = subject.split(".")
    for index, token in enumerate(pattern_tokens):
        if token == ">":
            return len(subject_tokens) > index
        if index >= len(subject_tokens):
            return False
        if token != "*" and token != subject_tokens[index]:
            return False
    return len(subject_tokens) == len(pattern_tokens)


@dataclass(frozen=True)
class _Binding:
    actor_name: str
    subjects: tuple[str, ...]
    stream: str


class JetStreamMessageProxy(MessageProxy):
    """A message handed to the worker, remembering the JetStream delivery it came from."""

    def __init__(self, message: Message[Any], nats_msg: Msg, consumer: JetStreamConsumer) -> None:
        super().__init__(message)
        self.nats_msg = nats_msg
        self._consumer = consumer
        self._dead_letter_id = str(uuid.uuid4())
        #: Set by :class:`dramatiq_jetstream.Retries`: settle with ``-NAK`` and this delay
        #: (milliseconds) instead of ``+ACK``, so JetStream delivers the message again.
        self.retry_delay: int | None = None

    @property
    def delivery_key(self) -> str:
        """The ack subject: unique per delivery, so it identifies this outstanding message."""
        return self.nats_msg.reply

    @property
    def num_delivered(self) -> int:
        """How many times JetStream has delivered this message (1 on first delivery)."""
        return self.nats_msg.metadata.num_delivered

    def retry_after(self, delay_ms: int) -> None:
        """Have the consumer nak this message with ``delay_ms`` instead of acking it."""
        self.retry_delay = max(0, int(delay_ms))


class JetStreamBroker(Broker):
    """A dramatiq broker whose queues are durable pull consumers on JetStream streams.

    ``stream`` must already exist and cover ``<subject_prefix>.queue.>`` and
    ``<subject_prefix>.dead.>``; limits or work-queue retention both work (each queue and
    delay queue has one durable with its own subject).  Events bound with
    :meth:`bind_events` may come from another stream (an audit log with limits
    retention).  Durables are created with ``DeliverPolicy.ALL``, so a queue declared
    for the first time on a stream with history is handed every stored message on its
    subjects.

    Without ``middleware``, dramatiq's default middleware is used with its ``Retries``
    replaced by :class:`dramatiq_jetstream.Retries` (retry = nak with delay).

    Raises ``ConnectionFailed`` when the server cannot be reached or the stream does not
    exist.  Afterwards the client reconnects forever; calls made while it is away raise
    ``ConnectionClosed`` once their timeout passes, which dramatiq's worker treats as a
    reason to retry.
    """

    def __init__(
        self,
        *,
        url: str,
        stream: str,
        subject_prefix: str = "dcu",
        ack_wait: float = 30.0,
        max_deliver: int = 20,
        connect_options: dict[str, Any] | None = None,
        middleware: list[Middleware] | None = None,
    ) -> None:
        if not subject_prefix or _SUBJECT_UNSAFE.search(subject_prefix):
            raise ValueError(f"invalid subject prefix {subject_prefix!r}")
        if ack_wait <= 0:
            raise ValueError("ack_wait must be positive")
        if max_deliver < 1 and max_deliver != -1:
            raise ValueError("max_deliver must be at least 1 (or -1 for unlimited)")
        if middleware is None:
            from dramatiq_jetstream.retries import default_middleware

            middleware = default_middleware()
        super().__init__(middleware=middleware)
        self.url = url
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.queues: set[str] = set()

        self._connect_options = dict(connect_options or {})
        self._bindings: dict[str, list[_Binding]] = {}
        self._queue_limits: dict[str, int] = {}
        self._known_durables: set[str] = set()
        self._gone_durables: set[str] = set()
        self._outstanding: dict[str, Msg] = {}
        self._lock = threading.Lock()
        self._closed = False

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name=f"JetStreamBroker({stream})", daemon=True
        )
        self._thread.start()
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._keep_alive: asyncio.Task[None] | None = None
        try:
            self._call(self._connect(), timeout=_CONNECT_TIMEOUT)
        except ConnectionClosed as exc:
            self._stop_loop()
            raise _error(ConnectionFailed, f"cannot open JetStream broker on {url}: {exc}") from exc

    # -- dramatiq's Broker contract ------------------------------------------------------

    def bind_events(
        self,
        queue_name: str,
        actor_name: str,
        subjects: Sequence[str],
        *,
        stream: str | None = None,
    ) -> None:
        """Deliver plain JSON events published on ``subjects`` to ``actor_name``.

        ``stream`` is the stream holding those subjects (default: the broker's own).  Each
        event becomes ``Message(queue_name, actor_name, args=(event,), ...)`` whose
        ``message_id`` is the event's ``Nats-Msg-Id`` (a uuid when it has none).  Call
        this before the queue's consumer starts: the durables' filter subjects are
        written when a consumer is created by :meth:`consume`.

        Raises ValueError for an empty subject list or subjects with whitespace.
        """
        if not subjects:
            raise ValueError("bind_events needs at least one subject")
        for subject in subjects:
            if not subject or re.search(r"\s", subject):
                raise ValueError(f"invalid subject {subject!r}")
        binding = _Binding(
            actor_name=actor_name, subjects=tuple(subjects), stream=stream or self.stream
        )
        with self._lock:
            self._bindings.setdefault(q_name(queue_name), []).append(binding)
        logger.info(
            "Bound %s (stream %s) to actor %s on queue %s",
            list(subjects),
            binding.stream,
            actor_name,
            queue_name,
        )

    def set_queue_limits(self, limits: Mapping[str, int]) -> None:
        """Cap how many messages of each queue a consumer holds unsettled at once.

        Unsettled means fetched and not yet acked, nacked or requeued: waiting for a
        worker thread or running.  With one worker for several queues this bounds each
        queue's concurrency, so one stage cannot occupy every worker thread.  Applies to
        consumers created afterwards; delay queues are not limited.

        Raises ValueError for a limit below 1.
        """
        for queue_name, limit in limits.items():
            if limit < 1:
                raise ValueError(f"limit for queue {queue_name!r} must be at least 1")
        with self._lock:
            self._queue_limits.update({q_name(name): limit for name, limit in limits.items()})

    def declare_queue(self, queue_name: str) -> None:
        """Declare ``queue_name`` and its delay queue; idempotent.

        Only records the queue and emits dramatiq's declare signals (the worker starts its
        consumer threads from them); the durable is created on the server by
        :meth:`consume` or, if still missing, by :meth:`enqueue`.

        Raises ValueError for names that cannot be a subject token (wildcards, spaces).
        """
        queue_name = q_name(queue_name)
        if queue_name in self.queues:
            return
        if not queue_name or _SUBJECT_UNSAFE.search(queue_name):
            raise ValueError(f"invalid queue name {queue_name!r}")
        self.emit_before("declare_queue", queue_name)
        self.queues.add(queue_name)
        self.emit_after("declare_queue", queue_name)

        delayed_name = dq_name(queue_name)
        self.delay_queues.add(delayed_name)
        self.emit_after("declare_delay_queue", delayed_name)

    def get_declared_queues(self) -> set[str]:
        return set(self.queues)

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        """Publish ``message`` to its queue (``delay`` ms later via the delay queue).

        Waits for JetStream's PubAck, retrying for a while (with the same
        ``Nats-Msg-Id``) while the server is unreachable.

        Raises ConnectionClosed when the message could not be stored.
        """
        queue_name = message.queue_name
        self.declare_queue(queue_name)
        if delay is not None:
            queue_name = dq_name(queue_name)
            message = message.copy(queue_name=queue_name, options={"eta": current_millis() + delay})

        logger.debug("Enqueueing message %s on queue %s", message.message_id, queue_name)
        self.emit_before("enqueue", message, delay)
        headers = {DRAMATIQ_HEADER: _DRAMATIQ_HEADER_VALUE, _MSG_ID_HEADER: str(uuid.uuid4())}
        self._call(
            self._enqueue(queue_name, message.encode(), headers),
            timeout=_PUBLISH_DEADLINE + 2 * _REQUEST_TIMEOUT,
        )
        self.emit_after("enqueue", message, delay)
        return message

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 30000) -> Consumer:
        """Create (or update) the queue's durable and return a consumer fetching from it.

        Raises QueueNotFound for an undeclared queue, ConnectionClosed when the durable
        cannot be written.
        """
        if q_name(queue_name) not in self.queues:
            raise _error(QueueNotFound, queue_name)
        with self._lock:
            limit = self._queue_limits.get(queue_name)
        if limit is not None:
            prefetch = min(prefetch, limit)
        return JetStreamConsumer(self, queue_name, prefetch, timeout)

    def flush(self, queue_name: str) -> None:
        """Drop every pending and in-flight message of ``queue_name`` and its delay queue.

        The queue's durables are reset (ADR-60, nats-server 2.14+) to just past the
        stream's last message: the messages stay in the stream, where other subscribers
        bound to the same subjects still get them, but this queue never sees them.
        Purging the subjects instead would take bound events away from every other
        subscriber.  Messages published after the reset are delivered as usual.
        """
        queue_name = q_name(queue_name)
        if queue_name not in self.queues:
            raise _error(QueueNotFound, queue_name)
        for name in (queue_name, dq_name(queue_name)):
            self._call(self._reset_durable(name))
        logger.info("Flushed queue %s", queue_name)

    def flush_all(self) -> None:
        """Flush every declared queue (see :meth:`flush`)."""
        for queue_name in self.get_declared_queues():
            self.flush(queue_name)

    def join(self, queue_name: str, *, interval: int = 100, timeout: int | None = None) -> None:
        """Wait until the queue and its delay queue have nothing pending or unacked.

        Only meant for tests.  A message moving between the two queues is briefly on
        neither durable, so emptiness only counts when the stream saw no publish while
        both were looked at, or when two looks ``interval`` ms apart agree.

        Raises QueueJoinTimeout when ``timeout`` (ms) passes first, QueueNotFound for an
        undeclared queue.
        """
        queue_name = q_name(queue_name)
        if queue_name not in self.queues:
            raise _error(QueueNotFound, queue_name)
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        empty_before = False
        while True:
            empty, quiet = self._call(self._queue_is_empty(queue_name))
            if empty and (quiet or empty_before):
                return
            empty_before = empty
            if deadline is not None and time.monotonic() >= deadline:
                raise _error(QueueJoinTimeout, queue_name)
            time.sleep(interval / 1000)

    def close(self) -> None:
        """Stop keep-alives, drain and close the client, and stop the loop thread.

        Messages still outstanding are not acked: JetStream redelivers them to another
        replica once ``ack_wait`` passes.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        logger.info("Closing JetStream broker on stream %s", self.stream)
        try:
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            future.result(_CLOSE_TIMEOUT)
        except Exception:
            logger.warning("JetStream broker did not close cleanly", exc_info=True)
        self._stop_loop()

    # -- running on the broker loop ------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _stop_loop(self) -> None:
        if self._loop.is_closed():
            return

        async def finish_tasks() -> None:
            # nats-py leaves subscription tasks behind; closing the loop under them would
            # raise "Event loop is closed" from their finalisers later, anywhere.
            current = asyncio.current_task()
            rest = [task for task in asyncio.all_tasks() if task is not current]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
            await self._loop.shutdown_asyncgens()

        try:
            asyncio.run_coroutine_threadsafe(finish_tasks(), self._loop).result(_CLOSE_TIMEOUT)
        except Exception:
            logger.warning("JetStream broker tasks did not finish cleanly", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_CLOSE_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, _T], *, timeout: float | None = None) -> _T:
        """Run ``coro`` on the broker loop and wait for it from a dramatiq thread.

        Raises ConnectionClosed for every nats-py error, a timeout or a closed broker.
        """
        if self._closed or self._loop.is_closed():
            coro.close()
            raise _error(ConnectionClosed, "JetStream broker is closed")
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError as exc:
            coro.close()
            raise _error(ConnectionClosed, "JetStream broker is closed") from exc
        wait = _REQUEST_TIMEOUT * 2 if timeout is None else timeout
        try:
            return future.result(wait)
        except TimeoutError as exc:
            future.cancel()
            raise _error(ConnectionClosed, f"NATS request timed out: {exc!r}") from exc
        except nats.errors.Error as exc:
            raise _error(ConnectionClosed, f"NATS error: {exc!r}") from exc
        except BaseException:
            future.cancel()
            raise

    @property
    def _client(self) -> NatsClient:
        if self._nc is None:
            raise nats.errors.ConnectionClosedError
        return self._nc

    @property
    def _jetstream(self) -> JetStreamContext:
        if self._js is None:
            raise nats.errors.ConnectionClosedError
        return self._js

    async def _connect(self) -> None:
        """Connect, failing after a few attempts; afterwards reconnect forever."""
        options: dict[str, Any] = {
            "servers": [part.strip() for part in self.url.split(",") if part.strip()],
            "name": f"dcu-broker-{self.stream}",
            "max_reconnect_attempts": _INITIAL_CONNECT_ATTEMPTS,
            "reconnect_time_wait": 1,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        options.update(self._connect_options)
        try:
            nc = await nats.connect(**options)
        except (OSError, nats.errors.Error) as exc:
            raise nats.errors.NoServersError from exc
        # nats-py retries an unreachable server forever during the *first* connect when
        # max_reconnect_attempts is -1, so the unlimited setting is applied only now.
        nc.options["max_reconnect_attempts"] = self._connect_options.get(
            "max_reconnect_attempts", -1
        )
        js = nc.jetstream(timeout=_REQUEST_TIMEOUT)
        try:
            await js.stream_info(self.stream)
        except nats.errors.Error:
            await nc.close()
            raise
        self._nc, self._js = nc, js
        self._keep_alive = asyncio.get_running_loop().create_task(self._keep_alive_loop())
        logger.info("Connected to %s, stream %s", self.url, self.stream)

    async def _on_error(self, exc: Exception) -> None:
        logger.warning("NATS client error: %s", exc)

    async def _on_disconnected(self) -> None:
        if self._closed:
            logger.debug("Disconnected from NATS %s on close", self.url)
        else:
            logger.warning("Disconnected from NATS %s", self.url)

    async def _on_reconnected(self) -> None:
        logger.info("Reconnected to NATS %s", self.url)

    async def _shutdown(self) -> None:
        if self._keep_alive is not None:
            self._keep_alive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keep_alive
        nc = self._nc
        # Whatever is still outstanding was abandoned when the worker's grace period ran
        # out: hand it back now (-NAK) rather than making another replica wait ack_wait.
        with self._lock:
            abandoned = list(self._outstanding.values())
            self._outstanding.clear()
        if abandoned and nc is not None and nc.is_connected:
            logger.warning("Handing back %d unfinished message(s)", len(abandoned))
            for msg in abandoned:
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    await self._confirm(msg, _NAK)
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), _CLOSE_TIMEOUT / 2)
            except (nats.errors.Error, TimeoutError):
                await nc.close()
        current = asyncio.current_task()
        leftovers = [task for task in asyncio.all_tasks() if task is not current]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)

    async def _keep_alive_loop(self) -> None:
        interval = self.ack_wait / 3
        while True:
            await asyncio.sleep(interval)
            with self._lock:
                messages = list(self._outstanding.values())
            for msg in messages:
                try:
                    await msg.in_progress()
                except nats.errors.Error as exc:
                    logger.debug("Keep-alive for %s failed: %s", msg.reply, exc)

    def _durable_configs(self, queue_name: str) -> dict[str, api.ConsumerConfig]:
        """The queue's durables by stream: its own stream (the queue subject and events
        bound there) and every other stream it has events bound from."""
        filters: dict[str, list[str]] = {
            self.stream: [queue_subject(self.subject_prefix, queue_name)]
        }
        if queue_name == q_name(queue_name):
            with self._lock:
                bindings = list(self._bindings.get(queue_name, ()))
            for binding in bindings:
                wanted = filters.setdefault(binding.stream, [])
                wanted.extend(s for s in binding.subjects if s not in wanted)
        name = durable_name(queue_name)
        is_delay_queue = queue_name != q_name(queue_name)
        return {
            stream: api.ConsumerConfig(
                name=name,
                durable_name=name,
                description=f"dramatiq queue {queue_name}",
                deliver_policy=api.DeliverPolicy.ALL,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait,
                # The broker counts deliveries itself (see DeliveriesExceeded): a server
                # limit would drop the message without a dead letter or a failure.
                max_deliver=-1,
                filter_subjects=subjects,
                # Delayed messages wait in worker memory until their eta; the server's
                # default of 1000 unacked messages per durable would stall every later
                # delay behind them.
                max_ack_pending=-1 if is_delay_queue else None,
            )
            for stream, subjects in filters.items()
        }

    async def _ensure_durable(self, queue_name: str, *, update: bool) -> list[str]:
        """Create the queue's durables; with ``update``, also rewrite existing ones.

        Producers only create a missing durable on the broker's stream (they do not know a
        worker's event bindings); the consuming side owns the filters and rewrites them
        on every start.  Returns the streams the queue has a durable on.
        """
        name = durable_name(queue_name)
        if not update:
            if name in self._known_durables:
                return [self.stream]
            try:
                await self._jetstream.consumer_info(self.stream, name)
            except nats.js.errors.NotFoundError:
                pass
            else:
                self._known_durables.add(name)
                return [self.stream]
            configs = {self.stream: self._durable_configs(queue_name)[self.stream]}
        else:
            configs = self._durable_configs(queue_name)
        for stream, config in configs.items():
            await self._jetstream.add_consumer(stream, config=config)
            logger.info(
                "Durable %s on stream %s for queue %s filters %s",
                name,
                stream,
                queue_name,
                config.filter_subjects,
            )
        self._known_durables.add(name)
        return list(configs)

    async def _subscribe(self, queue_name: str) -> list[JetStreamContext.PullSubscription]:
        streams = await self._ensure_durable(queue_name, update=True)
        return [
            await self._jetstream.pull_subscribe_bind(durable=durable_name(queue_name), stream=s)
            for s in streams
        ]

    async def _unsubscribe(self, subscription: JetStreamContext.PullSubscription) -> None:
        with contextlib.suppress(nats.errors.Error, ValueError):
            await subscription.unsubscribe()

    async def _fetch(
        self, subscription: JetStreamContext.PullSubscription, timeout: float
    ) -> Msg | None:
        try:
            messages = await subscription.fetch(1, timeout=timeout)
        except nats.errors.TimeoutError:
            return None
        return messages[0] if messages else None

    async def _retrying(
        self, attempt: Callable[[], Awaitable[_T]], what: str, deadline: float
    ) -> _T:
        """Await ``attempt()``, retrying transient failures (server away, JetStream not
        ready yet) until the monotonic ``deadline``; then the last error is raised.
        """
        attempts = 0
        while True:
            try:
                return await attempt()
            except _TRANSIENT_ERRORS as exc:
                attempts, backoff_ms = compute_backoff(attempts, factor=100, max_backoff=1000)
                pause = backoff_ms / 1000
                if time.monotonic() + pause >= deadline:
                    raise
                logger.info("%s failed (%s), retrying in %.2fs", what, exc, pause)
                await asyncio.sleep(pause)

    async def _enqueue(self, queue_name: str, payload: bytes, headers: dict[str, str]) -> None:
        deadline = time.monotonic() + _PUBLISH_DEADLINE
        await self._retrying(
            lambda: self._ensure_durable(queue_name, update=False),
            f"Declaring {queue_name}",
            deadline,
        )
        subject = queue_subject(self.subject_prefix, queue_name)
        await self._publish(subject, payload, headers, deadline)

    async def _publish(
        self, subject: str, payload: bytes, headers: dict[str, str], deadline: float
    ) -> None:
        """Publish and wait for the PubAck, retrying while the server is away.

        Retries reuse ``headers`` (and so the ``Nats-Msg-Id``): a publish that did land
        before its PubAck was lost is deduplicated by JetStream.
        """
        await self._retrying(
            lambda: self._jetstream.publish(
                subject,
                payload,
                timeout=_REQUEST_TIMEOUT,
                stream=self.stream,
                headers=dict(headers),
            ),
            f"Publish to {subject}",
            deadline,
        )

    async def _confirm(self, msg: Msg, kind: bytes) -> None:
        """Send an ack of ``kind`` and wait for the server to confirm it (idempotent).

        "No responders" means the durable is gone (deleted or re-created): nothing is
        left to settle, so that is final, logged once per durable.
        """
        try:
            await self._client.request(msg.reply, kind, timeout=_REQUEST_TIMEOUT)
        except nats.errors.NoRespondersError:
            durable = msg.metadata.consumer or msg.reply
            if durable not in self._gone_durables:
                self._gone_durables.add(durable)
                logger.warning(
                    "Durable %s on stream %s is gone; its unsettled messages are dropped "
                    "here (a re-created durable delivers them again)",
                    durable,
                    msg.metadata.stream,
                )

    async def _dead_letter(self, proxy: JetStreamMessageProxy, queue_name: str) -> None:
        exception = proxy._exception
        document = {
            "queue_name": q_name(queue_name),
            "message": proxy._message.asdict(),
            "error": None if exception is None else f"{type(exception).__name__}: {exception}",
            "traceback": proxy.options.get("traceback"),
            "failed_at": current_millis(),
            "nats_subject": proxy.nats_msg.subject,
            "num_delivered": proxy.num_delivered,
        }
        payload = json.dumps(document, default=repr).encode()
        headers = {_MSG_ID_HEADER: proxy._dead_letter_id}
        subject = dead_subject(self.subject_prefix, queue_name)
        await self._publish(subject, payload, headers, time.monotonic() + _PUBLISH_DEADLINE)
        await self._confirm(proxy.nats_msg, _TERM)

    async def _reset_durable(self, queue_name: str) -> None:
        """Move the queue's durables past everything their streams hold now; on a
        work-queue stream (which has no other readers) the queue's subject is purged."""
        for stream in await self._ensure_durable(queue_name, update=False):
            info = await self._jetstream.stream_info(stream)
            if info.config.retention == api.RetentionPolicy.WORK_QUEUE:
                await self._jetstream.purge_stream(
                    stream, subject=queue_subject(self.subject_prefix, queue_name)
                )
                continue
            await self._jetstream.reset_consumer(
                stream, durable_name(queue_name), seq=info.state.last_seq + 1
            )

    async def _last_seqs(self, streams: Iterable[str]) -> list[int]:
        return [(await self._jetstream.stream_info(s)).state.last_seq for s in streams]

    async def _queue_is_empty(self, queue_name: str) -> tuple[bool, bool]:
        """Whether the queue's durables are drained, and whether their streams stayed
        quiet meanwhile."""
        with self._lock:
            streams = {self.stream} | {b.stream for b in self._bindings.get(queue_name, ())}
        before = await self._last_seqs(sorted(streams))
        empty = True
        for name in (dq_name(queue_name), queue_name):
            await self._ensure_durable(name, update=False)
            for stream in sorted(streams) if name == queue_name else [self.stream]:
                try:
                    info = await self._jetstream.consumer_info(stream, durable_name(name))
                except nats.js.errors.NotFoundError:
                    continue  # not consumed yet: nothing of it is in flight
                if info.num_pending or info.num_ack_pending:
                    empty = False
        after = await self._last_seqs(sorted(streams))
        return empty, before == after

    # -- bookkeeping shared by consumers --------------------------------------------------

    def _decode(self, queue_name: str, msg: Msg) -> Message[Any]:
        """Turn a delivery into a dramatiq message.

        Raises DecodeError for a payload that is neither a dramatiq message nor a JSON
        event on a bound subject.
        """
        headers = msg.headers or {}
        if headers.get(DRAMATIQ_HEADER) == _DRAMATIQ_HEADER_VALUE:
            return Message.decode(msg.data)
        actor_name = self._bound_actor(q_name(queue_name), msg.subject)
        if actor_name is None:
            raise _error(DecodeError, f"no actor bound to subject {msg.subject}", msg.data, None)
        try:
            event = json.loads(msg.data)
        except ValueError as exc:
            raise _error(DecodeError, "event is not JSON", msg.data, exc) from exc
        return Message(
            queue_name=queue_name,
            actor_name=actor_name,
            args=(event,),
            kwargs={},
            options={"nats_subject": msg.subject},
            message_id=headers.get(_MSG_ID_HEADER) or str(uuid.uuid4()),
            message_timestamp=int(msg.metadata.timestamp.timestamp() * 1000),
        )

    def _bound_actor(self, queue_name: str, subject: str) -> str | None:
        with self._lock:
            bindings = list(self._bindings.get(queue_name, ()))
        for binding in bindings:
            if any(_subject_matches(pattern, subject) for pattern in binding.subjects):
                return binding.actor_name
        return None

    def _track(self, msg: Msg) -> None:
        with self._lock:
            self._outstanding[msg.reply] = msg

    def _untrack(self, msg: Msg) -> None:
        with self._lock:
            self._outstanding.pop(msg.reply, None)


class JetStreamConsumer(Consumer):
    """Fetches one message at a time from a queue's durable, never holding more than
    ``prefetch`` unsettled ones, so replicas sharing the durable split the work fairly.

    ``ack``/``nack``/``requeue`` are called from worker threads; they wait for the
    server's confirmation and raise ConnectionClosed when it does not come, which makes
    dramatiq retry them.
    """

    def __init__(
        self, broker: JetStreamBroker, queue_name: str, prefetch: int, timeout: int
    ) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self.prefetch = max(prefetch, 1)
        self.timeout = timeout
        self._held: dict[str, JetStreamMessageProxy] = {}
        self._slots = threading.Condition()
        self._subscriptions = broker._call(broker._subscribe(queue_name))
        self._turn = 0

    def __next__(self) -> MessageProxy | None:
        timeout = self.timeout / 1000
        with self._slots:
            if len(self._held) >= self.prefetch:
                self._slots.wait(timeout)
                return None
        deadline = time.monotonic() + timeout
        # Several durables (events bound from other streams): ask each but the last
        # briefly, starting with a different one each call so none starves.
        count = len(self._subscriptions)
        self._turn = (self._turn + 1) % count
        order = self._subscriptions[self._turn :] + self._subscriptions[: self._turn]
        for index, subscription in enumerate(order):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            wait = remaining if index == count - 1 else min(_SHORT_FETCH, remaining)
            msg = self.broker._call(
                self.broker._fetch(subscription, max(wait, _MIN_FETCH)),
                timeout=wait + _REQUEST_TIMEOUT,
            )
            if msg is None:
                continue
            proxy = self._admit(msg)
            if proxy is not None:
                return proxy
        return None

    def _admit(self, msg: Msg) -> JetStreamMessageProxy | None:
        try:
            message = self.broker._decode(self.queue_name, msg)
        except DecodeError:
            logger.error(
                "Terminating undecodable message on %s (queue %s): %r",
                msg.subject,
                self.queue_name,
                msg.data[:_LOGGED_BYTES],
            )
            with contextlib.suppress(ConnectionClosed):
                self.broker._call(self.broker._confirm(msg, _TERM))
            return None
        proxy = JetStreamMessageProxy(message, msg, self)
        self.broker._track(msg)
        with self._slots:
            self._held[proxy.delivery_key] = proxy
        limit = self.broker.max_deliver
        if limit != -1 and proxy.num_delivered > limit:
            # Delivered ``limit`` times and never settled: its workers keep dying on it.
            # Failed without running, it reaches the middleware (``before_nack``) and the
            # dead letters instead of vanishing.
            proxy.fail()
            proxy.stuff_exception(
                DeliveriesExceeded(
                    f"delivered {proxy.num_delivered - 1} times without being settled "
                    f"(max_deliver={limit}): its workers died or timed out every time"
                )
            )
            logger.error(
                "Message %s on queue %s exceeded max_deliver=%d; dead-lettering it",
                message.message_id,
                self.queue_name,
                limit,
            )
        elif proxy.num_delivered > 1:
            logger.info(
                "Message %s redelivered on queue %s (delivery %d)",
                message.message_id,
                self.queue_name,
                proxy.num_delivered,
            )
        return proxy

    def _release(self, proxy: JetStreamMessageProxy) -> None:
        self.broker._untrack(proxy.nats_msg)
        owner = proxy._consumer
        with owner._slots:
            owner._held.pop(proxy.delivery_key, None)
            owner._slots.notify_all()

    @staticmethod
    def _proxy(message: MessageProxy) -> JetStreamMessageProxy:
        if not isinstance(message, JetStreamMessageProxy):
            raise TypeError(f"not a JetStream message: {message!r}")
        return message

    def ack(self, message: MessageProxy) -> None:
        """Ack the message, or nak it with its retry delay when Retries asked for one."""
        proxy = self._proxy(message)
        if proxy.retry_delay is None:
            kind = _ACK
        else:
            kind = _NAK + b" " + json.dumps({"delay": proxy.retry_delay * 1_000_000}).encode()
        self.broker._call(self.broker._confirm(proxy.nats_msg, kind))
        self._release(proxy)

    def nack(self, message: MessageProxy) -> None:
        """Publish the message and its failure to the dead subject, then terminate it."""
        proxy = self._proxy(message)
        self.broker._call(
            self.broker._dead_letter(proxy, self.queue_name),
            timeout=_PUBLISH_DEADLINE + 3 * _REQUEST_TIMEOUT,
        )
        self._release(proxy)
        logger.warning(
            "Message %s dead-lettered on %s",
            proxy.message_id,
            dead_subject(self.broker.subject_prefix, self.queue_name),
        )

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        """Hand unprocessed messages back (``-NAK``) so another replica gets them at once.

        Keep-alives stop for all of them even when a nak fails, so those come back after
        ``ack_wait``; the first failure is raised as ConnectionClosed afterwards.
        """
        failure: ConnectionClosed | None = None
        for message in messages:
            proxy = self._proxy(message)
            self._release(proxy)
            try:
                self.broker._call(self.broker._confirm(proxy.nats_msg, _NAK))
            except ConnectionClosed as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Unsubscribe, and give back messages this consumer held for their eta.

        When dramatiq restarts a consumer after a connection error it forgets its delay
        queue without requeueing it; those messages must not be kept alive forever.
        Messages waiting in the work queue stay alive: a worker still acks them.
        """
        with self._slots:
            delayed = [p for p in self._held.values() if p.options.get("eta") is not None]
        if delayed:
            with contextlib.suppress(ConnectionClosed):
                self.requeue(delayed)
        for subscription in self._subscriptions:
            with contextlib.suppress(ConnectionClosed):
                self.broker._call(self.broker._unsubscribe(subscription))

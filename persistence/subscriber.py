"""The persistence subscriber: every task event on the stream, recorded in stream order.

``PersistenceSubscriber`` reads the durable pull consumer ``<stream>-persistence``
(``<prefix>.task.>``, explicit ack, deliver all, one message in flight) and hands each
event to the repository, one at a time, in stream order:

* decoded and recorded (whatever the state machine said): ``ack_sync`` (confirmed by the
  server; a lost ack only means a redelivery, which applying again ignores). A long apply
  sends ``in_progress`` every third of ``ack_wait`` so it is not redelivered mid-way;
* the database failed (``DatabaseError``): logged, ``nak`` with a growing delay. With one
  message in flight nothing overtakes it, so the order holds and nothing is lost while the
  database is down;
* an event of a type this version does not know (``UnknownEventType``, a newer producer
  during a rolling upgrade): ``nak`` after ``unknown_retry_delay`` so a newer replica
  sharing the durable can take it, until the message is ``unknown_type_grace`` old; then
  refused as below;
* anything else (not an event: malformed, or holding a value the event schema refuses,
  e.g. one longer than its column; text the database cannot encode; a bug in applying
  it): recorded as refused (``dcu_refused_events``: stream position, reason, raw bytes) and
  ``term()``, so one poison message never halts persistence. When even that record fails,
  ``nak`` with the growing delay: the message is retried, never dropped unrecorded.

NATS outages are ridden out: nats-py reconnects, and the fetch loop keeps going after
timeouts and errors with a short backoff. ``rebuild_from_stream`` replays the whole stream
into an empty database with an ephemeral ordered consumer (``dcu replay``), refusing
what the live subscriber would refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from bus import Bus, Delivery, PullConsumer
from events import subjects
from events.audit_archive import StoredMessage
from events.limits import RAW_LOG_MAX
from events.schema import DecodeError, Event, EventType, UnknownEventType, utcnow
from kernel import logs
from kernel.errors import DcuError
from kernel.settings import NatsSettings
from persistence.database import DatabaseError
from persistence.repository import ApplyOutcome

log = logging.getLogger(__name__)


class EventSink(Protocol):
    """Where the subscriber puts events: ``TaskRepository`` or a test double."""

    async def apply(self, event: Event, stream_seq: int | None) -> ApplyOutcome: ...

    async def record_refused(
        self,
        *,
        stream: str,
        stream_seq: int,
        subject: str,
        reason: str,
        raw: bytes,
        time: datetime,
        event_id: str | None = None,
        task_id: str | None = None,
        event_type: str | None = None,
    ) -> bool: ...


@dataclass(frozen=True, slots=True)
class ReplayCounts:
    """What a rebuild did: events applied (whatever the state machine said), messages
    recorded as refused, and tasks whose ``requested`` event was applied."""

    applied: int
    refused: int
    tasks: int
    progress: int = 0  # latest progress reports applied from the progress stream


def consumer_name(settings: NatsSettings) -> str:
    return f"{settings.stream}-persistence"


def progress_consumer_name(settings: NatsSettings) -> str:
    return f"{settings.stream}-persistence-progress"


class PersistenceSubscriber:
    """Feeds the durable consumers' events to ``repository.apply`` until stopped."""

    def __init__(
        self,
        bus: Bus,
        repository: EventSink,
        *,
        fetch_timeout: float = 5.0,
        retry_delay: float = 1.0,
        max_retry_delay: float = 60.0,
        unknown_retry_delay: float = 5.0,
        unknown_type_grace: float = 300.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._bus = bus
        self._settings = bus.settings
        self._repository = repository
        self._fetch_timeout = fetch_timeout
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._unknown_retry_delay = unknown_retry_delay
        self._unknown_type_grace = unknown_type_grace
        self._clock = clock
        self._consumer: PullConsumer | None = None
        self._progress_consumer: PullConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._progress_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._busy = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Create the durable consumers when missing and start consuming: task facts
        from the audit stream, progress from the progress stream (both must exist, see
        ``bus.ensure_streams``).

        Raises BusError when JetStream cannot be reached; RuntimeError when started twice.
        """
        if self._task is not None:
            raise RuntimeError("persistence subscriber already started")
        name = consumer_name(self._settings)
        settings = self._settings
        # Every task fact from the start, one unacked at a time (strict stream order, even
        # across naks); never given up on (a database outage must not drop an event).
        self._consumer = await self._bus.durable(
            settings.audit_stream,
            name,
            subjects.every_task(prefix=settings.subject_prefix),
            description="DCU persistence: records every task event in the database",
            max_ack_pending=1,
        )
        # The latest report per task; order does not matter (an older report never
        # replaces a newer one in the database).
        self._progress_consumer = await self._bus.durable(
            settings.progress_stream,
            progress_consumer_name(settings),
            subjects.every_progress(settings.subject_prefix),
            description="DCU persistence: records the latest progress of each task",
            max_ack_pending=256,
        )
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(self._consumer), name=name)
        self._progress_task = asyncio.create_task(
            self._run(self._progress_consumer, track_busy=False),
            name=progress_consumer_name(settings),
        )
        log.info("persistence subscriber %s started", name)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop fetching, let the message in hand finish (up to ``grace`` s), then return.

        A message cut off by the grace period is redelivered later (applying it again is
        a no-op). Never raises for the subscriber's own failures.
        """
        self._stopping.set()
        progress_task, self._progress_task = self._progress_task, None
        if progress_task is not None:
            progress_task.cancel()
            await asyncio.gather(progress_task, return_exceptions=True)
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
        for consumer in (self._consumer, self._progress_consumer):
            if consumer is not None:
                await consumer.close()
        self._consumer = self._progress_consumer = None
        log.info("persistence subscriber %s stopped", consumer_name(self._settings))

    async def _run(self, consumer: PullConsumer, *, track_busy: bool = True) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                delivery = await consumer.next(self._fetch_timeout)
            except Exception as exc:  # keep consuming whatever NATS does
                log.warning("persistence fetch failed, retrying in %.1fs: %s", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            if delivery is None:
                continue
            self._busy = self._busy or track_busy
            try:
                await self._handle(delivery)
            finally:
                if track_busy:
                    self._busy = False

    async def _handle(self, message: Delivery) -> None:
        stored = message.stored
        sequence = stored.seq
        try:
            event = Event.decode(stored.data)
        except UnknownEventType as exc:
            age = (self._clock() - stored.time).total_seconds()
            if age < self._unknown_type_grace:
                log.info(
                    "message %s has unknown event type %r (%.0fs old), leaving it %.1fs "
                    "for a newer replica",
                    sequence,
                    exc.event_type,
                    age,
                    self._unknown_retry_delay,
                )
                await _settle(message.nak(delay=self._unknown_retry_delay), "nak", sequence)
                return
            # The same reason a replay records (it refuses at once), so the rows agree;
            # the grace goes to the log.
            log.warning(
                "message %s: unknown event type %r still unknown after %gs",
                sequence,
                exc.event_type,
                self._unknown_type_grace,
            )
            await self._refuse(message, _refusal(exc))
            return
        except Exception as exc:
            if not isinstance(exc, DecodeError):
                log.exception("decoding message %s failed", sequence)
            await self._refuse(message, _refusal(exc))
            return
        with logs.bound(
            task_id=event.task_id, stage=logs.event_stage(event), event_id=event.event_id
        ):
            await self._apply(message, event)

    async def _apply(self, message: Delivery, event: Event) -> None:
        sequence = message.stored.seq
        try:
            async with _kept_alive(message, self._settings.ack_wait / 3):
                outcome = await self._repository.apply(event, sequence)
        except DatabaseError as exc:  # retry later, in order
            delay = self._redelivery_delay(message.num_delivered)
            log.error(
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
        except Exception as exc:  # the event cannot be stored (or a bug): never retried
            if not isinstance(exc, DcuError):
                log.exception("task %s: applying event %s failed", event.task_id, event.event_id)
            await self._refuse(message, _refusal(exc, event), event)
            return
        log.debug("task %s: seq %s %s -> %s", event.task_id, sequence, event.type, outcome)
        await _settle(message.ack(), "ack", sequence)

    async def _refuse(self, message: Delivery, reason: str, event: Event | None = None) -> None:
        """Record ``message`` as refused and terminate it; nak it when that record fails."""
        stored = message.stored
        sequence = stored.seq
        log.error(
            "refusing message %s on %s: %s: %r",
            sequence,
            stored.subject,
            reason,
            stored.data[:RAW_LOG_MAX],
        )
        try:
            await record_refused(self._repository, stored, reason, event)
        except Exception as exc:
            delay = self._redelivery_delay(message.num_delivered)
            report = log.error if isinstance(exc, DatabaseError) else log.exception
            report("cannot record refused message %s, retrying in %.1fs: %s", sequence, delay, exc)
            await _settle(message.nak(delay=delay), "nak", sequence)
            return
        await _settle(message.term(), "term", sequence)

    def _redelivery_delay(self, delivered: int | None) -> float:
        attempt = max(1, delivered or 1)
        return float(min(self._retry_delay * 2 ** min(attempt - 1, 16), self._max_retry_delay))


async def _settle(acknowledgement: Awaitable[object], kind: str, seq: int) -> None:
    """Send an ack/nak/term; a failure only means JetStream redelivers the message."""
    try:
        await acknowledgement
    except Exception as exc:
        log.warning("cannot %s message %s (it will be redelivered): %r", kind, seq, exc)


@contextlib.asynccontextmanager
async def _kept_alive(message: Delivery, interval: float) -> AsyncIterator[None]:
    """While the body runs, tell JetStream every ``interval`` seconds that ``message`` is
    in progress, so a slow apply is not redelivered to another replica mid-way."""

    async def keep_alive() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await message.in_progress()
            except Exception as exc:
                log.debug("in-progress for message %s failed: %r", message.stored.seq, exc)

    task = asyncio.create_task(keep_alive())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _refusal(exc: BaseException, event: Event | None = None) -> str:
    """Why a message is refused, for the log and ``dcu_refused_events.reason``."""
    if isinstance(exc, UnknownEventType):
        return f"unknown event type {exc.event_type!r}"
    if isinstance(exc, DecodeError):
        return f"not an event: {exc}"
    what = "event" if event is None else f"{event.type} event"
    return f"{what} cannot be recorded: {type(exc).__name__}: {exc}"


def _envelope(raw: bytes) -> dict[str, str]:
    """Whatever ids a message's bytes hold (``event_id``, ``task_id``, ``type``), as text;
    nothing for bytes that are not a JSON object."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    found = {}
    for key in ("event_id", "task_id", "type"):
        value = data.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool):
            text = str(value)
            try:
                text.encode()
            except UnicodeEncodeError:
                continue
            found[key] = text[:100]
    return found


async def record_refused(
    sink: EventSink, kept: StoredMessage, reason: str, event: Event | None = None
) -> bool:
    """Record ``kept`` as refused in ``sink``; its ids come from ``event`` when it was
    decoded, else from whatever envelope the raw bytes hold. Raises as ``sink`` does."""
    if event is not None:
        ids = {"event_id": event.event_id, "task_id": event.task_id, "type": str(event.type)}
    else:
        ids = _envelope(kept.data)
    return await sink.record_refused(
        stream=kept.stream,
        stream_seq=kept.seq,
        subject=kept.subject,
        reason=reason,
        raw=kept.data,
        time=kept.time,
        event_id=ids.get("event_id"),
        task_id=ids.get("task_id"),
        event_type=ids.get("type"),
    )


class Rebuild:
    """Applies stored messages to an (empty) database in order, as the live subscriber
    would, and counts what it did (``dcu replay``)."""

    def __init__(self, repository: EventSink) -> None:
        self.repository = repository
        self.applied = self.refused = self.progress = 0
        self.tasks: set[str] = set()

    async def apply(self, message: StoredMessage) -> None:
        """Raises DatabaseError when the database fails; everything else is refused."""
        event: Event | None = None
        try:
            event = Event.decode(message.data)
            outcome = await self.repository.apply(event, message.seq)
        except DatabaseError:
            raise
        except Exception as exc:
            reason = _refusal(exc, event)
            log.error("replay: refusing message %s of %s: %s", message.seq, message.stream, reason)
            await record_refused(self.repository, message, reason, event)
            self.refused += 1
            return
        if outcome is ApplyOutcome.PROGRESS:
            self.progress += 1
            return
        self.applied += 1
        if event.type is EventType.REQUESTED and outcome is ApplyOutcome.APPLIED:
            self.tasks.add(event.task_id)

    async def apply_all(self, messages: AsyncIterator[StoredMessage]) -> None:
        async for message in messages:
            await self.apply(message)

    def counts(self) -> ReplayCounts:
        return ReplayCounts(
            applied=self.applied,
            refused=self.refused,
            tasks=len(self.tasks),
            progress=self.progress,
        )


async def rebuild_from_stream(
    bus: Bus,
    repository: EventSink,
    *,
    idle_timeout: float = 10.0,
    start_seq: int = 1,
    rebuild: Rebuild | None = None,
) -> ReplayCounts:
    """Apply every task fact of the audit stream from ``start_seq``, in order, then the
    latest progress of each task the progress stream still holds.

    Meant for an empty database (``dcu replay``; ``rebuild`` carries on the counts of
    facts applied before, from the archive). What the live subscriber refuses is
    recorded as refused here too (an unknown event type at once: a replay has no newer
    replica to wait for). Raises BusError when JetStream cannot be read or goes quiet for
    ``idle_timeout`` seconds before the end, and DatabaseError when the database fails.
    """
    settings = bus.settings
    rebuild = rebuild or Rebuild(repository)
    feeds = (
        (settings.audit_stream, subjects.every_task(prefix=settings.subject_prefix), start_seq),
        (settings.progress_stream, subjects.every_progress(settings.subject_prefix), 1),
    )
    for stream, subject, first in feeds:
        messages = bus.read(stream, subject, start_seq=first, idle_timeout=idle_timeout)
        async with contextlib.aclosing(messages):
            await rebuild.apply_all(messages)
    counts = rebuild.counts()
    log.info(
        "replay of stream %s: applied %s events, refused %s, tasks rebuilt %s, progress %s",
        settings.audit_stream,
        counts.applied,
        counts.refused,
        counts.tasks,
        counts.progress,
    )
    return counts

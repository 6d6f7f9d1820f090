"""Event history and live server-sent events (SSE) for tasks.

* ``GET /events/{task_id}``: the task's events as stored in the stream, read with an
  ephemeral ordered consumer filtered on ``<prefix>.task.<task_id>.>``.
* ``GET /events/{task_id}/stream``: that history, then the task's live events (a core
  NATS subscription opened *before* the history is read, de-duplicated by event id, so
  nothing falls between the two); the stream ends after ``uploaded`` or ``failed``.
* ``GET /events/stream``: every task's live events, optionally one ``type`` only.

An SSE message is ``id: <event_id>``, ``event: <type>`` and ``data: <event JSON>``; a
``: keep-alive`` comment goes out every ``HEARTBEAT`` seconds of silence. A client that
reconnects with ``Last-Event-ID`` gets only what follows that event; one that already has
the terminal event gets ``204 No Content``, which tells ``EventSource`` to stop.

Every open stream is registered on the app, so shutdown (``app.on_shutdown``) ends them
before the NATS connection is drained; a client that goes away is noticed within
``DISCONNECT_POLL`` seconds and its subscription is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from aiohttp import web

from bus import Bus, LiveSubscription
from events import subjects
from events.limits import RAW_LOG_MAX
from events.schema import DecodeError, Event, EventType
from gateway import envelope, models
from gateway.http import parse_headers, parse_path, parse_query, respond
from gateway.keys import API, BUS, SETTINGS
from kernel.errors import DcuError, NotFound

log = logging.getLogger(__name__)

MAX_EVENTS = 10_000  # events returned by one history request
HISTORY_TIMEOUT = 30.0  # seconds for a whole history request
IDLE_TIMEOUT = 5.0  # seconds the stream may stay silent before the history is complete
HEARTBEAT = 15.0  # seconds of silence before a keep-alive comment
DISCONNECT_POLL = 1.0  # seconds between checks that the client is still there
MAX_BACKLOG = 10_000  # live events buffered for a client that reads too slowly
MAX_REMEMBERED = 10_000  # event ids a stream remembers to drop duplicates
TERMINAL = frozenset({EventType.UPLOADED, EventType.FAILED})
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # no proxy buffering (nginx)
}


class _StreamEnded(Exception):
    """The live feed was closed (shutdown, or the client fell too far behind)."""


class LiveFeed:
    """Events from one core NATS subscription, buffered for one SSE response.

    The NATS callback only appends (``push``), so a slow client never blocks the
    connection's other subscribers; past ``limit`` buffered events the feed closes
    itself and the client can reconnect with ``Last-Event-ID``.
    """

    def __init__(self, limit: int = MAX_BACKLOG) -> None:
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._limit = limit
        self._getter: asyncio.Future[Event | None] | None = None
        self.reason = ""

    @property
    def closed(self) -> bool:
        return bool(self.reason)

    def push(self, event: Event) -> None:
        if self.closed:
            return
        if self._queue.qsize() >= self._limit:
            self.close(f"client fell {self._limit} events behind")
            return
        self._queue.put_nowait(event)

    def close(self, reason: str) -> None:
        """End the feed; the reader gets ``_StreamEnded`` at its next ``next``."""
        if not self.closed:
            self.reason = reason
            self._queue.put_nowait(None)

    async def next(self, timeout: float) -> Event | None:
        """The next event, or None when ``timeout`` passes first.

        Raises _StreamEnded once the feed is closed. A wait that times out keeps its
        pending ``get`` for the next call, so no event is lost to a timeout.
        """
        if self.closed:
            raise _StreamEnded(self.reason)
        if self._getter is None:
            self._getter = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({self._getter}, timeout=timeout)
        if not done:
            return None
        item = self._getter.result()
        self._getter = None
        if item is None or self.closed:
            raise _StreamEnded(self.reason)
        return item

    def discard(self) -> None:
        """Drop the pending ``get``; call once the feed is no longer read."""
        if self._getter is not None:
            self._getter.cancel()
            self._getter = None


class RecentIds:
    """The last ``limit`` event ids a stream sent: enough to drop the live copies of
    events the history already gave, and events a stage re-published (JetStream
    de-duplicates those, core NATS delivers them again)."""

    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._limit = limit

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        self._ids.move_to_end(event_id)
        if len(self._ids) > self._limit:
            self._ids.popitem(last=False)


@dataclass
class _OpenStreams:
    """The app's running SSE responses, so shutdown can end them."""

    feeds: set[LiveFeed] = field(default_factory=set)
    closing: bool = False

    def add(self, feed: LiveFeed) -> None:
        self.feeds.add(feed)
        if self.closing:
            feed.close("server shutting down")

    def close_all(self) -> None:
        self.closing = True
        for feed in list(self.feeds):
            feed.close("server shutting down")


STREAMS = web.AppKey("event_streams", _OpenStreams)


# --- helpers ---------------------------------------------------------------------------


def sse_message(event: Event) -> bytes:
    """One SSE message; the JSON is compact, so ``data`` is always a single line."""
    data = json.dumps(event.to_dict(), ensure_ascii=False, separators=(",", ":"))
    lines = []
    if not any(ch in event.event_id for ch in "\r\n\0"):
        lines.append(f"id: {event.event_id}")
    lines.append(f"event: {event.type}")
    lines.append(f"data: {data}")
    return ("\n".join(lines) + "\n\n").encode()


def _decode(subject: str, data: bytes, prefix: str) -> Event | None:
    """The event in ``data``, or None (logged) when it is not one or was not published on
    its own subject (``subjects.for_event``: a forged or misrouted message)."""
    try:
        event = Event.decode(data)
    except DecodeError as exc:
        log.warning(
            "skipping message on %s, not an event (%s): %r",
            subject,
            exc,
            exc.raw[:RAW_LOG_MAX],
        )
        return None
    if subject != subjects.for_event(event, prefix):
        log.warning(
            "skipping event %s of task %s: it does not match its subject %s",
            event.event_id,
            event.task_id,
            subject,
        )
        return None
    return event


async def read_history(
    bus: Bus, task_id: str, *, deadline: float | None = None
) -> AsyncGenerator[tuple[int, Event], None]:
    """Yield ``(stream sequence, event)`` for every fact of the task, in stream order;
    nothing when the audit stream holds none. Undecodable messages are logged and
    skipped. Raises BusError when JetStream cannot be read, UpstreamTimeout when it goes
    quiet before the end or the monotonic ``deadline`` passes. Close it (``aclosing``)
    when stopping early, so the reader is removed.
    """
    left = None if deadline is None else (lambda: deadline - time.monotonic())
    prefix = bus.settings.subject_prefix
    reader = bus.history(task_id, deadline=left)
    async with contextlib.aclosing(reader):
        async for message in reader:
            event = _decode(message.subject, message.data, prefix)
            if event is not None:
                yield message.seq, event


async def _subscribe_live(bus: Bus, subject_list: list[str], feed: LiveFeed) -> LiveSubscription:
    """Core NATS subscriptions feeding ``feed``, confirmed by the server. Raises BusError."""
    prefix = bus.settings.subject_prefix

    async def deliver(subject: str, data: bytes) -> None:
        event = _decode(subject, data, prefix)
        if event is not None:
            feed.push(event)

    return await bus.live(subject_list, deliver)


async def _close_live(app: web.Application, feed: LiveFeed, subscription: LiveSubscription) -> None:
    """Undo what opening a live stream did: unregister, drop the feed, unsubscribe."""
    app[STREAMS].feeds.discard(feed)
    feed.discard()
    await subscription.close()


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class _SseWriter:
    """Writes SSE messages, preparing the response on the first write."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(headers=SSE_HEADERS)
        self.sent = 0
        self.last_write = time.monotonic()

    @property
    def prepared(self) -> bool:
        return self.response.prepared

    async def _write(self, data: bytes) -> None:
        if not self.response.prepared:
            await self.response.prepare(self.request)
        await self.response.write(data)
        self.last_write = time.monotonic()

    async def event(self, event: Event) -> None:
        await self._write(sse_message(event))
        self.sent += 1

    async def comment(self, text: str) -> None:
        await self._write(f": {text}\n\n".encode())

    async def pump(
        self,
        feed: LiveFeed,
        *,
        seen: RecentIds,
        include_progress: bool = True,
        stop_on_terminal: bool = False,
    ) -> str:
        """Forward live events until the feed ends, the client leaves or (optionally) a
        terminal event passes; returns why it stopped. Events already in ``seen`` are
        skipped, new ones added. Write errors propagate."""
        while True:
            if _client_gone(self.request):
                return "client went away"
            try:
                event = await feed.next(DISCONNECT_POLL)
            except _StreamEnded as ended:
                return str(ended)
            if event is None:
                if time.monotonic() - self.last_write >= HEARTBEAT:
                    await self.comment("keep-alive")
                continue
            if event.event_id in seen:
                continue
            seen.add(event.event_id)
            if include_progress or event.type != EventType.PROGRESS:
                await self.event(event)
            if stop_on_terminal and event.type in TERMINAL:
                return f"task ended ({event.type})"

    async def finish(self) -> web.StreamResponse:
        with contextlib.suppress(ConnectionError):
            await self.response.write_eof()
        return self.response


async def task_events(
    bus: Bus,
    task_id: str,
    *,
    include_progress: bool,
    deadline: float | None = None,
    limit: int | None = None,
) -> list[tuple[int, Event]]:
    """The task's facts from the audit stream (at most ``limit``) and, with
    ``include_progress``, its latest progress report placed by its time (before a
    terminal event it preceded; its ``seq`` is its sequence in the progress stream).
    Raises as ``read_history`` does."""
    events: list[tuple[int, Event]] = []
    history = read_history(bus, task_id, deadline=deadline)
    async with contextlib.aclosing(history):
        async for item in history:
            events.append(item)
            if limit is not None and len(events) >= limit:
                break
    progress = await bus.latest_progress(task_id) if include_progress else None
    if progress is None:
        return events
    merged = [item for item in events if item[1].event_id != progress[1].event_id]
    position = len(merged)
    while position and merged[position - 1][1].time > progress[1].time:
        position -= 1
    merged.insert(position, progress)
    return merged


# --- handlers --------------------------------------------------------------------------


async def task_history(request: web.Request) -> web.Response:
    """The task's events from the stream. Raises InvalidInput for a bad id or flag,
    NotFound when the stream holds no event for the task, BusError/UpstreamTimeout when
    JetStream cannot be read in ``HISTORY_TIMEOUT`` seconds."""
    task_id = parse_path(request, models.TaskPath).task_id
    include_progress = parse_query(request, models.EventsQuery).include_progress
    events = await task_events(
        request.app[BUS],
        task_id,
        include_progress=include_progress,
        deadline=time.monotonic() + HISTORY_TIMEOUT,
        limit=MAX_EVENTS + 1,  # one more tells that the history was truncated
    )
    if not any(event.type != EventType.PROGRESS for _, event in events):
        raise NotFound(f"no events for task {task_id}")
    items = [
        models.StoredEvent.model_validate({**event.to_dict(), "seq": seq})
        for seq, event in events[:MAX_EVENTS]
    ]
    history = models.EventHistory(
        task_id=task_id, total=len(items), truncated=len(events) > MAX_EVENTS, events=items
    )
    return respond(envelope.ok(history))


async def task_stream(request: web.Request) -> web.StreamResponse:
    """The task's events so far, then its live ones, until ``uploaded`` or ``failed``.

    Raises (before any byte is sent) InvalidInput for a bad id or flag, NotFound when
    the stream holds no event for the task, BusError/UpstreamTimeout when NATS fails.
    Answers 204 to a client whose ``Last-Event-ID`` already is the terminal event.
    Failures after the response started end the stream (logged).
    """
    task_id = parse_path(request, models.TaskPath).task_id
    include_progress = parse_query(request, models.EventsQuery).include_progress
    resume_after = parse_headers(request, models.StreamHeaders).last_event_id
    app = request.app
    settings = app[SETTINGS]
    feed = LiveFeed()
    prefix = settings.nats.subject_prefix
    live = [subjects.one_task(task_id, prefix)]
    if include_progress:
        live.append(subjects.progress(task_id, prefix))
    subscription = await _subscribe_live(app[BUS], live, feed)
    app[STREAMS].add(feed)
    writer = _SseWriter(request)
    reason = "ended"
    try:
        seen = RecentIds()
        held: list[Event] = []  # events up to Last-Event-ID, sent only if it is not found
        resumed = resume_after is None
        found = terminal = False

        async def send(event: Event) -> None:
            if include_progress or event.type != EventType.PROGRESS:
                await writer.event(event)

        history = await task_events(app[BUS], task_id, include_progress=include_progress)
        for _seq, event in history:
            found = True
            seen.add(event.event_id)
            terminal = terminal or event.type in TERMINAL
            if not resumed:
                held.append(event)
                if event.event_id == resume_after:
                    resumed = True
                    held.clear()
                continue
            await send(event)
        if not found:
            raise NotFound(f"no events for task {task_id}")
        for event in held:
            await send(event)
        if terminal:
            if not writer.prepared:
                reason = "client already has the terminal event"
                return web.Response(status=204, headers={"Cache-Control": "no-cache"})
            reason = "task had ended"
            return await writer.finish()
        log.info("task %s: live event stream open for %s", task_id, request.remote)
        await writer.comment("live")
        reason = await writer.pump(
            feed, seen=seen, include_progress=include_progress, stop_on_terminal=True
        )
        return await writer.finish()
    except ConnectionError:
        reason = "client went away"
        return writer.response
    except DcuError as exc:
        if not writer.prepared:
            reason = f"refused: {exc}"
            raise
        reason = f"failed: {exc}"
        log.error("task %s: event stream failed: %s", task_id, exc)
        return await writer.finish()
    except asyncio.CancelledError:
        reason = "cancelled"
        raise
    finally:
        await _close_live(app, feed, subscription)
        log.info("task %s: event stream closed after %d events: %s", task_id, writer.sent, reason)


async def all_tasks_stream(request: web.Request) -> web.StreamResponse:
    """Every task's live events (``type`` picks one kind) until the client leaves or
    the server shuts down. Raises InvalidInput for an unknown type, BusError when the
    subscription cannot be made; nothing is replayed from the stream."""
    event_type = parse_query(request, models.LiveEventsQuery).type
    app = request.app
    feed = LiveFeed()
    prefix = app[SETTINGS].nats.subject_prefix
    if event_type is None:
        live = [subjects.every_task(prefix=prefix), subjects.every_progress(prefix)]
    else:
        live = [subjects.every_task(event_type, prefix)]
    subject = ", ".join(live)
    subscription = await _subscribe_live(app[BUS], live, feed)
    app[STREAMS].add(feed)
    writer = _SseWriter(request)
    reason = "ended"
    log.info("event stream for %s open for %s", subject, request.remote)
    try:
        await writer.comment("live")
        reason = await writer.pump(feed, seen=RecentIds())
        return await writer.finish()
    except ConnectionError:
        reason = "client went away"
        return writer.response
    except asyncio.CancelledError:
        reason = "cancelled"
        raise
    finally:
        await _close_live(app, feed, subscription)
        log.info("event stream for %s closed after %d events: %s", subject, writer.sent, reason)


async def _end_streams(app: web.Application) -> None:
    app[STREAMS].close_all()


def setup(app: web.Application) -> None:
    """Register the event routes on ``app`` and end open streams on shutdown."""
    app[STREAMS] = _OpenStreams()
    app.on_shutdown.append(_end_streams)
    # /events/stream first: it would otherwise match /events/{task_id}. No HEAD: a
    # stream has no end to report, and HEAD /events/stream would fall through to
    # /events/{task_id}.
    app.router.add_get(f"{API}/events/stream", all_tasks_stream, allow_head=False)
    app.router.add_get(f"{API}/events/{{task_id}}/stream", task_stream, allow_head=False)
    app.router.add_get(f"{API}/events/{{task_id}}", task_history, allow_head=False)

"""``POST /start`` as one write: the ``requested`` event stored in JetStream.

The gateway answers once JetStream acknowledges the event and writes no row itself; the
persistence subscriber creates the row from the event. Until it has, ``GET /status`` reads
the task from the stream (``stream_task``) and the per-user limit counts the tasks this
gateway has just published (``PendingStarts``), so neither misses a task the caller has
been told about.

An ``Idempotency-Key`` header makes a start safe to retry: the task id is
``uuid5(KEY_NAMESPACE, "<username>\\n<key>")`` and the event id is derived from the task
id, so a retried start publishes the same ``Nats-Msg-Id`` (JetStream drops it within its
duplicate window; past it, the persistence log recognises the event id) and answers the
same task. A key already used by the same user for another image or platform is a 409.
A publish whose acknowledgement does not come is tried again with the same event, so an
event stored by an attempt that timed out is stored once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web

from events import messages
from events.formats import DEFAULT_FORMAT, ArchiveFormat
from events.schema import DecodeError, Event, EventType, Requested, once_per_task_id
from events.states import TaskState
from gateway import auth, envelope, language, models
from gateway.http import parse_body, parse_headers, respond
from gateway.keys import BUS, REPOSITORY, SETTINGS
from gateway.models import IDEMPOTENCY_HEADER
from kernel.errors import BusError, Conflict, InvalidInput, NotFound, TooManyRequests
from persistence.repository import TaskDetailRecord, TaskRecord, TaskRepository

log = logging.getLogger(__name__)

KEY_NAMESPACE = uuid.UUID("8febc72a-0ef1-4099-8b5d-33d51f8f1277")
PUBLISH_ATTEMPTS = 3  # each waits up to bus.publish's 10 s for the acknowledgement
PUBLISH_BACKOFF = 0.25  # seconds before the second attempt, doubled before each next one
PENDING_FOR = 300.0  # seconds a published task counts for the limit without its row


class PendingStarts:
    """Tasks this gateway published whose rows the database may not show yet, per user.

    The per-user limit adds them to the database's count; one leaves the set when
    ``repository.get`` finds its row (from then on the database counts it) or after
    ``keep_for`` seconds. Used under ``START_LOCK`` only.
    """

    def __init__(
        self, keep_for: float = PENDING_FOR, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._keep_for = keep_for
        self._clock = clock
        self._tasks: dict[str, dict[str, float]] = {}

    def add(self, username: str, task_id: str) -> None:
        self._tasks.setdefault(username, {})[task_id] = self._clock()

    async def count(self, username: str, repository: TaskRepository) -> int:
        """How many of ``username``'s published tasks have no row yet; raises DatabaseError."""
        now = self._clock()
        for user in list(self._tasks):
            tasks = self._tasks[user]
            for task_id, since in list(tasks.items()):
                if now - since > self._keep_for:
                    del tasks[task_id]
            if not tasks:
                del self._tasks[user]
        tasks = self._tasks.get(username, {})
        for task_id in list(tasks):
            if await _row(repository, task_id) is not None:
                del tasks[task_id]
        return len(tasks)


# Serialises the per-user limit's count-then-publish within this gateway.
START_LOCK = web.AppKey("start_lock", asyncio.Lock)
PENDING = web.AppKey("pending_starts", PendingStarts)


def setup(app: web.Application) -> None:
    app[START_LOCK] = asyncio.Lock()
    app[PENDING] = PendingStarts()


def task_id_for_key(username: str, key: str) -> str:
    """The task id of ``username``'s start with Idempotency-Key ``key``."""
    return str(uuid.uuid5(KEY_NAMESPACE, f"{username}\n{key}"))


def requested_event(task_id: str, payload: Requested) -> Event:
    """The ``requested`` event of a new task; its id follows from the task id."""
    return Event(
        task_id=task_id,
        payload=payload,
        event_id=once_per_task_id(task_id, EventType.REQUESTED),
    )


@dataclass(frozen=True, slots=True)
class StreamTask:
    """A task known from its ``requested`` event only (no row yet): ``models.TaskLike``."""

    task_id: str
    username: str
    docker_image_name: str
    start_time: datetime
    state: str = TaskState.IDLE.value
    gzip_file_name: str | None = None
    minio_object_name: str | None = None
    error_message: str | None = None
    end_time: datetime | None = None
    duration: int | None = None

    @classmethod
    def from_event(cls, event: Event) -> StreamTask:
        assert isinstance(event.payload, Requested)
        return cls(
            task_id=event.task_id,
            username=event.payload.username,
            docker_image_name=event.payload.docker_image_name,
            start_time=event.time,
        )


def stream_detail(event: Event) -> TaskDetailRecord | None:
    """The details the subscriber records when it creates the task from ``event``."""
    payload = event.payload
    assert isinstance(payload, Requested)
    if payload.platform is None and payload.format is None and payload.images is None:
        return None
    return TaskDetailRecord(
        task_id=event.task_id,
        platform=payload.platform,
        archive_format=None if payload.format is None else payload.format.value,
        images=None
        if payload.images is None
        else [{"docker_image_name": name} for name in payload.images],
    )


async def stored_request(app: web.Application, task_id: str) -> Event | None:
    """The task's ``requested`` event in the stream, None when the stream has none (or
    only something that is not one, which is logged). Raises BusError."""
    try:
        event = await app[BUS].last_event(task_id, EventType.REQUESTED)
    except DecodeError as exc:
        log.warning("task %s: the stream's requested message is not an event: %s", task_id, exc)
        return None
    if event is None:
        return None
    if event.task_id != task_id or not isinstance(event.payload, Requested):
        log.warning("task %s: the stream's requested message is %s", task_id, event.type)
        return None
    return event


async def _row(repository: TaskRepository, task_id: str) -> TaskRecord | None:
    try:
        return await repository.get(task_id)
    except NotFound:
        return None


def _describe(payload: Requested) -> str:
    what = payload.docker_image_name
    if payload.images is not None:
        what = f"bundle {what} of {', '.join(payload.images)}"
    # named only when it is not the seed's (so the seed's messages stay as they were)
    fmt = f" as {payload.format}" if payload.format not in (None, DEFAULT_FORMAT) else ""
    return f"{what} for {payload.platform or 'the default platform'}{fmt}"


def _same(first: Requested, again: Requested) -> bool:
    return (first.docker_image_name, first.platform, first.format, first.images) == (
        again.docker_image_name,
        again.platform,
        again.format,
        again.images,
    )


async def _existing_state(app: web.Application, event: Event, key: str) -> TaskState | None:
    """The current state of ``event``'s task when it exists already (a row, or its
    requested event in the stream), None when it does not.

    Raises Conflict when it exists for another image or platform. The stream's event is
    the request as made; past the stream's retention the row tells the image, and the
    platform only when the task's details still name the one requested.
    """
    wanted = event.payload
    assert isinstance(wanted, Requested)
    stored = await stored_request(app, event.task_id)
    row = await _row(app[REPOSITORY], event.task_id)
    if stored is None and row is None:
        return None
    if stored is not None:
        assert isinstance(stored.payload, Requested)
        same = _same(stored.payload, wanted)
        first = _describe(stored.payload)
    else:
        assert row is not None
        detail = await app[REPOSITORY].get_detail(event.task_id)
        platform = None if detail is None else detail.platform
        same = row.docker_image_name == wanted.docker_image_name and (
            wanted.platform is None or platform in (None, wanted.platform)
        )
        first = f"{row.docker_image_name} for {platform or 'the default platform'}"
    if not same:
        raise Conflict(
            f"{IDEMPOTENCY_HEADER} {key!r} was used for a different request (task "
            f"{event.task_id}: {first}, not {_describe(wanted)}); use a new key for a new task"
        )
    return TaskState.IDLE if row is None else row.state


async def publish_requested(app: web.Application, event: Event) -> bool:
    """Publish ``event`` until JetStream acknowledges it, at most PUBLISH_ATTEMPTS times
    with the same ``Nats-Msg-Id``; returns whether the stream already held it.

    Raises BusError when no attempt is acknowledged.
    """
    delay = PUBLISH_BACKOFF
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        try:
            published = await app[BUS].publish(event)
        except BusError as exc:
            if attempt == PUBLISH_ATTEMPTS:
                raise
            log.warning(
                "task %s: requested not acknowledged (attempt %d of %d), again in %.2fs: %s",
                event.task_id,
                attempt,
                PUBLISH_ATTEMPTS,
                delay,
                exc,
            )
            await asyncio.sleep(delay)
            delay *= 2
        else:
            return published.duplicate
    raise AssertionError("unreachable")


async def _start(app: web.Application, event: Event, key: str | None) -> TaskState:
    """Publish ``event`` unless its key's task exists; returns the state to answer.

    Raises Conflict, TooManyRequests, BusError, DatabaseError.
    """
    if key is not None:
        existing = await _existing_state(app, event, key)
        if existing is not None:
            log.info("task %s: start repeated with its %s", event.task_id, IDEMPOTENCY_HEADER)
            return existing
    payload = event.payload
    assert isinstance(payload, Requested)
    limit = app[SETTINGS].server.max_active_tasks_per_user
    if limit:
        pending = await app[PENDING].count(payload.username, app[REPOSITORY])
        active = pending + await app[REPOSITORY].count_active(payload.username)
        if active >= limit:
            log.warning(
                "start by %s refused: %d unfinished tasks, limit %d",
                payload.username,
                active,
                limit,
            )
            raise TooManyRequests(
                f"user {payload.username} already has {active} unfinished tasks, the limit "
                f"is {limit}; try again when one has ended"
            )
    duplicate = await publish_requested(app, event)
    if limit:
        app[PENDING].add(payload.username, event.task_id)
    log.info(
        "task %s: requested %s for %s by %s%s",
        event.task_id,
        payload.docker_image_name,
        payload.platform or "the default platform",
        payload.username,
        "" if key is None else f" with an {IDEMPOTENCY_HEADER}",
    )
    if duplicate and key is not None:
        # Another start with this key published first (or an attempt of ours that timed
        # out was stored after all): answer for what the stream holds.
        return await _existing_state(app, event, key) or TaskState.IDLE
    return TaskState.IDLE


async def start_task(request: web.Request) -> web.Response:
    """``POST /start``: validate the request and publish ``requested``; the answer comes
    once JetStream has stored it.

    With a token the task's username is the token's name (a ``username`` in the body is
    still validated, then ignored). An optional ``platform`` (``linux/arm64``) goes into the
    event normalised; absent, the download stage uses ``download.platform``. With an
    ``Idempotency-Key`` the task id follows from the username and the key, and a repeated
    start answers the task's current state without publishing again. Raises InvalidInput
    for a bad body, key, reference, platform or format, or a registry outside
    ``docker.allowed_registries``, Conflict for a key used for another request,
    TooManyRequests when the user is at ``server.max_active_tasks_per_user``, BusError
    when NATS does not take the event.
    """
    authenticated = request.get(auth.USER)
    model = models.StartRequest if authenticated is None else models.TokenStartRequest
    body = await parse_body(request, model, request.app[SETTINGS])
    return await _accept(request, body.username, body.docker_image_name, None, body.platform,
                         body.format)  # fmt: skip


async def start_bundle(request: web.Request) -> web.Response:
    """``POST /bundle``: as ``POST /start``, for one archive of several images (``images``,
    named ``name``). Raises InvalidInput also for an empty list, more images than
    ``server.max_bundle_images``, an image named twice or an invalid reference (naming its
    position)."""
    authenticated = request.get(auth.USER)
    model = models.BundleRequest if authenticated is None else models.TokenBundleRequest
    body = await parse_body(request, model, request.app[SETTINGS])
    return await _accept(request, body.username, body.name, body.images, body.platform,
                         body.format)  # fmt: skip


async def _accept(
    request: web.Request,
    username: str,
    subject: str,
    images: list[str] | None,
    platform: str | None,
    wanted: ArchiveFormat | None,
) -> web.Response:
    """Publish the ``requested`` event of a validated start or bundle and answer."""
    key = parse_headers(request, models.StartHeaders).idempotency_key
    authenticated = request.get(auth.USER)
    settings = request.app[SETTINGS]
    fmt = wanted or settings.storage.archive_format
    if settings.download.engine == "docker" and (images is not None or fmt is ArchiveFormat.OCI):
        raise InvalidInput(
            f"{'a bundle' if images is not None else f'format {fmt}'} needs "
            "download.engine registry; this service runs the docker engine"
        )
    # the token's name wins; the body's was only checked
    username = username if authenticated is None else authenticated
    task_id = str(uuid.uuid4()) if key is None else task_id_for_key(username, key)
    event = requested_event(
        task_id,
        Requested(
            username=username,
            docker_image_name=subject,
            platform=platform,
            format=fmt,
            images=images,
        ),
    )
    if settings.server.max_active_tasks_per_user:
        async with request.app[START_LOCK]:
            state = await _start(request.app, event, key)
    else:
        state = await _start(request.app, event, key)
    started = messages.text("api.started", language.of(request))
    return respond(envelope.ok(models.StartResult(task_id=task_id, state=state), started))


async def stream_task(
    app: web.Application, task_id: str
) -> tuple[StreamTask, TaskDetailRecord | None] | None:
    """The task as its ``requested`` event in the stream shows it (idle), for a status
    query that found no row; None when the stream has none. Raises BusError."""
    event = await stored_request(app, task_id)
    if event is None:
        return None
    return StreamTask.from_event(event), stream_detail(event)

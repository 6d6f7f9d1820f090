"""The task repository: events in, plain records out.

``TaskRepository.apply`` is the one way the task tables change. It is idempotent (an
event id already in the transition log changes nothing) and deterministic: every value it
writes comes from the events themselves (``updated_at`` is the time of the last event that
changed the row, never the wall clock), so replaying the stream into an empty database
rebuilds identical rows.

A state change is judged by ``events.states.decide`` and written with a guarded update
(``... WHERE task_id = ? AND state = <expected>``); zero rows changed is a conflict that is
recorded, not ignored. Refused events (illegal, already there, unknown task) are
recorded in the transition log with ``applied = False`` and the reason; ``apply`` never
raises for them. Once a task is terminal its row and details no longer change. Values are
not checked again here: the event models (``events.schema``) validated them when the
event was built or decoded, with the column limits of ``events.limits``; only NUL, which
payload text may hold and PostgreSQL text may not, is replaced.

Stream messages that cannot be recorded as task events at all (not an event, an unknown
type, a value the driver cannot encode) are kept by ``record_refused`` in their own table,
keyed by stream position, so the subscriber can terminate them without losing them.

Callers get frozen dataclasses, never Tortoise objects. Every method raises
``persistence.database.DatabaseError`` when the database fails, and ``UnstorableEvent``
(not a DatabaseError: retrying cannot help) when the event holds a value the database
driver cannot encode or the database refuses as data. A repository is bound to the one
``Database`` it is built with; the roles that use one (gateway, persistence, replay) each
open their own.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.exceptions import IntegrityError
from tortoise.functions import Count
from tortoise.transactions import in_transaction

from events.limits import ERROR_MESSAGE_MAX, ID_MAX
from events.schema import (
    Compressed,
    Downloaded,
    Event,
    EventType,
    Failed,
    Progress,
    Requested,
    Uploaded,
)
from events.states import TERMINAL_STATES, TaskState, Verdict, decide
from kernel.errors import DcuError, InvalidInput, NotFound
from persistence.database import Database, translated
from persistence.models import DcuTask, RefusedEvent, TaskDetail, TaskTransition

log = logging.getLogger(__name__)

T = TypeVar("T")

TRUNCATION_MARK = " …[truncated]"
DURATION_MAX_MS = 2**31 - 1  # INTEGER column
SQLITE_TAKE_WRITE_LOCK = 'UPDATE "dcu_tasks" SET "id" = "id" WHERE 1 = 0'
# How often a write that lost a race (unique constraint) is judged again.
WRITE_ATTEMPTS = 3
RAW_MAX = 64 * 1024  # bytes of a refused message kept in ``dcu_refused_events.raw``
EVENT_TYPE_MAX = 50


class UnstorableEvent(DcuError):
    """The event holds a value the database cannot take (text the driver cannot encode,
    data PostgreSQL refuses); unlike DatabaseError, retrying the same event cannot help."""


class ApplyOutcome(enum.StrEnum):
    """What ``apply`` did with one event."""

    APPLIED = "applied"  # the task changed (created, moved, or facts recorded)
    DUPLICATE = "duplicate"  # event id already recorded, or the task already exists
    ALREADY = "already"  # the task is already in the target state; logged, no change
    ILLEGAL = "illegal"  # the state machine refuses the move; logged, no change
    CONFLICT = "conflict"  # the guarded update matched no row; logged, no change
    UNKNOWN_TASK = "unknown_task"  # no such task; logged, no change
    PROGRESS = "progress"  # live progress stored in the task's details


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One row of ``dcu_tasks``; times are timezone-aware UTC, ``duration`` in ms."""

    id: int
    task_id: str
    username: str
    docker_image_name: str
    gzip_file_name: str | None
    minio_object_name: str | None
    state: TaskState
    error_message: str | None
    start_time: datetime
    end_time: datetime | None
    duration: int | None
    created_at: datetime
    updated_at: datetime

    @property
    def progress(self) -> int:
        return self.state.progress

    @property
    def state_display(self) -> str:
        return self.state.display


@dataclass(frozen=True, slots=True)
class TransitionRecord:
    """One judged event; ``error`` says why it was not applied."""

    id: int
    task_id: str
    from_state: TaskState | None
    to_state: TaskState | None
    event_id: str
    event_type: str
    stream_seq: int | None
    time: datetime
    applied: bool
    error: str | None


@dataclass(frozen=True, slots=True)
class RefusedEventRecord:
    """One stream message persistence refused to record; ``time`` is its stream timestamp.

    ``raw`` holds the message bytes as UTF-8 with backslash escapes (``\\xff``, ``\\x00``),
    at most RAW_MAX bytes of them; ``raw_truncated`` says the message was longer.
    """

    id: int
    stream: str
    stream_seq: int
    subject: str
    event_id: str | None
    task_id: str | None
    event_type: str | None
    reason: str
    raw: str
    raw_truncated: bool
    time: datetime


@dataclass(frozen=True, slots=True)
class TaskDetailRecord:
    """Facts about a task beyond the seed's columns; ``stage_rate`` in bytes per second.

    ``platform`` is the one requested until the download stage names the one it packaged;
    ``reused`` is None until the download stage says whether an existing archive was
    copied (digest reuse); ``fetched_bytes`` came from the registry, ``cached_bytes`` from
    the blob cache (registry engine only).
    """

    task_id: str
    image_id: str | None = None
    tar_bytes: int | None = None
    archive_bytes: int | None = None
    archive_sha256: str | None = None
    bucket: str | None = None
    stage: str | None = None
    stage_bytes_done: int | None = None
    stage_bytes_total: int | None = None
    stage_rate: float | None = None
    progress_time: datetime | None = None
    platform: str | None = None
    manifest_digest: str | None = None
    engine: str | None = None
    reused: bool | None = None
    fetched_bytes: int | None = None
    cached_bytes: int | None = None
    archive_format: str | None = None
    images: list[dict[str, Any]] | None = None  # a bundle's, as ``BundleImage.to_dict``
    shared_bytes: int | None = None


def utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive time is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def duration_ms(start: datetime, end: datetime) -> int:
    """Whole milliseconds from ``start`` to ``end``, clamped to the INTEGER column."""
    return max(0, min((utc(end) - utc(start)) // timedelta(milliseconds=1), DURATION_MAX_MS))


def truncate_message(text: str, limit: int = ERROR_MESSAGE_MAX) -> str:
    """Keep the start of ``text`` and mark the cut when it is longer than ``limit``."""
    if len(text) <= limit:
        return text
    return text[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def storable_text(text: str) -> str:
    """``text`` with what no text column can hold escaped: lone surrogates as ``\\udXXX``,
    NUL (refused by PostgreSQL) as ``\\x00``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def raw_text(raw: bytes) -> tuple[str, bool]:
    """The start of ``raw`` (RAW_MAX bytes) as storable text, and whether it was cut."""
    text = raw[:RAW_MAX].decode("utf-8", "backslashreplace")
    return storable_text(text), len(raw) > RAW_MAX


def _unstorable_cause(exc: BaseException) -> BaseException | None:
    """The encoding or data error behind a driver error, None for a database failure.

    SQLite's driver raises UnicodeEncodeError itself; asyncpg wraps it (and PostgreSQL's
    class 22 data exceptions, e.g. NUL in text) in its DataError, which Tortoise wraps in
    OperationalError.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, UnicodeEncodeError | asyncpg.exceptions.DataError):
            return seen
        seen = seen.__cause__
    return None


@contextlib.contextmanager
def _storable(what: str) -> Iterator[None]:
    """Re-raise a driver's encoding or data error as ``UnstorableEvent``."""
    try:
        yield
    except DcuError:
        raise
    except Exception as exc:
        cause = _unstorable_cause(exc)
        if cause is None:
            raise
        message = f"{what}: {type(cause).__name__}: {cause}"
        raise UnstorableEvent(storable_text(message)) from exc


def _refused_record(row: RefusedEvent) -> RefusedEventRecord:
    return RefusedEventRecord(
        id=row.id,
        stream=row.stream,
        stream_seq=row.stream_seq,
        subject=row.subject,
        event_id=row.event_id,
        task_id=row.task_id,
        event_type=row.event_type,
        reason=row.reason,
        raw=row.raw_text,
        raw_truncated=bool(row.raw_truncated),
        time=utc(row.time),
    )


def _text(value: str) -> str:
    """Payload text as a column takes it: PostgreSQL refuses NUL, which the event schema
    allows in payload text (ids never hold one)."""
    return value.replace("\x00", "\ufffd")


def _task_record(row: DcuTask) -> TaskRecord:
    return TaskRecord(
        id=row.id,
        task_id=row.task_id,
        username=row.username,
        docker_image_name=row.docker_image_name,
        gzip_file_name=row.gzip_file_name,
        minio_object_name=row.minio_object_name,
        state=TaskState(row.state),
        error_message=row.error_message,
        start_time=utc(row.start_time),
        end_time=None if row.end_time is None else utc(row.end_time),
        duration=row.duration,
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
    )


def _transition_record(row: TaskTransition) -> TransitionRecord:
    return TransitionRecord(
        id=row.id,
        task_id=row.task_id,
        from_state=None if row.from_state is None else TaskState(row.from_state),
        to_state=None if row.to_state is None else TaskState(row.to_state),
        event_id=row.event_id,
        event_type=row.event_type,
        stream_seq=row.stream_seq,
        time=utc(row.time),
        applied=bool(row.applied),
        error=row.error,
    )


def _detail_record(row: TaskDetail) -> TaskDetailRecord:
    return TaskDetailRecord(
        task_id=row.task_id,
        image_id=row.image_id,
        tar_bytes=row.tar_bytes,
        archive_bytes=row.archive_bytes,
        archive_sha256=row.archive_sha256,
        bucket=row.bucket,
        stage=row.stage,
        stage_bytes_done=row.stage_bytes_done,
        stage_bytes_total=row.stage_bytes_total,
        stage_rate=row.stage_rate,
        progress_time=None if row.progress_time is None else utc(row.progress_time),
        platform=row.platform,
        manifest_digest=row.manifest_digest,
        engine=row.engine,
        reused=None if row.reused is None else bool(row.reused),
        fetched_bytes=row.fetched_bytes,
        cached_bytes=row.cached_bytes,
        archive_format=row.archive_format,
        images=row.images,
        shared_bytes=row.shared_bytes,
    )


@dataclass(frozen=True, slots=True)
class _Effects:
    """Column values one event sets on the task row and on its details row."""

    task: dict[str, Any]
    detail: dict[str, Any]


def _image_facts(platform: str | None, manifest_digest: str | None = None) -> dict[str, Any]:
    """The platform and manifest digest an event names; one it leaves out (None) is not
    returned, so the value recorded earlier stays."""
    facts: dict[str, Any] = {}
    if platform is not None:
        facts["platform"] = _text(platform)
    if manifest_digest is not None:
        facts["manifest_digest"] = _text(manifest_digest)
    return facts


def _bundle_facts(event: Event) -> dict[str, Any]:
    """The archive format and a bundle's images an event names (left out when it names
    none, so what was recorded earlier stays)."""
    payload = event.payload
    facts: dict[str, Any] = {}
    fmt = getattr(payload, "format", None)
    if fmt is not None:
        facts["archive_format"] = fmt.value
    if isinstance(payload, Requested) and payload.images is not None:
        facts["images"] = [{"docker_image_name": _text(name)} for name in payload.images]
    elif isinstance(payload, Downloaded) and payload.images is not None:
        facts["images"] = [image.to_dict() for image in payload.images]
    elif isinstance(payload, Compressed) and payload.shared_bytes is not None:
        facts["shared_bytes"] = payload.shared_bytes
    return facts


def _effects(event: Event, start_time: datetime) -> _Effects:
    """The field effects of ``event`` (its values fit their columns: the event schema
    validated them).

    ``Requested`` is not handled here: ``TaskRepository._create_task`` creates the task.
    """
    payload = event.payload
    task: dict[str, Any] = {}
    detail: dict[str, Any] = _bundle_facts(event)
    if isinstance(payload, Downloaded):
        detail["image_id"] = _text(payload.image_id)
        detail["tar_bytes"] = payload.bytes
        detail["engine"] = _text(payload.engine)
        detail.update(_image_facts(payload.platform, payload.manifest_digest))
        if payload.fetched_bytes is not None:
            detail["fetched_bytes"] = payload.fetched_bytes
        if payload.cached_bytes is not None:
            detail["cached_bytes"] = payload.cached_bytes
        detail["reused"] = payload.reused_object is not None
    elif isinstance(payload, Compressed):
        task["gzip_file_name"] = _text(payload.gzip_file_name)
        detail["image_id"] = _text(payload.image_id)
        detail["archive_bytes"] = payload.bytes_out
        detail["archive_sha256"] = _text(payload.sha256)
    elif isinstance(payload, Uploaded):
        task["minio_object_name"] = _text(payload.minio_object_name)
        detail["bucket"] = _text(payload.bucket)
        detail.update(_image_facts(payload.platform, payload.manifest_digest))
        if payload.reused_from is not None:
            detail["reused"] = True
    elif isinstance(payload, Failed):
        task["error_message"] = truncate_message(_text(payload.reason))
    target = event.type.target_state
    if target is not None and target in TERMINAL_STATES:
        end_time = utc(event.time)
        task["end_time"] = end_time
        task["duration"] = duration_ms(start_time, end_time)
    return _Effects(task, detail)


class TaskRepository:
    """Reads and writes the task tables of one open database."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def _run(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        with self.database.activate(), translated(what), _storable(what):
            return await operation()

    async def _write(self, what: str, operation: Callable[[BaseDBAsyncClient], Awaitable[T]]) -> T:
        """Run ``operation`` in a transaction, again when it lost a unique-key race."""

        database = self.database

        async def attempt() -> T:
            for remaining in range(WRITE_ATTEMPTS - 1, -1, -1):
                try:
                    async with in_transaction(database.connection_name) as connection:
                        if database.dialect == "sqlite":
                            # Tortoise's BEGIN is deferred: a transaction that reads first
                            # cannot upgrade to a writer once another process has written
                            # ("database is locked" at once, no busy wait). A no-op write
                            # takes the write lock up front, waiting like any writer.
                            await connection.execute_query(SQLITE_TAKE_WRITE_LOCK)
                        return await operation(connection)
                except IntegrityError:
                    if not remaining:
                        raise
                    log.debug("%s: lost a race to a concurrent writer, judging again", what)
            raise AssertionError("unreachable")

        return await self._run(what, attempt)

    # -- writes -----------------------------------------------------------------------

    async def apply(self, event: Event, stream_seq: int | None = None) -> ApplyOutcome:
        """Record ``event`` (delivered at ``stream_seq``) and apply it to its task.

        Never raises for an event the state machine refuses: it is recorded in the
        transition log and the outcome says why. Raises DatabaseError when the database
        fails (retrying the same event is then safe) and UnstorableEvent when the driver
        cannot encode one of its values (nothing written; retrying cannot help: record it
        with ``record_refused``).
        """
        if event.type is EventType.PROGRESS:
            return await self._apply_progress(event)
        return await self._write(
            f"cannot apply {event.type} event {event.event_id} to task {event.task_id}",
            lambda connection: self._apply(connection, event, stream_seq),
        )

    async def create_if_absent(self, event: Event) -> TaskRecord:
        """Create the task of a ``REQUESTED`` event unless it exists; return its row.

        Applying the same event later is a duplicate no-op (the gateway no longer calls
        this: start is one write, the stream's ``requested`` event; see gateway.start).
        Raises ValueError when the event is not a REQUESTED event and DatabaseError when
        the database fails.
        """
        if not isinstance(event.payload, Requested):
            raise ValueError(f"create_if_absent needs a requested event, not {event.type}")

        async def create(connection: BaseDBAsyncClient) -> TaskRecord:
            row = await DcuTask.filter(task_id=event.task_id).using_db(connection).first()
            if row is None:
                row = await self._create_task(connection, event, None)
            return _task_record(row)

        return await self._write(f"cannot create task {event.task_id}", create)

    async def _apply(
        self, connection: BaseDBAsyncClient, event: Event, stream_seq: int | None
    ) -> ApplyOutcome:
        seen = await TaskTransition.filter(event_id=event.event_id).using_db(connection).first()
        if seen is not None:
            if seen.stream_seq is None and stream_seq is not None:
                # Recorded before the stream delivered it (create_if_absent): note where.
                await (
                    TaskTransition.filter(id=seen.id, stream_seq=None)
                    .using_db(connection)
                    .update(stream_seq=stream_seq)
                )
            log.debug("task %s: event %s already recorded", event.task_id, event.event_id)
            return ApplyOutcome.DUPLICATE

        row = await DcuTask.filter(task_id=event.task_id).using_db(connection).first()
        target = event.type.target_state
        if event.type is EventType.REQUESTED:
            if row is not None:
                idle, exists = TaskState.IDLE, "task already exists"
                await self._log(connection, event, stream_seq, row.state, idle, exists)
                log.info("task %s: already exists, %s ignored", event.task_id, event.event_id)
                return ApplyOutcome.DUPLICATE
            await self._create_task(connection, event, stream_seq)
            return ApplyOutcome.APPLIED
        if row is None:
            await self._log(connection, event, stream_seq, None, target, "unknown task")
            log.warning(
                "task %s: %s event %s for an unknown task recorded, not applied",
                event.task_id,
                event.type,
                event.event_id,
            )
            return ApplyOutcome.UNKNOWN_TASK
        current = TaskState(row.state)
        effects = _effects(event, row.start_time)

        if target is None:
            return await self._record_facts(connection, event, stream_seq, current, effects)
        return await self._move(connection, event, stream_seq, current, target, effects)

    async def _create_task(
        self, connection: BaseDBAsyncClient, event: Event, stream_seq: int | None
    ) -> DcuTask:
        payload = event.payload
        assert isinstance(payload, Requested)
        username = _text(payload.username)
        image = _text(payload.docker_image_name)
        facts = {**_image_facts(payload.platform), **_bundle_facts(event)}
        moment = utc(event.time)
        row = await DcuTask.create(
            using_db=connection,
            task_id=event.task_id,
            username=username,
            docker_image_name=image,
            state=TaskState.IDLE.value,
            start_time=moment,
            created_at=moment,
            updated_at=moment,
        )
        await self._update_details(connection, event.task_id, facts)
        await self._log(connection, event, stream_seq, None, TaskState.IDLE, None)
        log.info("task %s: created (%s for %s)", event.task_id, image, username)
        return row

    async def _record_facts(
        self,
        connection: BaseDBAsyncClient,
        event: Event,
        stream_seq: int | None,
        current: TaskState,
        effects: _Effects,
    ) -> ApplyOutcome:
        """Apply an event that names no state (``downloaded``, ``compressed``)."""
        if current.terminal:
            await self._log(connection, event, stream_seq, current, current, f"already {current}")
            log.info("task %s: %s after %s ignored", event.task_id, event.type, current)
            return ApplyOutcome.ALREADY
        if effects.task:
            changed = await (
                DcuTask.filter(task_id=event.task_id, state=current.value)
                .using_db(connection)
                .update(**effects.task, updated_at=utc(event.time))
            )
            if not changed:
                reason = f"conflict: task left {current} before {event.type} was written"
                await self._log(connection, event, stream_seq, current, current, reason)
                log.warning("task %s: %s", event.task_id, reason)
                return ApplyOutcome.CONFLICT
        await self._update_details(connection, event.task_id, effects.detail)
        await self._log(connection, event, stream_seq, current, current, None, applied=True)
        log.info("task %s: %s recorded (state %s)", event.task_id, event.type, current)
        return ApplyOutcome.APPLIED

    async def _move(
        self,
        connection: BaseDBAsyncClient,
        event: Event,
        stream_seq: int | None,
        current: TaskState,
        target: TaskState,
        effects: _Effects,
    ) -> ApplyOutcome:
        decision = decide(current, target)
        if decision.verdict is Verdict.ALREADY:
            await self._log(connection, event, stream_seq, current, target, f"already {target}")
            log.info("task %s: already %s, %s ignored", event.task_id, target, event.event_id)
            return ApplyOutcome.ALREADY
        if decision.verdict is Verdict.ILLEGAL:
            await self._log(connection, event, stream_seq, current, target, decision.reason)
            log.warning("task %s: %s refused (%s)", event.task_id, event.type, decision.reason)
            return ApplyOutcome.ILLEGAL
        changed = await (
            DcuTask.filter(task_id=event.task_id, state=current.value)
            .using_db(connection)
            .update(state=target.value, updated_at=utc(event.time), **effects.task)
        )
        if not changed:
            reason = f"conflict: task left {current} before {current} -> {target} was written"
            await self._log(connection, event, stream_seq, current, target, reason)
            log.warning("task %s: %s", event.task_id, reason)
            return ApplyOutcome.CONFLICT
        await self._update_details(connection, event.task_id, effects.detail)
        await self._log(connection, event, stream_seq, current, target, None, applied=True)
        log.info("task %s: %s -> %s (%s)", event.task_id, current, target, event.type)
        return ApplyOutcome.APPLIED

    async def _update_details(
        self, connection: BaseDBAsyncClient, task_id: str, values: dict[str, Any]
    ) -> None:
        if not values:
            return
        updated = await TaskDetail.filter(task_id=task_id).using_db(connection).update(**values)
        if not updated:
            await TaskDetail.create(using_db=connection, task_id=task_id, **values)

    async def _log(
        self,
        connection: BaseDBAsyncClient,
        event: Event,
        stream_seq: int | None,
        from_state: str | None,
        to_state: TaskState | None,
        error: str | None,
        *,
        applied: bool | None = None,
    ) -> None:
        await TaskTransition.create(
            using_db=connection,
            task_id=event.task_id,
            from_state=None if from_state is None else str(from_state),
            to_state=None if to_state is None else to_state.value,
            event_id=event.event_id,
            event_type=event.type.value,
            stream_seq=stream_seq,
            time=utc(event.time),
            applied=error is None if applied is None else applied,
            error=error,
        )

    async def _apply_progress(self, event: Event) -> ApplyOutcome:
        """Store live progress with one upsert; an older report never replaces a newer."""
        payload = event.payload
        assert isinstance(payload, Progress)
        values = [
            event.task_id,
            _text(payload.stage),
            payload.bytes_done,
            payload.bytes_total,
            payload.rate,
            utc(event.time),
        ]

        async def upsert() -> None:
            database = self.database
            marks = ["?"] * 6 if database.dialect == "sqlite" else [f"${i}" for i in range(1, 7)]
            sql = (
                'INSERT INTO "dcu_task_details" ("task_id", "stage", "stage_bytes_done", '
                '"stage_bytes_total", "stage_rate", "progress_time") '
                f"VALUES ({', '.join(marks)}) "
                'ON CONFLICT ("task_id") DO UPDATE SET "stage" = excluded."stage", '
                '"stage_bytes_done" = excluded."stage_bytes_done", '
                '"stage_bytes_total" = excluded."stage_bytes_total", '
                '"stage_rate" = excluded."stage_rate", '
                '"progress_time" = excluded."progress_time" '
                'WHERE "dcu_task_details"."progress_time" IS NULL '
                'OR "dcu_task_details"."progress_time" <= excluded."progress_time"'
            )
            await database.client.execute_query(sql, values)

        await self._run(f"cannot record progress of task {event.task_id}", upsert)
        return ApplyOutcome.PROGRESS

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
    ) -> bool:
        """Keep the message at ``stream_seq`` of ``stream`` as refused, with ``reason``.

        ``time`` is the message's stream timestamp; ``raw`` is cut at RAW_MAX bytes and
        every text is made storable (escaped, cut to its column), so this never fails on
        the message's content. Idempotent by stream position: returns False when the
        message was already recorded (a redelivery, a replay). Raises DatabaseError.
        """
        text, truncated = raw_text(raw)

        def fitted(value: str | None, limit: int) -> str | None:
            return None if value is None else storable_text(value)[:limit]

        values: dict[str, Any] = {
            "subject": storable_text(subject),
            "event_id": fitted(event_id, ID_MAX),
            "task_id": fitted(task_id, ID_MAX),
            "event_type": fitted(event_type, EVENT_TYPE_MAX),
            "reason": truncate_message(storable_text(reason)),
            "raw_text": text,
            "raw_truncated": truncated,
            "time": utc(time),
        }

        async def insert(connection: BaseDBAsyncClient) -> bool:
            position = RefusedEvent.filter(stream=stream, stream_seq=stream_seq)
            if await position.using_db(connection).exists():
                return False
            await RefusedEvent.create(
                using_db=connection, stream=stream, stream_seq=stream_seq, **values
            )
            return True

        recorded = await self._write(
            f"cannot record refused message {stream_seq} of stream {stream}", insert
        )
        if recorded:
            log.warning(
                "task %s: message %s (%s) of stream %s recorded as refused: %s",
                values["task_id"],
                stream_seq,
                values["event_type"],
                stream,
                values["reason"],
            )
        return recorded

    # -- reads ------------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord:
        """The task ``task_id``; raises NotFound when there is none, DatabaseError."""

        async def read() -> DcuTask | None:
            return await DcuTask.filter(task_id=task_id).first()

        row = await self._run(f"cannot read task {task_id}", read)
        if row is None:
            raise NotFound(f"task {task_id} not found")
        return _task_record(row)

    async def get_detail(self, task_id: str) -> TaskDetailRecord | None:
        """The details of ``task_id``, None when nothing beyond the task row is known."""

        async def read() -> TaskDetail | None:
            return await TaskDetail.filter(task_id=task_id).first()

        row = await self._run(f"cannot read details of task {task_id}", read)
        return None if row is None else _detail_record(row)

    async def transitions(self, task_id: str) -> list[TransitionRecord]:
        """Every event recorded for ``task_id`` by stream sequence, then id (empty for an
        unknown task). Events not yet delivered by the stream (``stream_seq`` None) come last.
        """

        async def read() -> list[TaskTransition]:
            return await TaskTransition.filter(task_id=task_id)

        rows = await self._run(f"cannot read transitions of task {task_id}", read)
        rows.sort(key=lambda row: (row.stream_seq is None, row.stream_seq or 0, row.id))
        return [_transition_record(row) for row in rows]

    async def query(
        self,
        *,
        docker_image_name: str | None = None,
        username: str | None = None,
        state: TaskState | None = None,
        page: int = 1,
        page_size: int = 20,
    ) -> tuple[int, list[TaskRecord]]:
        """One page of tasks, newest first, and how many match in total.

        ``docker_image_name`` matches a case-insensitive substring (``%`` and ``_`` are
        literal); ``username`` and ``state`` match exactly; empty filters are ignored.
        Raises InvalidInput when ``page`` or ``page_size`` is below 1.
        """
        if page < 1 or page_size < 1:
            raise InvalidInput("page and page_size must be at least 1")

        async def read() -> tuple[int, list[DcuTask]]:
            rows = DcuTask.all()
            if docker_image_name:
                rows = rows.filter(docker_image_name__icontains=docker_image_name)
            if username:
                rows = rows.filter(username=username)
            if state is not None:
                rows = rows.filter(state=TaskState(state).value)
            total = await rows.count()
            page_rows = await (
                rows.order_by("-start_time", "-id").offset((page - 1) * page_size).limit(page_size)
            )
            return total, page_rows

        total, rows = await self._run("cannot query tasks", read)
        return total, [_task_record(row) for row in rows]

    async def active_tasks(self, older_than: datetime) -> list[TaskRecord]:
        """Non-terminal tasks last changed before ``older_than``, oldest change first."""

        async def read() -> list[DcuTask]:
            return await DcuTask.filter(
                updated_at__lt=utc(older_than),
                state__not_in=[state.value for state in TERMINAL_STATES],
            ).order_by("updated_at", "id")

        rows = await self._run("cannot list active tasks", read)
        return [_task_record(row) for row in rows]

    async def count_active(self, username: str) -> int:
        """How many of ``username``'s tasks are not terminal (idle or running)."""

        async def read() -> int:
            return await DcuTask.filter(
                username=username,
                state__not_in=[state.value for state in TERMINAL_STATES],
            ).count()

        return await self._run(f"cannot count active tasks of {username}", read)

    async def count_by_state(self) -> dict[TaskState, int]:
        """How many tasks are in each state (every state, zero when none is)."""

        async def read() -> list[dict[str, Any]]:
            query = DcuTask.all().annotate(count=Count("id")).group_by("state")
            rows: list[dict[str, Any]] = await query.values("state", "count")
            return rows

        counts = dict.fromkeys(TaskState, 0)
        known = {state.value for state in TaskState}
        for row in await self._run("cannot count tasks by state", read):
            if row["state"] in known:
                counts[TaskState(row["state"])] = int(row["count"])
        return counts

    async def refused_events(self, limit: int = 100) -> list[RefusedEventRecord]:
        """The ``limit`` most recent refused messages, newest (by stream time) first.

        Raises InvalidInput when ``limit`` is below 1.
        """
        if limit < 1:
            raise InvalidInput("limit must be at least 1")

        async def read() -> list[RefusedEvent]:
            return await RefusedEvent.all().order_by("-time", "-stream_seq").limit(limit)

        rows = await self._run("cannot read refused events", read)
        return [_refused_record(row) for row in rows]

    async def ping(self) -> None:
        """Check the database answers (health checks); raises DatabaseError when not."""

        async def select_one() -> None:
            await self.database.client.execute_query("SELECT 1")

        await self._run("database does not answer", select_one)

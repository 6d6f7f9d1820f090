"""Cleanup runs: what they are, the events they publish, and the rules they apply.

Two kinds of cleanup exist: ``gzip`` (local archives and abandoned work directories)
and ``objects`` (uploaded archives in the object store). A run is asked for with a
``requested`` event (by the cleanup timer on a cron tick, or by an operator through the
gateway) and reports with a ``completed`` event naming the request::

    {"event_id": "<uuid>", "kind": "gzip", "type": "requested", "schema_version": 1,
     "time": "2026-11-27T00:00:00.012345Z",
     "payload": {"reason": "schedule", "scheduled_for": "2026-11-27T00:00:00.000000Z",
                 "requested_by": "host:1234:timer"}}

    {"event_id": "<uuid>", "kind": "gzip", "type": "completed", "schema_version": 1,
     "time": "...", "payload": {"request_id": "<uuid>", "deleted": 3,
                                "bytes_freed": 201326592, "kept": 5, "errors": [],
                                "seconds": 0.004}}

Subjects are ``<prefix>.cleanup.<kind>.<type>``. ``CleanupEvent`` is the generic envelope
of ``events.schema`` (``Envelope``) with ``kind`` as its key, so everything said there
holds here too: payloads are pydantic models validated when built or decoded (limits from
``events.limits``), decoding ignores unknown fields, encoding drops ``None`` values, and
a decode failure raises ``DecodeError`` keeping the raw bytes.

Cron expressions are evaluated in UTC, so every timer replica computes the same tick
wherever it runs. Plain Python: croniter is a pure-Python library, no framework.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, ClassVar, Protocol, TypeVar

from croniter import CroniterError, croniter
from pydantic import Field, Strict, StringConstraints

from events.formats import ARCHIVE_SUFFIXES
from events.limits import CLEANUP_ERROR_MAX, CLEANUP_ERRORS_MAX
from events.naming import is_sha256_hex
from events.schema import (
    NO_SURROGATES,
    Count,
    Envelope,
    EventId,
    EventPayload,
    Figure,
    PayloadModels,
    Text,
    Timestamp,
    format_time,
    tagged_by_type,
    utcnow,
)

CLEANUP_QUEUE = "cleanup"  # the cleanup worker's queue and role name


class CleanupKind(enum.StrEnum):
    GZIP = "gzip"  # local archives (storage.gzip_path) and work dirs (storage.work_path)
    OBJECTS = "objects"  # uploaded archives under minio.prefix


class CleanupEventType(enum.StrEnum):
    REQUESTED = "requested"
    COMPLETED = "completed"


class Reason(enum.StrEnum):
    SCHEDULE = "schedule"  # the cleanup timer, on a cron tick
    ADMIN = "admin"  # an operator, through POST /api/dcu/cleanup


# The settings key holding each kind's schedule and retention, for messages.
CRON_KEYS: dict[CleanupKind, str] = {
    CleanupKind.GZIP: "storage.cleanup_gzip_cron",
    CleanupKind.OBJECTS: "storage.cleanup_minio_cron",
}
RETENTION_KEYS: dict[CleanupKind, str] = {
    CleanupKind.GZIP: "storage.gzip_retention_days",
    CleanupKind.OBJECTS: "storage.minio_retention_days",
}

# A completed event carries at most this many error strings (plus one "… more" line).
MAX_ERRORS = CLEANUP_ERRORS_MAX
_ERROR_CHARS = CLEANUP_ERROR_MAX


def parse_kind(value: object) -> CleanupKind:
    """The kind named by ``value``; raises ValueError listing the kinds otherwise."""
    if isinstance(value, str) and value in {k.value for k in CleanupKind}:
        return CleanupKind(value)
    kinds = ", ".join(k.value for k in CleanupKind)
    raise ValueError(f"unknown cleanup kind {value!r}; expected one of: {kinds}")


# -- events ---------------------------------------------------------------------------

CleanupError = Annotated[
    str, Strict(), StringConstraints(max_length=CLEANUP_ERROR_MAX), NO_SURROGATES
]


class CleanupPayload(EventPayload):
    """Base of every cleanup event payload."""

    type: ClassVar[CleanupEventType]


class CleanupRequested(CleanupPayload):
    """A run is wanted. ``scheduled_for`` is the cron tick (None for an admin request)."""

    type: ClassVar[CleanupEventType] = CleanupEventType.REQUESTED
    reason: Reason
    requested_by: Text = ""
    """The timer (``host:pid:timer``) or the operator's name."""
    scheduled_for: Timestamp | None = None


class CleanupCompleted(CleanupPayload):
    """A run finished. ``errors`` lists what could not be removed; the run still counts."""

    type: ClassVar[CleanupEventType] = CleanupEventType.COMPLETED
    request_id: EventId
    """The ``event_id`` of the request this run answers."""
    deleted: Count
    bytes_freed: Count
    kept: Count = 0
    """What the cleaner would own but left alone (too young, or a symlink)."""
    errors: tuple[CleanupError, ...] = Field(default=(), max_length=CLEANUP_ERRORS_MAX + 1)
    seconds: Figure = 0.0


CLEANUP_PAYLOADS: dict[CleanupEventType, type[CleanupPayload]] = {
    CleanupEventType.REQUESTED: CleanupRequested,
    CleanupEventType.COMPLETED: CleanupCompleted,
}

# Ids derived from a name, so that every replica (or every re-run) produces the same one.
_CLEANUP_NAMESPACE = uuid.UUID("0b8f2d64-5c1e-4f0a-8a47-3e2b9d7c6a15")


def tick_msg_id(kind: CleanupKind, tick: datetime) -> str:
    """``cleanup-<kind>-<tick>``: the ``Nats-Msg-Id`` every timer replica gives one tick."""
    return f"cleanup-{kind}-{format_time(tick)}"


CleanupPayloadField = Annotated[CleanupPayload, tagged_by_type(CLEANUP_PAYLOADS)]


class CleanupEvent(Envelope[CleanupEventType, CleanupPayloadField]):
    """One fact about one cleanup run. ``event_id`` is also its JetStream ``Nats-Msg-Id``,
    except for scheduled requests, whose message id is :func:`tick_msg_id` (see
    :attr:`msg_id`)."""

    kind: CleanupKind

    what: ClassVar[str] = "cleanup event"
    payloads: ClassVar[PayloadModels] = CLEANUP_PAYLOADS
    wire_order: ClassVar[tuple[str, ...]] = (
        "event_id",
        "kind",
        "type",
        "schema_version",
        "time",
        "payload",
    )

    if TYPE_CHECKING:  # the signature type checkers see; pydantic's takes keywords

        def __init__(
            self,
            *,
            kind: CleanupKind,
            payload: CleanupPayload,
            event_id: str = ...,
            time: datetime = ...,
            schema_version: int = ...,
            type: CleanupEventType = ...,
        ) -> None: ...

    @property
    def msg_id(self) -> str:
        """The ``Nats-Msg-Id`` to publish with: one per cron tick for scheduled requests
        (so replicas de-duplicate), the event id otherwise."""
        payload = self.payload
        if (
            isinstance(payload, CleanupRequested)
            and payload.reason is Reason.SCHEDULE
            and payload.scheduled_for is not None
        ):
            return tick_msg_id(self.kind, payload.scheduled_for)
        return self.event_id


def scheduled_request(
    kind: CleanupKind, tick: datetime, requested_by: str, now: datetime | None = None
) -> CleanupEvent:
    """The request a timer publishes for ``tick`` at ``now``. Its event id and message id
    are derived from the kind and tick, so every replica publishes the same ids."""
    return CleanupEvent(
        kind=kind,
        payload=CleanupRequested(
            reason=Reason.SCHEDULE, requested_by=requested_by, scheduled_for=tick
        ),
        event_id=str(uuid.uuid5(_CLEANUP_NAMESPACE, tick_msg_id(kind, tick))),
        time=now if now is not None else utcnow(),
    )


def admin_request(kind: CleanupKind, requested_by: str) -> CleanupEvent:
    return CleanupEvent(
        kind=kind, payload=CleanupRequested(reason=Reason.ADMIN, requested_by=requested_by)
    )


def completion_id(request_id: str) -> str:
    """The completed event's id for a request: a re-run of the same request (a redelivery
    after its worker died) publishes the same id, which JetStream de-duplicates."""
    return str(uuid.uuid5(_CLEANUP_NAMESPACE, f"completed:{request_id}"))


# -- results --------------------------------------------------------------------------


@dataclass(slots=True)
class CleanupResult:
    """What one cleaner did. ``kept`` counts what the cleaner would own but left alone
    (too young, or a symlink); files it does not own are not counted at all."""

    kind: CleanupKind
    deleted: int = 0
    bytes_freed: int = 0
    kept: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def removed(self, size: int) -> None:
        self.deleted += 1
        self.bytes_freed += size

    def error(self, text: str) -> None:
        if len(text) > _ERROR_CHARS:
            text = text[: _ERROR_CHARS - 1] + "…"
        self.errors.append(text)

    def completed(self, request_id: str) -> CleanupEvent:
        """The ``completed`` event reporting this result for ``request_id``."""
        errors = self.errors[:MAX_ERRORS]
        if len(self.errors) > MAX_ERRORS:
            errors.append(f"… and {len(self.errors) - MAX_ERRORS} more")
        return CleanupEvent(
            kind=self.kind,
            payload=CleanupCompleted(
                request_id=request_id,
                deleted=self.deleted,
                bytes_freed=self.bytes_freed,
                kept=self.kept,
                errors=tuple(errors),
                seconds=round(self.seconds, 3),
            ),
            event_id=completion_id(request_id),
        )


# -- rules ----------------------------------------------------------------------------


class Dated(Protocol):
    @property
    def last_modified(self) -> datetime: ...


D = TypeVar("D", bound=Dated)


def cutoff(now: datetime, retention_days: float) -> datetime:
    """The moment before which things count as expired. Raises ValueError for a naive
    ``now`` or a negative retention."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if retention_days < 0:
        raise ValueError(f"retention must not be negative, got {retention_days} days")
    return now - timedelta(days=retention_days)


def select_expired(entries: Iterable[D], now: datetime, retention_days: float) -> list[D]:
    """The entries last modified strictly before ``now - retention_days``, in input order.

    With a retention of 0 everything modified before ``now`` is expired. Raises
    ValueError for a naive ``now``, a naive ``last_modified`` or a negative retention.
    """
    limit = cutoff(now, retention_days)
    expired: list[D] = []
    for entry in entries:
        if entry.last_modified.tzinfo is None:
            raise ValueError(f"{entry!r} has a naive last_modified")
        if entry.last_modified < limit:
            expired.append(entry)
    return expired


def is_task_id(name: str) -> bool:
    """True for a canonical task id (``str(uuid.uuid4())``): the only directory names DCU
    creates under ``gzip_path`` and ``work_path``, and the only ones cleanup touches."""
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


def object_prefix(prefix: str) -> str:
    """The key prefix DCU's objects live under, normalised as ``naming.object_name``
    builds keys (``dcu/`` and ``dcu`` both give ``dcu/``; empty gives the bucket root)."""
    clean = "/".join(p for p in prefix.split("/") if p and p not in {".", ".."})
    return f"{clean}/" if clean else ""


def is_dcu_object(name: str, prefix: str) -> bool:
    """True for the keys DCU uploads: ``<prefix><task_id>/<file><suffix>`` archives (any
    format's suffix: ``.tar.gz``, ``.tar``, ``.oci.tar``) and
    the ``<prefix>reuse/<64 hex>.json`` pointers to them (rewritten by every upload of
    their image, so one older than the retention points at an expired archive)."""
    base = object_prefix(prefix)
    if not name.startswith(base):
        return False
    parts = name[len(base) :].split("/")
    if len(parts) == 2 and parts[0] == "reuse":
        return parts[1].endswith(".json") and is_sha256_hex(parts[1].removesuffix(".json"))
    return (
        len(parts) == 2
        and is_task_id(parts[0])
        and parts[1].endswith(ARCHIVE_SUFFIXES)
        and not parts[1].startswith(".")
    )


# -- schedule -------------------------------------------------------------------------


def check_cron(cron_expr: str, key: str = "cron") -> str:
    """Return ``cron_expr`` when it is a five-field crontab expression (or an ``@daily``
    style alias) that fires at least once; raises ValueError naming ``key`` otherwise."""
    text = cron_expr.strip() if isinstance(cron_expr, str) else ""
    fields = text.split()
    if not text or not (len(fields) == 5 or (len(fields) == 1 and text.startswith("@"))):
        raise ValueError(
            f"{key}: invalid cron expression {cron_expr!r}: expected five fields "
            "(minute hour day-of-month month day-of-week), e.g. '0 0 * * *'"
        )
    next_tick(text, datetime(2000, 1, 1, tzinfo=UTC), key=key)
    return text


def next_tick(cron_expr: str, after: datetime, *, key: str = "cron") -> datetime:
    """The first tick of ``cron_expr`` strictly after ``after``, in UTC.

    ``after`` must be timezone-aware; the expression is evaluated in UTC. Raises
    ValueError naming ``key`` for an invalid expression or one that never fires
    (``0 0 31 2 *``).
    """
    if after.tzinfo is None:
        raise ValueError("after must be timezone-aware")
    start = after.astimezone(UTC)
    try:
        tick = croniter(cron_expr, start).get_next(datetime)
    except (CroniterError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{key}: invalid cron expression {cron_expr!r}: {exc}") from None
    if not isinstance(tick, datetime):
        raise ValueError(f"{key}: cron expression {cron_expr!r} gave no time")
    return tick.astimezone(UTC)

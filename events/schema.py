"""Versioned JSON events: the facts every DCU component publishes and consumes.

Wire format (any NATS client in any language can read it, no dramatiq needed)::

    {"event_id": "<uuid>", "task_id": "<uuid>", "type": "downloaded",
     "schema_version": 1, "time": "2026-11-27T19:40:21.123456Z",
     "payload": {"image_id": "sha256:...", "bytes": 1234, ...}}

Decoding ignores unknown fields (newer producers may add some) and encoding drops ``None``
values. ``DecodeError`` keeps the raw bytes so a poison message can be logged and parked;
its subclass ``UnknownEventType`` marks a well-formed event of a type this version does not
know (a newer producer during a rolling upgrade), which a newer consumer may still read.
Text that is not Unicode (a lone surrogate, legal in JSON's ``\\uXXXX`` form) is not a
valid event, nor are ids holding a NUL: no database, subject or header can carry them.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from events.states import TaskState

SCHEMA_VERSION = 1


class DecodeError(ValueError):
    """Bytes that are not a valid event; ``raw`` holds them for logging and parking."""

    def __init__(self, message: str, raw: bytes) -> None:
        super().__init__(message)
        self.raw = raw


class UnknownEventType(DecodeError):
    """A well-formed event whose ``type`` (kept in ``event_type``) this version does not know."""

    def __init__(self, event_type: str, raw: bytes) -> None:
        super().__init__(f"unknown event type {event_type!r}", raw)
        self.event_type = event_type


class EventType(enum.StrEnum):
    REQUESTED = "requested"  # StartTask: the gateway accepted a task
    DOWNLOAD_STARTED = "download_started"
    DOWNLOADED = "downloaded"
    COMPRESS_STARTED = "compress_started"
    COMPRESSED = "compressed"
    UPLOAD_STARTED = "upload_started"
    UPLOADED = "uploaded"
    FAILED = "failed"
    PROGRESS = "progress"

    @property
    def target_state(self) -> TaskState | None:
        """The state this event moves its task into, None for facts that do not move it."""
        return _TARGETS.get(self)


_TARGETS: dict[EventType, TaskState] = {
    EventType.REQUESTED: TaskState.IDLE,
    EventType.DOWNLOAD_STARTED: TaskState.DOWNLOADING,
    EventType.COMPRESS_STARTED: TaskState.COMPRESSING,
    EventType.UPLOAD_STARTED: TaskState.UPLOADING,
    EventType.UPLOADED: TaskState.COMPLETED,
    EventType.FAILED: TaskState.FAILED,
}


class Stage(enum.StrEnum):
    DOWNLOAD = "download"
    COMPRESS = "compress"
    UPLOAD = "upload"


@dataclass(frozen=True, slots=True)
class Payload:
    """Base of every payload; subclasses name their event type."""

    type: ClassVar[EventType]

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Payload:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True, slots=True)
class Requested(Payload):
    type: ClassVar[EventType] = EventType.REQUESTED
    username: str
    docker_image_name: str
    # ``os/arch[/variant]`` as the caller asked (normalised); None: ``download.platform``.
    platform: str | None = None


@dataclass(frozen=True, slots=True)
class StageStarted(Payload):
    """Shared shape of the three ``*_started`` events; ``worker`` names the process."""

    type: ClassVar[EventType] = EventType.DOWNLOAD_STARTED
    worker: str = ""
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class DownloadStarted(StageStarted):
    type: ClassVar[EventType] = EventType.DOWNLOAD_STARTED


@dataclass(frozen=True, slots=True)
class CompressStarted(StageStarted):
    type: ClassVar[EventType] = EventType.COMPRESS_STARTED


@dataclass(frozen=True, slots=True)
class UploadStarted(StageStarted):
    type: ClassVar[EventType] = EventType.UPLOAD_STARTED


@dataclass(frozen=True, slots=True)
class Downloaded(Payload):
    """``layout`` says what ``tar_path`` is: ``tar`` an image tar (docker engine),
    ``blobs`` the verified-blob plan of the registry engine (``actors.blob_plan``)."""

    type: ClassVar[EventType] = EventType.DOWNLOADED
    docker_image_name: str
    image_id: str
    tar_path: str
    bytes: int
    seconds: float = 0.0
    engine: str = "docker"
    layout: str = "tar"
    manifest_digest: str | None = None
    platform: str | None = None
    fetched_bytes: int | None = None  # blob bytes transferred from the registry
    cached_bytes: int | None = None  # blob bytes served by the blob cache
    # An object already holding this exact archive (digest reuse): the later stages copy
    # it instead of compressing and uploading again.
    reused_object: str | None = None


@dataclass(frozen=True, slots=True)
class Compressed(Payload):
    """``method``: ``gzip`` (the whole tar compressed), ``splice`` (layer blobs copied
    verbatim, only headers compressed), ``reuse`` (nothing written: see Downloaded)."""

    type: ClassVar[EventType] = EventType.COMPRESSED
    docker_image_name: str
    image_id: str
    gzip_file_name: str
    bytes_in: int
    bytes_out: int
    sha256: str
    seconds: float = 0.0
    method: str = "gzip"
    spliced_bytes: int | None = None  # archive bytes copied verbatim from layer blobs
    reused_object: str | None = None
    manifest_digest: str | None = None
    platform: str | None = None


@dataclass(frozen=True, slots=True)
class Uploaded(Payload):
    type: ClassVar[EventType] = EventType.UPLOADED
    bucket: str
    minio_object_name: str
    bytes: int
    sha256: str
    image_id: str = ""
    seconds: float = 0.0
    manifest_digest: str | None = None
    platform: str | None = None
    reused_from: str | None = None  # the object copied server-side (digest reuse)


@dataclass(frozen=True, slots=True)
class Failed(Payload):
    type: ClassVar[EventType] = EventType.FAILED
    stage: str
    reason: str


@dataclass(frozen=True, slots=True)
class Progress(Payload):
    type: ClassVar[EventType] = EventType.PROGRESS
    stage: str
    bytes_done: int
    bytes_total: int | None = None
    rate: float = 0.0  # bytes per second


PAYLOADS: dict[EventType, type[Payload]] = {
    cls.type: cls
    for cls in (
        Requested,
        DownloadStarted,
        Downloaded,
        CompressStarted,
        Compressed,
        UploadStarted,
        Uploaded,
        Failed,
        Progress,
    )
}


_TYPE_NAMES = frozenset(kind.value for kind in EventType)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(value: str, name: str, *, ids: bool = False) -> None:
    """Raise ValueError when ``value`` cannot be stored or sent as UTF-8 text.

    A code point in the surrogate range is always alone here (json pairs escaped halves);
    NUL is refused in ids only, payload text keeps it (the repository replaces it).
    """
    if _SURROGATE.search(value):
        raise ValueError(f"{name} holds a lone surrogate, not Unicode text")
    if ids and "\x00" in value:
        raise ValueError(f"{name} holds a NUL character")


# Completion and failure events get ids derived from (task, type): a stage that runs
# twice for one task (a redelivery after its worker died) publishes the same id again,
# which JetStream's de-duplication and the persistence log both recognise.
_EVENT_NAMESPACE = uuid.UUID("5f0c4b8e-2a57-4d8e-9b1d-6a0d3c1f7e21")


def once_per_task_id(task_id: str, event_type: EventType) -> str:
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{task_id}:{event_type}"))


def encode_json(data: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, the wire form of every DCU event."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def decode_json(raw: bytes, what: str) -> Any:
    """Parse ``raw``; raises DecodeError (keeping the bytes) when it is not JSON."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"{what} is not JSON: {exc}", raw) from exc


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class Event:
    """One fact about one task. ``event_id`` is also the JetStream ``Nats-Msg-Id``."""

    task_id: str
    payload: Payload
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    time: datetime = field(default_factory=utcnow)
    schema_version: int = SCHEMA_VERSION

    @property
    def type(self) -> EventType:
        return self.payload.type

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "task_id": self.task_id,
            "type": str(self.type),
            "schema_version": self.schema_version,
            "time": format_time(self.time),
            "payload": self.payload.to_dict(),
        }

    def encode(self) -> bytes:
        return encode_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, raw: bytes = b"") -> Event:
        """Build an event from decoded JSON.

        Raises UnknownEventType when the envelope is well-formed but its type is not an
        EventType, DecodeError when it is not an event at all (a missing or malformed
        field, a lone surrogate in a kept string, a NUL in an id).
        """
        if not isinstance(data, dict):
            raise DecodeError("event is not a JSON object", raw)
        try:
            task_id = str(data["task_id"])
            event_id = str(data["event_id"])
            time = parse_time(str(data["time"]))
            schema_version = int(data.get("schema_version", SCHEMA_VERSION))
            name = data["type"]
            if not isinstance(name, str):
                raise TypeError("type is not a string")
            payload_data = data.get("payload") or {}
            if not isinstance(payload_data, dict):
                raise TypeError("payload is not an object")
            _check_text(task_id, "task_id", ids=True)
            _check_text(event_id, "event_id", ids=True)
            if name not in _TYPE_NAMES:
                _check_text(name, "type")
                raise UnknownEventType(name, raw)
            payload = PAYLOADS[EventType(name)].from_dict(payload_data)
            for key, value in dataclasses.asdict(payload).items():
                if isinstance(value, str):
                    _check_text(value, f"payload.{key}")
            return cls(
                task_id=task_id,
                payload=payload,
                event_id=event_id,
                time=time,
                schema_version=schema_version,
            )
        except DecodeError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise DecodeError(f"not a DCU event: {exc!r}", raw) from exc

    @classmethod
    def decode(cls, raw: bytes) -> Event:
        return cls.from_dict(decode_json(raw, "event"), raw)

"""Versioned JSON events: the facts every DCU component publishes and consumes.

Wire format (any NATS client in any language can read it, no dramatiq needed)::

    {"event_id": "<uuid>", "task_id": "<uuid>", "type": "downloaded",
     "schema_version": 1, "time": "2026-11-27T19:40:21.123456Z",
     "payload": {"image_id": "sha256:...", "bytes": 1234, ...}}

Every event family (the task facts here, the cleanup runs in ``events.cleanup``) is one
generic envelope, ``Envelope[<type enum>, <payload>]``: ``event_id``, ``type``,
``schema_version``, ``time`` and ``payload``, plus the family's own key (``task_id``
here, ``kind`` for cleanup runs) on the wire after ``event_id``. The envelope's ``type``
names the payload model, and payloads are typed and validated when an event is built or
decoded: lengths come from ``events.limits`` (the columns they end up in), counts are
non-negative integers (not booleans, floats or strings), figures are finite numbers, ids
hold no NUL, and no string holds a lone surrogate (legal in JSON's ``\\uXXXX`` form, but
not Unicode: no database, subject or header can carry it). Payload text may hold NUL; the
repository replaces it, as no PostgreSQL text column takes it.

Building an event with a value that breaks these rules raises ``pydantic.ValidationError``
(a ``ValueError``). Decoding one raises ``DecodeError``, which keeps the raw bytes so a
poison message can be logged and parked; its subclass ``UnknownEventType`` marks a
well-formed event of a type this version does not know (a newer producer during a rolling
upgrade), which a newer consumer may still read. Decoding ignores unknown fields (newer
producers may add some); encoding drops ``None`` values and writes compact UTF-8 JSON
(``ensure_ascii=False``) in the key order above, times in UTC with microseconds.

**Why pydantic on the wire.** Pydantic v2 (already DCU's settings library) is the one
typed-model library for every message DCU exchanges, events and HTTP alike: one
validation error vocabulary, and one JSON Schema generator feeding both the AsyncAPI
document of these events (``gateway.asyncapi``) and the OpenAPI one. Its cost does not matter at
DCU's event rate (a few facts per task, about one progress report per second per running
task): ``bench/event_codec.py`` measured, on one core of the 2-core development machine
(a ``downloaded`` and a ``progress`` in turn), about 75 000 events/s decoded (bytes to a
validated event, 13 microseconds each), 73 000 encoded and 150 000 validated from a dict
the broker already parsed. That is faster than the dataclass codec it replaces, which
validated nothing (33 000 decoded, 47 000 encoded on the same machine).
"""

from __future__ import annotations

import enum
import functools
import json
import operator
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Generic, NoReturn, Self, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    GetPydanticSchema,
    PlainSerializer,
    Strict,
    StringConstraints,
    Tag,
    ValidationError,
    create_model,
    model_validator,
)

from events.formats import ArchiveFormat
from events.limits import (
    BUCKET_MAX,
    BUNDLE_IMAGES_MAX,
    COUNT_MAX,
    ID_MAX,
    IMAGE_ID_MAX,
    IMAGE_NAME_MAX,
    MANIFEST_DIGEST_MAX,
    OBJECT_NAME_MAX,
    PLATFORM_MAX,
    SHA256_HEX_LEN,
    STAGE_MAX,
    USERNAME_MAX,
)
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


# -- JSON and time --------------------------------------------------------------------

# Completion and failure events get ids derived from (task, type): a stage that runs
# twice for one task (a redelivery after its worker died) publishes the same id again,
# which JetStream's de-duplication and the persistence log both recognise.
_EVENT_NAMESPACE = uuid.UUID("5f0c4b8e-2a57-4d8e-9b1d-6a0d3c1f7e21")


def once_per_task_id(task_id: str, event_type: EventType) -> str:
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{task_id}:{event_type}"))


def new_event_id() -> str:
    return str(uuid.uuid4())


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


# -- field types ----------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")
_NO_NUL = r"^[^\x00]*$"


def _unicode(value: object) -> object:
    """Refuse a string holding a lone surrogate (json.loads makes one of ``"\\ud800"``);
    anything else is left to the field's own checks."""
    if isinstance(value, str) and not value.isascii() and _SURROGATE.search(value):
        raise ValueError("holds a lone surrogate, not Unicode text")
    return value


def _time(value: object) -> object:
    """Parse the wire form of a time; a datetime (or anything else) is left to the type."""
    if isinstance(value, str):
        _unicode(value)
        return parse_time(value)
    return value


NO_SURROGATES = BeforeValidator(_unicode)  # put it last: it runs before the rest

Text = Annotated[str, Strict(), NO_SURROGATES]
EventId = Annotated[
    str, Strict(), StringConstraints(max_length=ID_MAX, pattern=_NO_NUL), NO_SURROGATES
]
Username = Annotated[str, Strict(), StringConstraints(max_length=USERNAME_MAX), NO_SURROGATES]
ImageName = Annotated[str, Strict(), StringConstraints(max_length=IMAGE_NAME_MAX), NO_SURROGATES]
ObjectName = Annotated[str, Strict(), StringConstraints(max_length=OBJECT_NAME_MAX), NO_SURROGATES]
ImageId = Annotated[str, Strict(), StringConstraints(max_length=IMAGE_ID_MAX), NO_SURROGATES]
Sha256 = Annotated[str, Strict(), StringConstraints(max_length=SHA256_HEX_LEN), NO_SURROGATES]
Bucket = Annotated[str, Strict(), StringConstraints(max_length=BUCKET_MAX), NO_SURROGATES]
StageName = Annotated[str, Strict(), StringConstraints(max_length=STAGE_MAX), NO_SURROGATES]
ManifestDigest = Annotated[
    str, Strict(), StringConstraints(max_length=MANIFEST_DIGEST_MAX), NO_SURROGATES
]
Platform = Annotated[str, Strict(), StringConstraints(max_length=PLATFORM_MAX), NO_SURROGATES]
Count = Annotated[int, Strict(), Field(ge=0, le=COUNT_MAX)]
Figure = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # ints are taken as floats
Timestamp = Annotated[
    AwareDatetime,
    Strict(),
    BeforeValidator(_time),
    PlainSerializer(format_time, return_type=str, when_used="json"),
]
SchemaVersion = Annotated[int, Strict(), Field(ge=1)]


# -- models ---------------------------------------------------------------------------


class WireModel(BaseModel):
    """Base of every model on the wire: immutable, unknown fields ignored on input."""

    model_config = ConfigDict(frozen=True, extra="ignore", use_attribute_docstrings=True)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what ``encode_json`` writes), ``None`` values left out."""
        return self.model_dump(mode="json", exclude_none=True)


class EventPayload(WireModel):
    """Base of every event family's payloads; each names its event type in ``type``."""

    type: ClassVar[enum.StrEnum]

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        """Validate decoded JSON; raises ``pydantic.ValidationError`` (a ValueError)."""
        return cls.model_validate(data)


def _payload_tag(value: Any) -> str | None:
    """The event type a payload belongs to: its class's for a model, the envelope's
    (copied in by ``Envelope``) for decoded JSON."""
    if isinstance(value, EventPayload):
        return str(value.type)
    if isinstance(value, dict):
        tag = value.get("type")
        return tag if isinstance(tag, str) else None
    return None


def tagged_by_type(payloads: Mapping[str, type[EventPayload]]) -> GetPydanticSchema:
    """Pydantic metadata validating (and serializing) a payload field as the model of
    ``payloads`` that the envelope's ``type`` names: a tagged union, so one bad field is
    reported once (``payload.<type>.<field>``), not once per payload model."""
    members = [Annotated[model, Tag(str(name))] for name, model in payloads.items()]
    union: Any = functools.reduce(operator.or_, members)
    tagged = Annotated[union, Discriminator(_payload_tag)]
    return GetPydanticSchema(lambda _source, handler: handler(tagged))


def describe(exc: ValidationError) -> str:
    """Every error of ``exc`` as ``location: message``, on one line (logs, refusals)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'value'}: {error['msg']}"
        for error in exc.errors(include_url=False)
    )


# Event type (a str enum) -> payload model; a family's ``Envelope.payloads``.
PayloadModels = Mapping[Any, type[EventPayload]]
KindT = TypeVar("KindT", bound=enum.StrEnum)
PayloadT = TypeVar("PayloadT", bound=EventPayload)


class Envelope(WireModel, Generic[KindT, PayloadT]):
    """The envelope every event family shares; a family subclasses
    ``Envelope[<its type enum>, <its payload field>]``, adds its key field and sets the
    class variables below. ``event_id`` is also the event's JetStream ``Nats-Msg-Id``.

    Built in Python (the payload a model), ``type`` follows from the payload and
    ``event_id`` and ``time`` default to a new id and now. Decoded (the payload a dict),
    every field but ``schema_version`` must be there, and ``type`` picks the payload
    model, which validates the payload once.
    """

    event_id: EventId
    type: KindT
    schema_version: SchemaVersion = SCHEMA_VERSION
    time: Timestamp
    payload: PayloadT

    what: ClassVar[str]  # what an event of the family is called in errors
    payloads: ClassVar[PayloadModels]  # event type -> payload model
    wire_order: ClassVar[tuple[str, ...]]  # the keys of the JSON object, in order

    @model_validator(mode="before")
    @classmethod
    def _type_and_payload(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        payload = data.get("payload")
        if isinstance(payload, dict):  # decoded JSON: the payload model is the type's
            return {**data, "payload": {**payload, "type": data.get("type")}}
        if isinstance(payload, EventPayload):  # built in Python: the type is the payload's
            stated = data.get("type", payload.type)
            if stated != payload.type:
                raise ValueError(f"type {stated!r} does not match a {payload.type} payload")
            built = {**data, "type": payload.type}
            if "event_id" not in built:
                built["event_id"] = new_event_id()
            if "time" not in built:
                built["time"] = utcnow()
            return built
        return data

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_none=True)
        return {key: data[key] for key in self.wire_order if key in data}

    def encode(self) -> bytes:
        return encode_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, raw: bytes = b"") -> Self:
        """Build an event from decoded JSON (e.g. the dict a broker already parsed),
        validating it once.

        Raises UnknownEventType when the envelope is well-formed but its type is not one
        of the family's, DecodeError (keeping ``raw``) when it is not an event at all (a
        missing or malformed field, a value out of its limits, a lone surrogate, a NUL
        in an id).
        """
        if not isinstance(data, dict):
            raise DecodeError(f"{cls.what} is not a JSON object", raw)
        name = data.get("type")
        if isinstance(name, str) and name not in cls.payloads:
            cls._unknown_type(data, name, raw)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise DecodeError(f"not a DCU {cls.what}: {describe(exc)}", raw) from exc

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        return cls.from_dict(decode_json(raw, cls.what), raw)

    @classmethod
    def _unknown_type(cls, data: dict[str, Any], name: str, raw: bytes) -> NoReturn:
        """Raise UnknownEventType when ``data`` is a well-formed envelope (whatever its
        payload holds), DecodeError when it is not."""
        try:
            _any_type(cls).model_validate(data)
        except ValidationError as exc:
            raise DecodeError(f"not a DCU {cls.what}: {describe(exc)}", raw) from exc
        raise UnknownEventType(name, raw)


@functools.cache
def _any_type(family: type[Envelope[Any, Any]]) -> type[BaseModel]:
    """``family``'s envelope with any type name and any JSON object as payload."""
    fields: dict[str, Any] = {"type": (Text, ...), "payload": (dict[str, Any], ...)}
    return create_model(f"{family.__name__}OfAnyType", __base__=family, **fields)


# -- task events ----------------------------------------------------------------------


class Payload(EventPayload):
    """Base of every task event payload."""

    type: ClassVar[EventType]


class Requested(Payload):
    """The gateway accepted a task (``POST /start``)."""

    type: ClassVar[EventType] = EventType.REQUESTED
    username: Username
    docker_image_name: ImageName
    """The image as the caller named it."""
    platform: Platform | None = None
    """``os/arch[/variant]`` as the caller asked (normalised); absent: ``download.platform``."""
    format: ArchiveFormat | None = None
    """The archive format; absent: ``storage.archive_format``."""
    images: BundleImages | None = None
    """A bundle's images (``POST /bundle``), in order; ``docker_image_name`` is then the
    bundle's name. Absent for a task of one image."""


class BundleImage(WireModel):
    """One image of a bundle, as the download stage packaged it."""

    docker_image_name: ImageName
    """The image as the caller named it."""
    image_id: ImageId
    manifest_digest: ManifestDigest | None = None
    platform: Platform | None = None


BundleImages = Annotated[list[ImageName], Field(min_length=1, max_length=BUNDLE_IMAGES_MAX)]


class StageStarted(Payload):
    """Shared shape of the three ``*_started`` events."""

    type: ClassVar[EventType] = EventType.DOWNLOAD_STARTED
    worker: Text = ""
    """The process running the stage (``host:pid:role``)."""
    attempt: Count = 1
    """1 + the retries of the stage's message."""


class DownloadStarted(StageStarted):
    """The download stage started (or started again) for the task."""

    type: ClassVar[EventType] = EventType.DOWNLOAD_STARTED


class CompressStarted(StageStarted):
    """The compress stage started (or started again) for the task."""

    type: ClassVar[EventType] = EventType.COMPRESS_STARTED


class UploadStarted(StageStarted):
    """The upload stage started (or started again) for the task."""

    type: ClassVar[EventType] = EventType.UPLOAD_STARTED


class Downloaded(Payload):
    """The image is local. ``layout`` says what ``tar_path`` is: ``tar`` an image tar
    (docker engine), ``blobs`` the verified-blob plan of the registry engine
    (``actors.blob_plan``), ``reuse`` nothing to read (see ``reused_object``)."""

    type: ClassVar[EventType] = EventType.DOWNLOADED
    docker_image_name: Text
    image_id: ImageId
    tar_path: Text
    bytes: Count
    seconds: Figure = 0.0
    engine: StageName = "docker"
    layout: Text = "tar"
    manifest_digest: ManifestDigest | None = None
    platform: Platform | None = None
    fetched_bytes: Count | None = None
    """Blob bytes transferred from the registry."""
    cached_bytes: Count | None = None
    """Blob bytes served by the blob cache."""
    reused_object: ObjectName | None = None
    """An object already holding this exact archive (digest reuse): the later stages copy
    it instead of compressing and uploading again."""
    images: Annotated[list[BundleImage], Field(max_length=BUNDLE_IMAGES_MAX)] | None = None
    """A bundle's images with their IDs; ``image_id`` is then the first one's."""
    format: ArchiveFormat | None = None
    """The archive format to write; absent: ``docker-archive+gzip`` (events before formats)."""


class Compressed(Payload):
    """The archive is written. ``method``: ``gzip`` (the whole tar compressed),
    ``splice`` (layer blobs copied verbatim, only headers compressed), ``tar`` (layers
    written uncompressed), ``oci`` (registry blobs copied as they are), ``reuse``
    (nothing written: see Downloaded)."""

    type: ClassVar[EventType] = EventType.COMPRESSED
    docker_image_name: Text
    image_id: ImageId
    gzip_file_name: ObjectName
    bytes_in: Count
    bytes_out: Count
    sha256: Sha256
    seconds: Figure = 0.0
    method: Text = "gzip"
    spliced_bytes: Count | None = None
    """Archive bytes copied verbatim from layer blobs."""
    reused_object: ObjectName | None = None
    manifest_digest: ManifestDigest | None = None
    platform: Platform | None = None
    format: ArchiveFormat | None = None
    """The archive's format; absent: ``docker-archive+gzip`` (events before formats)."""
    bundle: bool = False
    """The archive holds a bundle; ``docker_image_name`` is the bundle's name."""
    shared_bytes: Count | None = None
    """A bundle's layer bytes written once instead of once per image (compressed size;
    uncompressed for ``docker-archive``)."""


class Uploaded(Payload):
    """The archive is in the object store: the task is completed."""

    type: ClassVar[EventType] = EventType.UPLOADED
    bucket: Bucket
    minio_object_name: ObjectName
    bytes: Count
    sha256: Sha256
    image_id: ImageId = ""
    seconds: Figure = 0.0
    manifest_digest: ManifestDigest | None = None
    platform: Platform | None = None
    reused_from: ObjectName | None = None
    """The object copied server-side (digest reuse)."""
    format: ArchiveFormat | None = None
    """The archive's format; absent: ``docker-archive+gzip`` (events before formats)."""


class Failed(Payload):
    """The task failed for good."""

    type: ClassVar[EventType] = EventType.FAILED
    stage: StageName
    reason: Text
    """The cause, with the number of retries."""


class Progress(Payload):
    """Live figures of the running stage (not a fact: only the latest is kept)."""

    type: ClassVar[EventType] = EventType.PROGRESS
    stage: StageName
    bytes_done: Count
    bytes_total: Count | None = None
    """Absent while unknown."""
    rate: Figure = 0.0
    """Bytes per second."""


PAYLOADS: dict[EventType, type[Payload]] = {
    model.type: model
    for model in (
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

TaskPayload = Annotated[Payload, tagged_by_type(PAYLOADS)]


class Event(Envelope[EventType, TaskPayload]):
    """One fact about one task. ``event_id`` is also the JetStream ``Nats-Msg-Id``."""

    task_id: EventId

    what: ClassVar[str] = "event"
    payloads: ClassVar[PayloadModels] = PAYLOADS
    wire_order: ClassVar[tuple[str, ...]] = (
        "event_id",
        "task_id",
        "type",
        "schema_version",
        "time",
        "payload",
    )

    if TYPE_CHECKING:  # the signature type checkers see; pydantic's takes keywords

        def __init__(
            self,
            *,
            task_id: str,
            payload: Payload,
            event_id: str = ...,
            time: datetime = ...,
            schema_version: int = ...,
            type: EventType = ...,
        ) -> None: ...

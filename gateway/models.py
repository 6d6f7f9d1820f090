"""What the HTTP API takes and answers, declared once as pydantic models.

The handlers validate every input through these models and build every answer from them,
and ``gateway.openapi`` generates the document from them, so a limit, an enum or a field
is written here only (lengths from ``events.limits``, ``page_size``'s maximum from the
settings through ``task_query``).

**Refusals.** Each input field's validator runs before pydantic's own checks and refuses
with the message the API has always given (``refuse``); ``validate`` turns a failed
validation into the ``InvalidInput`` (400) its first problem calls for: a missing field
first (``missing field: <name>``, or the field's ``WhenMissing`` message), then the
fields in the order they are declared, which is the order they are checked in. The
pydantic constraints beside each validator (``max_length``, ``ge`` ...) are what the
document shows; the validator has already enforced them by the time pydantic looks.

**Absent is not null.** An optional body field may be left out but not sent as ``null``:
its validator runs on whatever is sent, ``null`` included, and refuses it; the document
shows the field without a ``null`` (``SkipJsonSchema[None]``).
"""

from __future__ import annotations

import enum
import functools
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, NoReturn, Protocol, Self, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    create_model,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from events.cleanup import CleanupCompleted, CleanupKind, parse_kind
from events.formats import DEFAULT_FORMAT, ArchiveFormat
from events.limits import (
    CLEANUP_TIMEOUT_MAX,
    ID_MAX,
    IDEMPOTENCY_KEY_MAX,
    IMAGE_NAME_MAX,
    PAGE_MAX,
    PLATFORM_MAX,
    USERNAME_MAX,
)
from events.messages import DEFAULT_LANGUAGE, Language
from events.platform import DEFAULT_PLATFORM, PLATFORM_PATTERN, InvalidPlatform, parse_platform
from events.reference import InvalidReference, parse_reference, registry_refusal
from events.schema import EventType
from events.states import PROGRESS, TaskState
from kernel.errors import InvalidInput
from kernel.settings import Settings
from persistence.repository import TaskDetailRecord

IDEMPOTENCY_HEADER = "Idempotency-Key"
BUNDLE_NAME_MAX = 100
BUNDLE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# Printable ASCII (space to ~), not starting or ending with a space: HTTP strips those.
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]([ -~]*[!-~])?$"
DEFAULT_PAGE_SIZE = 10
DEFAULT_CLEANUP_TIMEOUT = 60.0
DEFAULT_REQUESTER = "admin"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_TIME_PATTERN = r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$"
_INTEGER = re.compile(r"-?[0-9]+")
_INTEGER_DIGITS_MAX = 20  # more digits than any limit; int() refuses past 4300 of them
_ECHO = 50  # characters of a refused query value quoted back
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


# --- refusals ---------------------------------------------------------------------------

INVALID = "invalid_input"
"""The pydantic error type of a refusal worded by a validator (``refuse``)."""

M = TypeVar("M", bound=BaseModel)
E = TypeVar("E", bound=enum.StrEnum)


def refuse(message: str) -> NoReturn:
    """Fail the field being validated with ``message``, the API's wording, as it is."""
    raise PydanticCustomError(INVALID, "{message}", {"message": message})


@dataclass(frozen=True, slots=True)
class WhenMissing:
    """Field metadata: the refusal of a body that leaves the field out (instead of
    ``missing field: <name>``)."""

    message: str


def _missing(model: type[BaseModel], name: str) -> str:
    for field_name, field in model.model_fields.items():
        if name in (field_name, field.validation_alias):
            for item in field.metadata:
                if isinstance(item, WhenMissing):
                    return item.message
    return f"missing field: {name}"


def invalid_input(exc: ValidationError, model: type[BaseModel]) -> InvalidInput:
    """The 400 for ``exc``, a failed validation of ``model``: a missing field first, else
    the first field's refusal, worded by its validator."""
    errors = exc.errors(include_url=False, include_input=False)
    error = next((e for e in errors if e["type"] == "missing"), errors[0])
    if error["type"] == "missing":
        return InvalidInput(_missing(model, str(error["loc"][0])))
    if error["type"] == INVALID:
        return InvalidInput(error["msg"])
    # a constraint no validator words: every field's validator should have caught it first
    where = ".".join(str(part) for part in error["loc"]) or "value"
    return InvalidInput(f"{where}: {error['msg']}")


def validate(model: type[M], data: Mapping[str, object], context: object = None) -> M:
    """``data`` as ``model``; raises InvalidInput (see ``invalid_input``)."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise invalid_input(exc, model) from None


# --- field validators -------------------------------------------------------------------


def _username(raw: object) -> str:
    """A username as sent (``requested_by`` too): measured before trimming."""
    if not isinstance(raw, str):
        refuse("username must be a string")
    if len(raw) > USERNAME_MAX:  # as sent, surrounding spaces included
        refuse(f"username is longer than {USERNAME_MAX} characters")
    name = raw.strip()
    if not name:
        refuse("username must not be empty")
    if any(not ch.isprintable() for ch in name):
        refuse("username contains control characters")
    return name


def _image_reference(raw: object, info: ValidationInfo) -> str:
    """An image reference of the distribution grammar, from a registry the settings (the
    validation context) allow."""
    try:
        ref = parse_reference(raw)
    except InvalidReference as exc:
        refuse(str(exc))
    if len(ref.original) > IMAGE_NAME_MAX:
        refuse(f"docker_image_name is longer than {IMAGE_NAME_MAX} characters")
    settings = info.context
    if isinstance(settings, Settings):
        refusal = registry_refusal(ref, settings.docker.allowed_registries)
        if refusal is not None:
            refuse(refusal)
    return ref.original


def _bundle_images(raw: object, info: ValidationInfo) -> list[str]:
    """A bundle's references: a non-empty list of valid, distinct references (the same
    image named twice, ``nginx`` and ``docker.io/library/nginx:latest`` say, is refused),
    at most ``server.max_bundle_images`` of them."""
    if not isinstance(raw, list):
        refuse("images must be a list of image references")
    if not raw:
        refuse("images must not be empty: a bundle holds at least one image")
    settings = info.context
    limit = settings.server.max_bundle_images if isinstance(settings, Settings) else None
    if limit is not None and len(raw) > limit:
        refuse(
            f"images holds {len(raw)} references; at most {limit} allowed "
            "(server.max_bundle_images)"
        )
    seen: dict[str, int] = {}
    names: list[str] = []
    for index, item in enumerate(raw):
        try:
            name = _image_reference(item, info)
        except PydanticCustomError as exc:  # worded for docker_image_name: say where instead
            reason = exc.message().removeprefix("docker_image_name").removeprefix(":").strip()
            refuse(f"images[{index}]: {reason}")
        canonical = parse_reference(name).canonical
        if canonical in seen:
            refuse(
                f"images[{index}] ({name}) names the same image as images[{seen[canonical]}] "
                f"({names[seen[canonical]]}); list each image once"
            )
        seen[canonical] = index
        names.append(name)
    return names


def _bundle_name(raw: object) -> str:
    if not isinstance(raw, str):
        refuse("name must be a string")
    if not re.fullmatch(BUNDLE_NAME_PATTERN, raw) or len(raw) > BUNDLE_NAME_MAX:
        refuse(
            f"name {raw[:_ECHO]!r} must be 1-{BUNDLE_NAME_MAX} letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
    return raw


def _platform(raw: object) -> str:
    try:
        return str(parse_platform(raw))
    except InvalidPlatform as exc:
        refuse(str(exc))


def _image_filter(raw: object) -> object:
    if isinstance(raw, str) and len(raw) > IMAGE_NAME_MAX:
        refuse(f"docker_image_name filter is longer than {IMAGE_NAME_MAX} characters")
    if isinstance(raw, str) and not raw.isprintable():  # NUL included: no driver sees it
        refuse("docker_image_name filter contains control characters")
    return raw


def _task_id(raw: object) -> str:
    """Any form ``uuid.UUID`` reads (braces, ``urn:uuid:``, no dashes), normalised."""
    text = raw if isinstance(raw, str) else str(raw)
    try:
        return str(uuid.UUID(text))
    except ValueError:
        refuse(f"task_id {text[:ID_MAX]!r} is not a UUID")


def _one_of(kind: type[E]) -> Callable[[object, ValidationInfo], E]:
    """A validator taking a value of the enum ``kind``, refusing with the values allowed."""

    def member(raw: object, info: ValidationInfo) -> E:
        text = raw if isinstance(raw, str) else str(raw)
        try:
            return kind(text)
        except ValueError:
            refuse(f"{info.field_name} {text[:_ECHO]!r} is not one of: {', '.join(kind)}")

    return member


def _flag(raw: object, info: ValidationInfo) -> bool:
    if isinstance(raw, bool):
        return raw
    text = raw if isinstance(raw, str) else str(raw)
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    refuse(f"{info.field_name} must be true or false, got {text[:_ECHO]!r}")


def _timeout(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        refuse(f"timeout must be a number of seconds, got {raw!r}")
    if not 0 <= raw <= CLEANUP_TIMEOUT_MAX:
        refuse(f"timeout must be between 0 and {CLEANUP_TIMEOUT_MAX:g} seconds")
    return float(raw)


def _cleanup_kind(raw: object) -> CleanupKind:
    try:
        return parse_kind(raw)
    except ValueError as exc:
        refuse(str(exc))


def _idempotency_key(raw: object) -> object:
    """The one value of the ``Idempotency-Key`` header (a list of them, as sent)."""
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        return None
    rule = f"{IDEMPOTENCY_HEADER} must be 1-{IDEMPOTENCY_KEY_MAX} printable ASCII characters"
    if len(values) > 1:
        refuse(f"{rule}, in one header; got {len(values)} {IDEMPOTENCY_HEADER} headers")
    key = values[0]
    if not isinstance(key, str):
        refuse(f"{rule}; got {key!r}")
    if not key:
        refuse(f"{rule}; got an empty value")
    if len(key) > IDEMPOTENCY_KEY_MAX:
        refuse(f"{rule}; got {len(key)} characters")
    for position, ch in enumerate(key, 1):
        if not " " <= ch <= "~":
            kind = "a control character" if ch.isascii() else "a non-ASCII character"
            refuse(f"{rule}; got {kind} at position {position}")
    return key


def _first_value(raw: object) -> object:
    """A header's first value (its values, as sent, are a list), None for an empty one."""
    if isinstance(raw, list):
        raw = raw[0] if raw else None
    return raw or None


@dataclass(frozen=True, slots=True)
class Digits:
    """Metadata of an integer query parameter: ASCII digits only (``int`` alone also takes
    ``" 5"``, ``"+5"``, ``"1_0"``, ``"\\u0665"``), between ``minimum`` and ``maximum``."""

    minimum: int
    maximum: int

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        bounded = core_schema.int_schema(ge=self.minimum, le=self.maximum)
        return core_schema.with_info_before_validator_function(self._check, bounded)

    def _check(self, raw: object, info: ValidationInfo) -> int:
        text = raw if isinstance(raw, str) else str(raw)
        if not _INTEGER.fullmatch(text):
            refuse(f"{info.field_name} must be an integer, got {text[:_ECHO]!r}")
        if len(text) > _INTEGER_DIGITS_MAX or not self.minimum <= int(text) <= self.maximum:
            refuse(
                f"{info.field_name} must be between {self.minimum} and {self.maximum}, "
                f"got {text[:_ECHO]}"
            )
        return int(text)


# --- field types ------------------------------------------------------------------------

UuidText = Annotated[str, Field(json_schema_extra={"format": "uuid"})]
LocalTime = Annotated[
    str, StringConstraints(pattern=_TIME_PATTERN), Field(examples=["2025-12-10 20:25:00"])
]
NonNegative = Annotated[int, Field(ge=0)]
Username = Annotated[
    str, StringConstraints(min_length=1, max_length=USERNAME_MAX), BeforeValidator(_username)
]
_PlatformText = Annotated[str, StringConstraints(max_length=PLATFORM_MAX, pattern=PLATFORM_PATTERN)]
_IdempotencyKeyText = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=IDEMPOTENCY_KEY_MAX, pattern=IDEMPOTENCY_KEY_PATTERN
    ),
]
TaskId = Annotated[UuidText, BeforeValidator(_task_id)]
Flag = Annotated[bool, BeforeValidator(_flag)]

_USERNAME_RULE = "Trimmed; must not be blank nor hold control characters."
_TIMEOUT_RULE = (
    "Seconds to wait for the run to finish; past it the answer is 202 and the run goes on."
)


# --- requests ---------------------------------------------------------------------------


class RequestModel(BaseModel):
    """Base of every input: unknown fields are ignored, descriptions are the docstrings."""

    model_config = ConfigDict(frozen=True, extra="ignore", use_attribute_docstrings=True)

    shape: ClassVar[str] = "a JSON object"
    """What an empty body is told was expected (bodies only)."""


PlatformChoice = Annotated[
    _PlatformText | SkipJsonSchema[None],
    BeforeValidator(_platform),
    Field(
        examples=["linux/arm64"],
        description="The platform to take from a multi-platform image, "
        "`os/architecture[/variant]`; normalised as containerd does (`x86_64` is `amd64`, "
        "`aarch64` is `arm64`, `arm` is `arm/v7`). Absent: the service's `download.platform` "
        f"(`{DEFAULT_PLATFORM}` by default).",
    ),
]
FormatChoice = Annotated[
    ArchiveFormat | SkipJsonSchema[None],
    BeforeValidator(_one_of(ArchiveFormat)),
    Field(
        description="The archive format (docs/compatibility.md tells which loader reads "
        "which): `docker-archive+gzip` (`.tar.gz`, docker load), `docker-archive` (`.tar`, "
        "every loader), `oci-archive` (`.oci.tar`, podman, skopeo, ctr; registry blobs "
        "verbatim). Absent: the service's `storage.archive_format` "
        f"(`{DEFAULT_FORMAT}` by default).",
    ),
]


class ArchiveRequest(RequestModel):
    """What every start names first: who asks."""

    model_config = ConfigDict(json_schema_extra={"additionalProperties": True})

    username: Annotated[Username, Field(description=_USERNAME_RULE, examples=["test_user"])]


class StartRequest(ArchiveRequest):
    """Unknown fields are ignored."""

    docker_image_name: Annotated[
        str,
        StringConstraints(min_length=1, max_length=IMAGE_NAME_MAX),
        BeforeValidator(_image_reference),
        Field(examples=["nginx:latest"]),
    ]
    """An image reference in the distribution grammar (`[registry/]path[:tag][@digest]`),
    checked before anything reaches the engine or a path; anything else is a 400. A
    reference by digest may name a tag too (`name:tag@sha256:...`): the image is pulled by
    the digest and loads under that tag."""
    platform: PlatformChoice = None
    format: FormatChoice = None


class BundleRequest(ArchiveRequest):
    """Unknown fields are ignored."""

    name: Annotated[
        str,
        StringConstraints(min_length=1, max_length=BUNDLE_NAME_MAX, pattern=BUNDLE_NAME_PATTERN),
        BeforeValidator(_bundle_name),
        Field(examples=["release-1.4"]),
    ] = "bundle"
    """The bundle's name: the task's `docker_image_name` and the archive's file name
    (`release-1.4.tar.gz`). Letters, digits, `.`, `_`, `-`; it starts with a letter or
    digit."""
    images: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=IMAGE_NAME_MAX)]],
        Field(min_length=1, examples=[["nginx:1.27", "redis:7"]]),
        BeforeValidator(_bundle_images),
    ]
    """The images, each a reference as in `POST /start`, each image once; at most
    `server.max_bundle_images` of them. The archive holds them all with their tags and
    every layer once."""
    platform: PlatformChoice = None
    format: FormatChoice = None


_OptionalUsername = Annotated[Username | SkipJsonSchema[None], BeforeValidator(_username)]
A = TypeVar("A", bound=ArchiveRequest)


def _with_token(model: type[A]) -> type[A]:
    """``model`` for a request authenticated by a token: ``username`` may be left out (the
    token names the user; the handler takes it from there, whatever the body says)."""
    return create_model(
        model.__name__,
        __base__=model,
        __doc__=model.__doc__,
        username=(
            _OptionalUsername,
            Field(
                default=None,
                examples=["test_user"],
                description=f"{_USERNAME_RULE} Optional and ignored: the task's username is "
                "the token's name (still checked when given).",
            ),
        ),
    )


TokenStartRequest = _with_token(StartRequest)
TokenBundleRequest = _with_token(BundleRequest)


class StartHeaders(RequestModel):
    idempotency_key: Annotated[
        _IdempotencyKeyText | SkipJsonSchema[None], BeforeValidator(_idempotency_key)
    ] = Field(
        default=None,
        validation_alias=IDEMPOTENCY_HEADER,
        description=f"1-{IDEMPOTENCY_KEY_MAX} printable ASCII characters (space to `~`, none "
        "around it), else a 400. The same user's start with the same key answers the same "
        "task; with another image or platform it is a 409.",
    )


class CleanupRequest(RequestModel):
    """Unknown fields are ignored."""

    model_config = ConfigDict(json_schema_extra={"additionalProperties": True})
    shape: ClassVar[str] = '{"kind": ' + "|".join(f'"{kind}"' for kind in CleanupKind) + "}"

    kind: Annotated[
        CleanupKind,
        WhenMissing(f"missing field: kind (one of: {', '.join(CleanupKind)})"),
        BeforeValidator(_cleanup_kind),
    ]
    timeout: Annotated[
        float,
        Field(ge=0, le=CLEANUP_TIMEOUT_MAX, description=_TIMEOUT_RULE),
        BeforeValidator(_timeout),
    ] = DEFAULT_CLEANUP_TIMEOUT
    requested_by: Username = DEFAULT_REQUESTER
    """Who asks (as a username); `admin` by default."""


class TaskPath(RequestModel):
    task_id: TaskId


class TaskQuery(RequestModel):
    """``GET /query``; build it with ``task_query`` for the settings' ``max_page_size``."""

    state: Annotated[TaskState | SkipJsonSchema[None], BeforeValidator(_one_of(TaskState))] = None
    docker_image_name: Annotated[
        Annotated[str, StringConstraints(max_length=IMAGE_NAME_MAX)] | SkipJsonSchema[None],
        BeforeValidator(_image_filter),
    ] = None
    """Substring of the reference."""
    username: Annotated[
        Annotated[str, StringConstraints(max_length=USERNAME_MAX)] | SkipJsonSchema[None],
        BeforeValidator(_username),
    ] = None
    """Exact user (trimmed)."""
    page: Annotated[int, Digits(1, PAGE_MAX)] = 1
    page_size: int = DEFAULT_PAGE_SIZE


@functools.cache
def task_query(max_page_size: int) -> type[TaskQuery]:
    """``TaskQuery`` with ``page_size`` at most ``max_page_size`` (``server.max_page_size``).

    A missing ``page_size`` is ``DEFAULT_PAGE_SIZE`` even past the maximum, as it always
    was; the document shows the smaller of the two as the default."""
    return create_model(
        "TaskQuery",
        __base__=TaskQuery,
        __doc__=TaskQuery.__doc__,
        page_size=(
            Annotated[int, Digits(1, max_page_size)],
            Field(
                default=DEFAULT_PAGE_SIZE,
                json_schema_extra={"default": min(DEFAULT_PAGE_SIZE, max_page_size)},
            ),
        ),
    )


class EventsQuery(RequestModel):
    include_progress: Flag = True
    """Leave out `progress` events when false."""


class StreamHeaders(RequestModel):
    last_event_id: Annotated[str | SkipJsonSchema[None], BeforeValidator(_first_value)] = Field(
        default=None, validation_alias="Last-Event-ID", description="Resume after this event."
    )


class LiveEventsQuery(RequestModel):
    type: Annotated[EventType | SkipJsonSchema[None], BeforeValidator(_one_of(EventType))] = None


# --- responses --------------------------------------------------------------------------


class ResponseModel(BaseModel):
    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)


class TaskLike(Protocol):
    """What a task answer is built from: a row, or a task known from its event only."""

    @property
    def task_id(self) -> str: ...
    @property
    def username(self) -> str: ...
    @property
    def docker_image_name(self) -> str: ...
    @property
    def gzip_file_name(self) -> str | None: ...
    @property
    def minio_object_name(self) -> str | None: ...
    @property
    def state(self) -> str: ...
    @property
    def error_message(self) -> str | None: ...
    @property
    def start_time(self) -> datetime: ...
    @property
    def end_time(self) -> datetime | None: ...
    @property
    def duration(self) -> int | None: ...


def format_time(moment: datetime) -> str:
    """``2025-12-10 20:25:00`` in the server's local time zone, as the seed shows."""
    return moment.astimezone().strftime(TIME_FORMAT)


def elapsed_ms(task: TaskLike, now: datetime) -> int:
    """The stored duration once terminal; the live elapsed time while running."""
    if task.duration is not None:
        return task.duration
    return max(0, int((now - task.start_time).total_seconds() * 1000))


class Task(ResponseModel):
    """One task, in the seed's shape."""

    task_id: UuidText
    state: TaskState
    state_display: str
    docker_image_name: str
    gzip_file_name: str | None
    minio_object_name: str | None
    progress: Annotated[int, Field(json_schema_extra={"enum": sorted(set(PROGRESS.values()))})]
    duration: Annotated[int, Field(ge=0, description="ms")]
    username: str
    start_time: LocalTime
    end_time: LocalTime | None
    error_message: str | None

    @classmethod
    def of(cls, task: TaskLike, now: datetime, language: Language = DEFAULT_LANGUAGE) -> Self:
        state = TaskState(task.state)
        return cls(
            task_id=task.task_id,
            state=state,
            state_display=state.display_in(language),
            docker_image_name=task.docker_image_name,
            gzip_file_name=task.gzip_file_name,
            minio_object_name=task.minio_object_name,
            progress=state.progress,
            duration=elapsed_ms(task, now),
            username=task.username,
            start_time=format_time(task.start_time),
            end_time=None if task.end_time is None else format_time(task.end_time),
            error_message=task.error_message,
        )


class BundleImageAnswer(ResponseModel):
    """One image of a bundle."""

    docker_image_name: str
    image_id: str | None = None
    manifest_digest: str | None = None
    platform: str | None = None


class TaskDetail(Task):
    """One task with its details (``/status``, once the task has any): the stage's live
    figures and what the stages found."""

    image_id: str | None
    archive_bytes: NonNegative | None
    archive_sha256: str | None
    stage: str | None
    stage_progress: Annotated[float, Field(ge=0, le=100)] | None
    stage_bytes_done: NonNegative | None
    stage_bytes_total: NonNegative | None
    stage_rate: float | None
    """Bytes per second."""
    platform: Annotated[str, StringConstraints(max_length=PLATFORM_MAX)] | None
    """Normalised: the one requested, then the one packaged."""
    manifest_digest: str | None
    engine: Annotated[str | None, Field(examples=["registry"])]
    reused: bool | None
    """Whether an existing archive of the same manifest was copied instead of built; null
    until the download stage ends."""
    download_bytes_fetched: NonNegative | None
    """From the registry."""
    download_bytes_cached: NonNegative | None
    """From the blob cache."""
    format: ArchiveFormat | None
    """The archive format: the one requested, or the service's default once a stage
    names it; null for a task started before formats existed (`docker-archive+gzip`)."""
    images: list[BundleImageAnswer] | None
    """A bundle's images in order (`POST /bundle`): the references until the download
    stage names their IDs; null for a task of one image."""
    shared_bytes: NonNegative | None
    """A bundle's layer bytes stored once for several images (compressed size; the
    uncompressed size in a `docker-archive`): what the bundle saves over single archives."""

    @classmethod
    def with_detail(
        cls,
        task: TaskLike,
        now: datetime,
        detail: TaskDetailRecord,
        language: Language = DEFAULT_LANGUAGE,
    ) -> Self:
        total = detail.stage_bytes_total
        done = detail.stage_bytes_done
        percent = None
        if total and done is not None:
            percent = round(min(100.0, 100.0 * done / total), 1)
        return cls(
            **dict(Task.of(task, now, language)),
            image_id=detail.image_id,
            archive_bytes=detail.archive_bytes,
            archive_sha256=detail.archive_sha256,
            stage=detail.stage,
            stage_progress=percent,
            stage_bytes_done=done,
            stage_bytes_total=total,
            stage_rate=detail.stage_rate,
            platform=detail.platform,
            manifest_digest=detail.manifest_digest,
            engine=detail.engine,
            reused=detail.reused,
            download_bytes_fetched=detail.fetched_bytes,
            download_bytes_cached=detail.cached_bytes,
            format=None if detail.archive_format is None else ArchiveFormat(detail.archive_format),
            images=None
            if detail.images is None
            else [BundleImageAnswer.model_validate(image) for image in detail.images],
            shared_bytes=detail.shared_bytes,
        )


class TaskPage(ResponseModel):
    """One page of tasks and the total matching."""

    total: NonNegative
    items: list[Task]


class StartResult(ResponseModel):
    task_id: UuidText
    state: TaskState
    """`idle` for a new task; a start repeated with its `Idempotency-Key` answers the
    task's current state."""


class DownloadLink(ResponseModel):
    """Where to fetch a completed task's archive (S3): also the answer's `Location`."""

    url: str
    """Presigned GET URL; no credentials needed until it expires."""
    file_name: str
    bytes: NonNegative
    sha256: str | None
    """The archive's recorded sha256 (hex); also the `X-Checksum-Sha256` header."""
    expires_in: float
    """Seconds the URL stays valid (`minio.download_url_expiry`)."""


class Health(ResponseModel):
    status: Literal["ok", "unhealthy"]
    nats: Literal["connected", "disconnected"]
    database: str
    """`ok` or `error: <kind>`"""


class StoredEvent(ResponseModel):
    """An event as the stream holds it (its payload is the one of its type, see the
    events' AsyncAPI document), with its place in the stream."""

    model_config = ConfigDict(extra="allow")

    event_id: str
    task_id: str
    type: EventType
    schema_version: int
    time: Annotated[str, Field(json_schema_extra={"format": "date-time"})]
    payload: dict[str, Any]
    seq: Annotated[int, Field(ge=1)]
    """Stream sequence."""


class EventHistory(ResponseModel):
    task_id: UuidText
    total: NonNegative
    truncated: bool
    """Whether more events were stored than one answer holds."""
    events: list[StoredEvent]


class CleanupCompletedEvent(ResponseModel):
    """A cleanup run's ``completed`` event (``events.cleanup``)."""

    event_id: str
    kind: CleanupKind
    type: Literal["completed"]
    schema_version: int
    time: Annotated[str, Field(json_schema_extra={"format": "date-time"})]
    payload: CleanupCompleted


class CleanupPending(ResponseModel):
    request_id: str
    kind: CleanupKind
    subject: str
    """Where the completion will be published."""

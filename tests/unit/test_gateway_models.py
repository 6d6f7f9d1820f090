"""The HTTP models: every refusal keeps the API's wording, and the answers keep their shape.

No server: the models are validated directly (``gateway.models.validate``), as the handlers
do through ``gateway.http``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from events.cleanup import CleanupKind, CleanupResult
from events.schema import Downloaded, Event
from gateway import models
from kernel.errors import InvalidInput
from kernel.settings import DockerSettings, Settings
from persistence.repository import TaskDetailRecord, TaskRecord

TASK_ID = "8f6d1a4e-3b0c-4c1a-9d7e-2f5b6a7c8d9e"
START = {"username": "alice", "docker_image_name": "nginx:latest"}
# 520 characters the reference grammar takes (name, tag and a sha512 digest at their limits)
KEY_RULE = "Idempotency-Key must be 1-200 printable ASCII characters"
STATES = "idle, downloading, compressing, uploading, completed, failed"
LONGEST_REFERENCE = "a" * 255 + ":" + "t" * 128 + "@sha512:" + "0" * 128


def refusal(model: type[BaseModel], data: dict[str, Any], context: object = None) -> str:
    with pytest.raises(InvalidInput) as caught:
        models.validate(model, data, context)
    return str(caught.value)


# --- the wording of every refusal ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"docker_image_name": "nginx"}, "missing field: username"),
        ({"username": "alice"}, "missing field: docker_image_name"),
        ({}, "missing field: username"),
        ({"username": 5, "docker_image_name": "nginx"}, "username must be a string"),
        ({"username": None, "docker_image_name": "nginx"}, "username must be a string"),
        (
            {"username": "a" * 101, "docker_image_name": "nginx"},
            "username is longer than 100 characters",
        ),
        (
            {"username": " " + "a" * 100, "docker_image_name": "nginx"},
            "username is longer than 100 characters",
        ),
        ({"username": "   ", "docker_image_name": "nginx"}, "username must not be empty"),
        (
            {"username": "a\x00b", "docker_image_name": "nginx"},
            "username contains control characters",
        ),
        (
            {"username": "\ud800", "docker_image_name": "nginx"},
            "username contains control characters",
        ),
        ({"username": "alice", "docker_image_name": 1}, "docker_image_name must be a string"),
        ({"username": "alice", "docker_image_name": ""}, "docker_image_name must not be empty"),
        (
            {"username": "alice", "docker_image_name": "nginx;id"},
            "docker_image_name contains a character not allowed in image references: ';'",
        ),
        (
            {"username": "alice", "docker_image_name": "NGINX"},
            "docker_image_name: repository name must be lowercase",
        ),
        (
            {"username": "alice", "docker_image_name": LONGEST_REFERENCE},
            "docker_image_name is longer than 500 characters",
        ),
        ({**START, "platform": None}, "platform must be a string such as linux/amd64"),
        (
            {**START, "platform": "linux"},
            "platform 'linux' is not os/architecture[/variant], e.g. linux/arm64",
        ),
    ],
)
def test_start_refusals_keep_their_wording(data: dict[str, Any], message: str) -> None:
    assert refusal(models.StartRequest, data) == message


def test_a_missing_field_comes_before_a_bad_one_and_fields_in_their_order() -> None:
    assert refusal(models.StartRequest, {"username": 5}) == "missing field: docker_image_name"
    bad_both = {"username": 5, "docker_image_name": 5, "platform": 5}
    assert refusal(models.StartRequest, bad_both) == "username must be a string"
    assert refusal(models.StartRequest, {**START, "docker_image_name": 5, "platform": 5}) == (
        "docker_image_name must be a string"
    )


def test_the_registry_allow_list_comes_from_the_settings_before_the_platform() -> None:
    settings = Settings(docker=DockerSettings(allowed_registries=["registry.local:5000"]))
    data = {**START, "platform": "bad"}
    assert refusal(models.StartRequest, data, settings) == (
        "registry docker.io is not allowed; allowed: registry.local:5000"
    )
    allowed = {**START, "docker_image_name": "registry.local:5000/a:1"}
    assert models.validate(models.StartRequest, allowed, settings).platform is None


def test_with_a_token_the_username_may_be_left_out_but_not_sent_as_null() -> None:
    assert (
        models.validate(models.TokenStartRequest, {"docker_image_name": "nginx"}).username is None
    )
    assert refusal(models.TokenStartRequest, {"username": None, "docker_image_name": "nginx"}) == (
        "username must be a string"
    )
    assert refusal(models.TokenStartRequest, {}) == "missing field: docker_image_name"


def test_start_normalises_what_it_accepts() -> None:
    body = models.validate(
        models.StartRequest, {**START, "username": " bob ", "platform": "Linux/x86_64"}
    )
    assert (body.username, body.platform) == ("bob", "linux/amd64")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            ["a", "b"],
            f"{KEY_RULE}, in one header; got 2 Idempotency-Key headers",
        ),
        ([""], f"{KEY_RULE}; got an empty value"),
        (
            ["a" * 201],
            f"{KEY_RULE}; got 201 characters",
        ),
        (
            ["a\tb"],
            f"{KEY_RULE}; got a control character at position 2",
        ),
        (
            ["aé"],
            f"{KEY_RULE}; got a non-ASCII character at position 2",
        ),
    ],
)
def test_idempotency_key_refusals(values: list[str], message: str) -> None:
    assert refusal(models.StartHeaders, {models.IDEMPOTENCY_HEADER: values}) == message


def test_idempotency_key_is_optional() -> None:
    assert models.validate(models.StartHeaders, {}).idempotency_key is None
    headers = models.validate(models.StartHeaders, {models.IDEMPOTENCY_HEADER: ["k 1"]})
    assert headers.idempotency_key == "k 1"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "missing field: kind (one of: gzip, objects)"),
        ({"kind": "GZIP"}, "unknown cleanup kind 'GZIP'; expected one of: gzip, objects"),
        ({"kind": None}, "unknown cleanup kind None; expected one of: gzip, objects"),
        ({"kind": "gzip", "timeout": "5"}, "timeout must be a number of seconds, got '5'"),
        ({"kind": "gzip", "timeout": True}, "timeout must be a number of seconds, got True"),
        ({"kind": "gzip", "timeout": None}, "timeout must be a number of seconds, got None"),
        ({"kind": "gzip", "timeout": 600.5}, "timeout must be between 0 and 600 seconds"),
        ({"kind": "gzip", "timeout": -1}, "timeout must be between 0 and 600 seconds"),
        ({"kind": "gzip", "timeout": 10**400}, "timeout must be between 0 and 600 seconds"),
        ({"kind": "gzip", "timeout": float("nan")}, "timeout must be between 0 and 600 seconds"),
        ({"kind": "gzip", "requested_by": ""}, "username must not be empty"),
        ({"kind": "gzip", "requested_by": None}, "username must be a string"),
    ],
)
def test_cleanup_refusals_keep_their_wording(data: dict[str, Any], message: str) -> None:
    assert refusal(models.CleanupRequest, data) == message


def test_cleanup_defaults() -> None:
    body = models.validate(models.CleanupRequest, {"kind": "objects", "timeout": 0})
    assert (body.kind, body.timeout, body.requested_by) == (CleanupKind.OBJECTS, 0.0, "admin")
    assert models.CleanupRequest.shape == '{"kind": "gzip"|"objects"}'


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (
            {"state": "IDLE"},
            f"state 'IDLE' is not one of: {STATES}",
        ),
        (
            {"docker_image_name": "a" * 501},
            "docker_image_name filter is longer than 500 characters",
        ),
        ({"docker_image_name": "a\x00"}, "docker_image_name filter contains control characters"),
        ({"username": " "}, "username must not be empty"),
        ({"page": "+3"}, "page must be an integer, got '+3'"),
        ({"page": "\u0663"}, "page must be an integer, got '\u0663'"),
        ({"page": "0"}, "page must be between 1 and 1000000, got 0"),
        ({"page": "0000"}, "page must be between 1 and 1000000, got 0000"),
        ({"page": "9" * 5000}, f"page must be between 1 and 1000000, got {'9' * 50}"),
        ({"page_size": "6"}, "page_size must be between 1 and 5, got 6"),
        ({"page_size": "x" * 80}, f"page_size must be an integer, got {'x' * 50!r}"),
        (
            {"page": "x", "state": "x"},
            f"state 'x' is not one of: {STATES}",
        ),
    ],
)
def test_query_refusals_keep_their_wording(query: dict[str, str], message: str) -> None:
    assert refusal(models.task_query(5), query) == message


def test_query_defaults_and_the_page_size_limit() -> None:
    query = models.validate(models.task_query(5), {})
    assert (query.state, query.username, query.page, query.page_size) == (None, None, 1, 10)
    assert models.validate(models.task_query(5), {"page_size": "5"}).page_size == 5
    assert models.task_query(5) is models.task_query(5)
    assert list(models.task_query(5).model_fields) == list(models.TaskQuery.model_fields)


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        (models.TaskPath, {"task_id": "x" * 200}, f"task_id {'x' * 100!r} is not a UUID"),
        (
            models.EventsQuery,
            {"include_progress": "maybe"},
            "include_progress must be true or false, got 'maybe'",
        ),
        (
            models.LiveEventsQuery,
            {"type": "nope"},
            "type 'nope' is not one of: requested, download_started, downloaded, compress_started, "
            "compressed, upload_started, uploaded, failed, progress",
        ),
    ],
)
def test_event_route_refusals_keep_their_wording(
    model: type[BaseModel], data: dict[str, str], message: str
) -> None:
    assert refusal(model, data) == message


def test_task_ids_are_normalised_and_flags_read() -> None:
    assert (
        models.validate(models.TaskPath, {"task_id": "{" + TASK_ID.upper() + "}"}).task_id
        == TASK_ID
    )
    assert (
        models.validate(models.EventsQuery, {"include_progress": " Off "}).include_progress is False
    )
    assert models.validate(models.EventsQuery, {}).include_progress is True
    assert (
        models.validate(models.StreamHeaders, {"Last-Event-ID": ["e1", "e2"]}).last_event_id == "e1"
    )
    assert models.validate(models.StreamHeaders, {"Last-Event-ID": [""]}).last_event_id is None


HOSTILE_TEXT = ["", " ", "x" * 10_000, "\x00", "\ud800", "é", "-1", "1.5", "true", "{}"]
HOSTILE_JSON: list[object] = [None, True, 0, -1, 1.5, 10**400, [], ["a"], {}, *HOSTILE_TEXT]
BODIES = [models.StartRequest, models.TokenStartRequest, models.CleanupRequest]
# what a path or query parameter can be (text), and a header (the list of its values)
PARAMETERS = [models.TaskPath, models.task_query(5), models.EventsQuery, models.LiveEventsQuery]
HEADERS = [models.StartHeaders, models.StreamHeaders]
CASES = [
    *((model, HOSTILE_JSON) for model in BODIES),
    *((model, HOSTILE_TEXT) for model in PARAMETERS),
    *((model, [[text] for text in HOSTILE_TEXT] + [HOSTILE_TEXT[:2]]) for model in HEADERS),
]


@pytest.mark.parametrize(
    ("model", "hostile"), CASES, ids=lambda case: getattr(case, "__name__", "values")
)
def test_every_field_words_its_own_refusals(model: type[BaseModel], hostile: list[object]) -> None:
    """Whatever a field can be sent, the refusal is a validator's wording, never pydantic's."""
    valid: dict[type[BaseModel], dict[str, Any]] = {
        models.StartRequest: START,
        models.TokenStartRequest: START,
        models.CleanupRequest: {"kind": "gzip"},
        models.TaskPath: {"task_id": TASK_ID},
    }
    for name, field in model.model_fields.items():
        key = field.validation_alias if isinstance(field.validation_alias, str) else name
        for value in hostile:
            data = {**valid.get(model, {}), key: value}
            try:
                models.validate(model, data)
            except InvalidInput as exc:
                message = str(exc)
                assert "Input should" not in message, (name, value, message)
                assert not message.startswith(f"{key}:"), (name, value, message)


# --- the answers ----------------------------------------------------------------------------

T0 = datetime(2025, 12, 10, 12, 25, 0, tzinfo=UTC)


def task_record(**changes: Any) -> TaskRecord:
    fields: dict[str, Any] = {
        "id": 1,
        "task_id": TASK_ID,
        "username": "alice",
        "docker_image_name": "nginx:latest",
        "gzip_file_name": None,
        "minio_object_name": None,
        "state": "compressing",
        "error_message": None,
        "start_time": T0,
        "end_time": None,
        "duration": None,
        "created_at": T0,
        "updated_at": T0,
    }
    return TaskRecord(**{**fields, **changes})


def test_a_task_answer_has_the_seed_shape() -> None:
    now = T0 + timedelta(seconds=2)
    answer = models.Task.of(task_record(), now).model_dump(mode="json")
    assert answer == {
        "task_id": TASK_ID,
        "state": "compressing",
        "state_display": "压缩镜像中",
        "docker_image_name": "nginx:latest",
        "gzip_file_name": None,
        "minio_object_name": None,
        "progress": 50,
        "duration": 2000,
        "username": "alice",
        "start_time": T0.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
        "end_time": None,
        "error_message": None,
    }
    assert list(answer) == list(models.Task.model_fields)


def test_a_detailed_task_adds_the_details_after_the_seed_fields() -> None:
    detail = TaskDetailRecord(
        task_id=TASK_ID, stage_bytes_done=1, stage_bytes_total=3, stage_rate=2.5
    )
    answer = models.TaskDetail.with_detail(task_record(duration=7), T0, detail).model_dump(
        mode="json"
    )
    assert list(answer)[:12] == list(models.Task.model_fields)
    assert answer["duration"] == 7
    assert answer["stage_progress"] == 33.3
    assert answer["stage_rate"] == 2.5
    assert answer["download_bytes_fetched"] is None


def test_event_answers_are_the_events_wire_form() -> None:
    event = Event(
        task_id=TASK_ID,
        payload=Downloaded(docker_image_name="nginx", image_id="sha256:1", tar_path="/x", bytes=5),
    )
    stored = {**event.to_dict(), "seq": 3}
    assert models.StoredEvent.model_validate(stored).model_dump(mode="json") == stored
    result = CleanupResult(kind=CleanupKind.GZIP, deleted=1, bytes_freed=2, errors=["e"])
    completed = result.completed("req-1").to_dict()
    dumped = models.CleanupCompletedEvent.model_validate(completed).model_dump(mode="json")
    assert dumped == completed
    assert list(dumped) == list(completed)

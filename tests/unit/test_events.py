from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from events import subjects
from events.cleanup import CleanupEvent
from events.limits import (
    BUCKET_MAX,
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
from events.schema import (
    PAYLOADS,
    Compressed,
    DecodeError,
    Downloaded,
    Event,
    EventType,
    Failed,
    Progress,
    Requested,
    UnknownEventType,
    Uploaded,
)
from events.states import TaskState

TASK = "550e8400-e29b-41d4-a716-446655440000"

SAMPLES = [
    Requested(username="u", docker_image_name="nginx:latest"),
    Compressed(
        docker_image_name="nginx",
        image_id="sha256:x",
        gzip_file_name="g",
        bytes_in=10,
        bytes_out=5,
        sha256="ab",
    ),
    Failed(stage="upload", reason="S3 at http://127.0.0.1:1/b: refused"),
    Progress(stage="download", bytes_done=5, bytes_total=None, rate=1.5),
]


@pytest.mark.parametrize("payload", SAMPLES, ids=lambda p: p.type.value)
def test_round_trip(payload) -> None:
    event = Event(task_id=TASK, payload=payload)
    assert Event.decode(event.encode()) == event


def test_wire_format_is_plain_json_without_nulls() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    event = Event(
        task_id=TASK, payload=Progress(stage="download", bytes_done=1), time=moment, event_id="e1"
    )
    assert json.loads(event.encode()) == {
        "event_id": "e1",
        "task_id": TASK,
        "type": "progress",
        "schema_version": 1,
        "time": "2026-01-02T03:04:05.678000Z",
        "payload": {"stage": "download", "bytes_done": 1, "rate": 0.0},
    }


def test_unknown_fields_are_ignored() -> None:
    raw = Event(task_id=TASK, payload=SAMPLES[0]).to_dict()
    raw["future_field"] = 1
    raw["payload"]["also_new"] = "x"
    assert Event.from_dict(raw).payload == SAMPLES[0]


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"type": "nope"}',
        b'{"type": "requested", "task_id": "t"}',
        b"\xff\xfe",
        b'{"type":"failed","task_id":"t","event_id":"e","time":"x","payload":{}}',
    ],
)
def test_decode_errors_keep_the_raw_bytes(raw: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        Event.decode(raw)
    assert info.value.raw == raw


def test_every_type_has_a_payload_and_state_moves_match_the_machine() -> None:
    assert set(PAYLOADS) == set(EventType)
    assert EventType.REQUESTED.target_state is TaskState.IDLE
    assert EventType.UPLOADED.target_state is TaskState.COMPLETED
    assert EventType.DOWNLOADED.target_state is None
    assert EventType.PROGRESS.target_state is None


def test_subjects() -> None:
    event = Event(task_id=TASK, payload=SAMPLES[0])
    assert subjects.for_event(event) == f"dcu.task.{TASK}.requested"
    assert subjects.one_task(TASK) == f"dcu.task.{TASK}.>"
    assert subjects.every_task(EventType.DOWNLOADED, "x") == "x.task.*.downloaded"
    assert subjects.all_events() == "dcu.>"


# -- the wire, byte for byte ----------------------------------------------------------


def test_wire_bytes_are_compact_ordered_utf8_with_microseconds() -> None:
    # Given an event with non-ASCII text, a time on a whole second and optional fields
    # left out
    moment = datetime(2026, 11, 27, 19, 40, 21, tzinfo=UTC)
    event = Event(
        task_id=TASK,
        event_id="e1",
        time=moment,
        payload=Failed(stage="download", reason="镜像 nicht gefunden"),
    )

    # Then the bytes are exactly what earlier versions wrote
    assert (
        event.encode()
        == (
            '{"event_id":"e1","task_id":"550e8400-e29b-41d4-a716-446655440000","type":"failed",'
            '"schema_version":1,"time":"2026-11-27T19:40:21.000000Z",'
            '"payload":{"stage":"download","reason":"镜像 nicht gefunden"}}'
        ).encode()
    )
    assert Event.decode(event.encode()).encode() == event.encode()


def test_times_in_other_zones_are_written_in_utc() -> None:
    from datetime import timedelta, timezone

    moment = datetime(2026, 1, 1, 8, 0, 0, 5, tzinfo=timezone(timedelta(hours=8)))
    event = Event(task_id=TASK, payload=SAMPLES[0], time=moment)
    assert event.to_dict()["time"] == "2026-01-01T00:00:00.000005Z"
    assert Event.decode(event.encode()).time == moment


def test_the_wire_keys_are_the_model_fields() -> None:
    assert set(Event.wire_order) == set(Event.model_fields)
    assert set(CleanupEvent.wire_order) == set(CleanupEvent.model_fields)


# -- validation -----------------------------------------------------------------------


def downloaded(**changes: object) -> dict[str, object]:
    """A valid ``downloaded`` event as decoded JSON, with ``changes`` to its payload."""
    payload = Downloaded(docker_image_name="nginx", image_id="sha256:1", tar_path="/t", bytes=5)
    data = Event(task_id=TASK, payload=payload).to_dict()
    data["payload"].update(changes)
    return data


INVALID_PAYLOADS = [
    pytest.param({"image_id": "i" * (IMAGE_ID_MAX + 1)}, "payload.downloaded.image_id", id="long"),
    pytest.param({"engine": "e" * (STAGE_MAX + 1)}, "payload.downloaded.engine", id="engine"),
    pytest.param({"platform": "p" * (PLATFORM_MAX + 1)}, "payload.downloaded.platform", id="pl"),
    pytest.param(
        {"manifest_digest": "d" * (MANIFEST_DIGEST_MAX + 1)},
        "payload.downloaded.manifest_digest",
        id="digest",
    ),
    pytest.param(
        {"reused_object": "o" * (OBJECT_NAME_MAX + 1)},
        "payload.downloaded.reused_object",
        id="reused",
    ),
    pytest.param({"bytes": -1}, "payload.downloaded.bytes", id="negative"),
    pytest.param({"bytes": COUNT_MAX + 1}, "payload.downloaded.bytes", id="huge"),
    pytest.param({"bytes": True}, "payload.downloaded.bytes", id="bool"),
    pytest.param({"bytes": "5"}, "payload.downloaded.bytes", id="string-count"),
    pytest.param({"bytes": 5.5}, "payload.downloaded.bytes", id="float-count"),
    pytest.param({"cached_bytes": -1}, "payload.downloaded.cached_bytes", id="cached"),
    pytest.param({"seconds": float("inf")}, "payload.downloaded.seconds", id="inf"),
    pytest.param({"engine": None}, "payload.downloaded.engine", id="null"),
    pytest.param({"platform": 5}, "payload.downloaded.platform", id="number-text"),
    pytest.param({"tar_path": "/t\ud800"}, "payload.downloaded.tar_path", id="surrogate"),
    pytest.param({"image_id": "\udcff"}, "payload.downloaded.image_id", id="bounded-surrogate"),
]


@pytest.mark.parametrize(("changes", "where"), INVALID_PAYLOADS)
def test_a_value_that_breaks_the_schema_is_refused_at_decode(
    changes: dict[str, object], where: str
) -> None:
    data = downloaded(**changes)
    raw = json.dumps(data).encode()
    with pytest.raises(DecodeError) as info:
        Event.decode(raw)
    assert not isinstance(info.value, UnknownEventType)
    assert info.value.raw == raw
    assert str(info.value).startswith(f"not a DCU event: {where}: ")
    with pytest.raises(DecodeError):
        Event.from_dict(data)


@pytest.mark.parametrize(("changes", "where"), INVALID_PAYLOADS)
def test_a_value_that_breaks_the_schema_cannot_be_built(
    changes: dict[str, object], where: str
) -> None:
    payload = downloaded()["payload"]
    assert isinstance(payload, dict)
    fields: dict[str, Any] = {**payload, **changes}
    with pytest.raises(ValidationError) as info:
        Downloaded(**fields)
    assert [error["loc"][0] for error in info.value.errors()] == [where.rsplit(".", 1)[1]]


def test_limits_are_those_of_events_limits() -> None:
    fits = Requested(username="u" * USERNAME_MAX, docker_image_name="i" * IMAGE_NAME_MAX)
    assert Event.decode(Event(task_id="t" * ID_MAX, payload=fits).encode()).payload == fits
    with pytest.raises(ValidationError):
        Requested(username="u" * (USERNAME_MAX + 1), docker_image_name="nginx")
    with pytest.raises(ValidationError):
        Requested(username="u", docker_image_name="i" * (IMAGE_NAME_MAX + 1))
    with pytest.raises(ValidationError):
        Event(task_id="t" * (ID_MAX + 1), payload=fits)
    with pytest.raises(ValidationError):
        Compressed(
            docker_image_name="n",
            image_id="i",
            gzip_file_name="g",
            bytes_in=1,
            bytes_out=1,
            sha256="a" * (SHA256_HEX_LEN + 1),
        )
    with pytest.raises(ValidationError):
        Uploaded(bucket="b" * (BUCKET_MAX + 1), minio_object_name="o", bytes=1, sha256="a")
    with pytest.raises(ValidationError):
        Progress(stage="download", bytes_done=1, rate=float("nan"))


@pytest.mark.parametrize("field", ["task_id", "event_id"])
def test_ids_hold_no_nul_and_no_lone_surrogate(field: str) -> None:
    for bad in ("a\x00b", "a\ud800"):
        data = Event(task_id=TASK, payload=SAMPLES[0]).to_dict()
        data[field] = bad
        with pytest.raises(DecodeError, match=field):
            Event.from_dict(data)
        with pytest.raises(ValidationError):
            Event(**{"task_id": TASK, "payload": SAMPLES[0], field: bad})  # type: ignore[arg-type]


def test_payload_text_may_hold_nul() -> None:
    event = Event(task_id=TASK, payload=Failed(stage="upload", reason="bad\x00byte"))
    decoded = Event.decode(event.encode())
    assert isinstance(decoded.payload, Failed) and decoded.payload.reason == "bad\x00byte"


def test_a_payload_that_does_not_match_its_type_is_refused() -> None:
    data = Event(task_id=TASK, payload=SAMPLES[0]).to_dict()
    data["type"] = "failed"
    with pytest.raises(DecodeError, match=r"payload\.failed\.stage"):
        Event.from_dict(data)
    with pytest.raises(ValidationError):
        Event(task_id=TASK, payload=SAMPLES[0], type=EventType.FAILED)


@pytest.mark.parametrize("missing", ["event_id", "task_id", "type", "time", "payload"])
def test_every_envelope_field_but_the_version_is_required_on_the_wire(missing: str) -> None:
    data = Event(task_id=TASK, payload=SAMPLES[0]).to_dict()
    del data[missing]
    with pytest.raises(DecodeError):
        Event.from_dict(data)


def test_a_missing_schema_version_is_version_1() -> None:
    data = Event(task_id=TASK, payload=SAMPLES[0]).to_dict()
    del data["schema_version"]
    assert Event.from_dict(data).schema_version == 1


def test_an_unknown_type_is_told_apart_only_in_a_well_formed_envelope() -> None:
    data = {**Event(task_id=TASK, payload=SAMPLES[0]).to_dict(), "type": "scanned"}
    with pytest.raises(UnknownEventType) as info:
        Event.from_dict({**data, "payload": {"anything": [1]}})
    assert info.value.event_type == "scanned"
    for broken in ({"time": "yesterday"}, {"task_id": "a\x00"}, {"type": "scan\ud800"}):
        with pytest.raises(DecodeError) as caught:
            Event.from_dict({**data, **broken})
        assert not isinstance(caught.value, UnknownEventType)


def test_from_dict_validates_the_parsed_dict_without_parsing_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given the dict a broker already parsed
    event = Event(task_id=TASK, payload=SAMPLES[1])
    data = json.loads(event.encode())

    # When no JSON parser is available any more
    def no_parsing(*args: object, **kwargs: object) -> object:
        raise AssertionError("JSON parsed a second time")

    monkeypatch.setattr(json, "loads", no_parsing)
    monkeypatch.setattr(json, "dumps", no_parsing)

    # Then the dict still becomes the event, and is left as it was
    assert Event.from_dict(data) == event
    assert data == event.to_dict()

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from events import subjects
from events.schema import (
    PAYLOADS,
    Compressed,
    DecodeError,
    Event,
    EventType,
    Failed,
    Progress,
    Requested,
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

"""The AsyncAPI document: valid against the official AsyncAPI 3.0.0 JSON Schema, and true
to the event models it is generated from."""

from __future__ import annotations

import copy
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from events import subjects
from events.cleanup import (
    CLEANUP_PAYLOADS,
    CleanupCompleted,
    CleanupEvent,
    CleanupEventType,
    CleanupKind,
    admin_request,
)
from events.limits import ID_MAX, OBJECT_NAME_MAX, PLATFORM_MAX, USERNAME_MAX
from events.schema import (
    PAYLOADS,
    Compressed,
    Downloaded,
    Event,
    EventType,
    Failed,
    Progress,
    Requested,
    Uploaded,
)
from gateway import asyncapi
from kernel.settings import NatsSettings

SPEC = Path(__file__).resolve().parent.parent / "schemas" / "asyncapi-3.0.0.json"
TASK = "550e8400-e29b-41d4-a716-446655440000"
NATS = NatsSettings(subject_prefix="acme", stream="ACME")


@pytest.fixture(scope="module")
def spec_validator() -> jsonschema.Draft7Validator:
    spec = json.loads(SPEC.read_text())
    jsonschema.Draft7Validator.check_schema(spec)
    return jsonschema.Draft7Validator(spec)


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return asyncapi.document(NATS)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def payload_schema(doc: dict[str, Any], message: str) -> dict[str, Any]:
    schema = resolve(doc, doc["components"]["messages"][message]["payload"]["$ref"])
    assert isinstance(schema, dict)
    return schema


def validate_event(doc: dict[str, Any], message: str, data: object) -> None:
    """Validate ``data`` against ``message``'s payload schema (refs into the document)."""
    root = {**doc["components"]["messages"][message]["payload"], "components": doc["components"]}
    jsonschema.Draft7Validator(root).validate(data)


def test_the_document_is_valid_asyncapi_3(
    doc: dict[str, Any], spec_validator: jsonschema.Draft7Validator
) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in spec_validator.iter_errors(doc)]
    assert errors == []
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] == "DCU events"
    assert doc["info"]["version"] == importlib.metadata.version("dcu")
    assert json.loads(json.dumps(doc)) == doc  # plain JSON, as it is served


def test_the_spec_validator_does_catch_a_broken_document(
    doc: dict[str, Any], spec_validator: jsonschema.Draft7Validator
) -> None:
    broken = copy.deepcopy(doc)
    broken["channels"]["progress"]["adress"] = "typo"
    broken["operations"]["send_progress"]["action"] = "publish"  # AsyncAPI 2 wording
    assert len(list(spec_validator.iter_errors(broken))) >= 2


def test_every_event_type_has_a_message_on_its_subject(doc: dict[str, Any]) -> None:
    channels = doc["channels"]
    for event_type in EventType:
        key = "progress" if event_type is EventType.PROGRESS else f"task.{event_type}"
        channel = channels[key]
        # The address is the one events.subjects publishes to, under the configured prefix
        assert channel["address"].replace("{task_id}", TASK) == subjects.task_event(
            TASK, event_type, "acme"
        )
        [message] = channel["messages"].values()
        assert message == {"$ref": f"#/components/messages/{key}"}
        schema = payload_schema(doc, key)
        assert schema["properties"]["type"]["const"] == event_type.value
        payload = schema["properties"]["payload"]["$ref"]
        assert payload == f"#/components/schemas/{PAYLOADS[event_type].__name__}"
        assert "task_id" in schema["required"]
    for cleanup_type in CleanupEventType:
        key = f"cleanup.{cleanup_type}"
        for kind in CleanupKind:
            assert channels[key]["address"].replace("{kind}", kind) == subjects.cleanup(
                kind, cleanup_type, "acme"
            )
        assert channels[key]["parameters"]["kind"]["enum"] == [str(k) for k in CleanupKind]
        schema = payload_schema(doc, key)
        assert schema["properties"]["type"]["const"] == cleanup_type.value
        assert schema["properties"]["payload"]["$ref"].endswith(
            f"/{CLEANUP_PAYLOADS[cleanup_type].__name__}"
        )
    assert channels["dead"]["address"] == "acme.dead.{queue}"
    assert all(c["address"].startswith("acme.") for c in channels.values())
    assert len(channels) == len(EventType) + len(CleanupEventType) + 1


def test_every_message_is_sent_and_operations_point_at_their_channel(
    doc: dict[str, Any],
) -> None:
    operations = doc["operations"]
    sent = {op["channel"]["$ref"] for op in operations.values() if op["action"] == "send"}
    assert sent == {f"#/channels/{key}" for key in doc["channels"]}
    received = {op["channel"]["$ref"] for op in operations.values() if op["action"] == "receive"}
    assert "#/channels/task.requested" in received and "#/channels/cleanup.requested" in received
    for operation in operations.values():
        channel = resolve(doc, operation["channel"]["$ref"])
        for message in operation["messages"]:
            assert resolve(doc, message["$ref"]) in channel["messages"].values()


def test_limits_in_the_schemas_are_those_of_events_limits(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    assert schemas["Requested"]["properties"]["username"]["maxLength"] == USERNAME_MAX
    assert schemas["RequestedEvent"]["properties"]["task_id"]["maxLength"] == ID_MAX
    assert schemas["Compressed"]["properties"]["gzip_file_name"]["maxLength"] == OBJECT_NAME_MAX
    platform = schemas["Downloaded"]["properties"]["platform"]["anyOf"][0]
    assert platform["maxLength"] == PLATFORM_MAX
    assert schemas["Progress"]["properties"]["bytes_done"]["minimum"] == 0
    assert schemas["Progress"]["properties"]["bytes_done"]["type"] == "integer"


def test_no_ref_dangles(doc: dict[str, Any]) -> None:
    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return found + [ref for value in node.values() for ref in refs(value)]
        if isinstance(node, list):
            return [ref for value in node for ref in refs(value)]
        return []

    everything = refs(doc)
    assert everything
    for ref in everything:
        resolve(doc, ref)
    assert "$defs" not in json.dumps(doc)


SAMPLES = [
    Requested(username="alice", docker_image_name="nginx:latest", platform="linux/arm64"),
    Downloaded(
        docker_image_name="docker.io/library/nginx:latest",
        image_id="sha256:" + "a" * 64,
        tar_path="/w/plan.json",
        bytes=191_234_048,
        engine="registry",
        layout="blobs",
        fetched_bytes=1,
        cached_bytes=2,
    ),
    Compressed(
        docker_image_name="nginx",
        image_id="sha256:1",
        gzip_file_name="g.tar.gz",
        bytes_in=10,
        bytes_out=5,
        sha256="a" * 64,
        method="splice",
    ),
    Uploaded(bucket="b", minio_object_name="o", bytes=5, sha256="a" * 64),
    Failed(stage="download", reason="no such image"),
    Progress(stage="upload", bytes_done=5, bytes_total=10, rate=2.5),
]


@pytest.mark.parametrize("payload", SAMPLES, ids=lambda p: str(p.type))
def test_what_dcu_publishes_matches_its_message_schema(doc: dict[str, Any], payload: Any) -> None:
    event = Event(task_id=TASK, payload=payload)
    key = "progress" if event.type is EventType.PROGRESS else f"task.{event.type}"
    validate_event(doc, key, json.loads(event.encode()))


def test_cleanup_events_match_their_message_schemas(doc: dict[str, Any]) -> None:
    request = admin_request(CleanupKind.GZIP, "ops")
    validate_event(doc, "cleanup.requested", json.loads(request.encode()))
    done = CleanupEvent(
        kind=CleanupKind.GZIP,
        payload=CleanupCompleted(request_id=request.event_id, deleted=1, bytes_freed=2),
    )
    validate_event(doc, "cleanup.completed", json.loads(done.encode()))


def test_the_schemas_refuse_what_the_decoder_refuses(doc: dict[str, Any]) -> None:
    data = json.loads(Event(task_id=TASK, payload=SAMPLES[0]).encode())
    data["payload"]["username"] = "u" * (USERNAME_MAX + 1)
    with pytest.raises(jsonschema.ValidationError):
        validate_event(doc, "task.requested", data)
    data = json.loads(Event(task_id=TASK, payload=SAMPLES[-1]).encode())
    data["payload"]["bytes_done"] = -1
    with pytest.raises(jsonschema.ValidationError):
        validate_event(doc, "progress", data)
    data["payload"]["bytes_done"] = 1
    data["type"] = "failed"
    with pytest.raises(jsonschema.ValidationError):
        validate_event(doc, "progress", data)


def test_the_prefix_and_streams_come_from_the_settings() -> None:
    doc = asyncapi.document(NatsSettings())
    assert doc["channels"]["task.uploaded"]["address"] == "dcu.task.{task_id}.uploaded"
    assert "DCU_AUDIT" in doc["channels"]["task.uploaded"]["description"]
    assert "DCU_PROGRESS" in doc["channels"]["progress"]["description"]

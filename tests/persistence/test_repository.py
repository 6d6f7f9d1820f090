"""The repository contract, run against SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from datetime import timedelta

import pytest
from pydantic import ValidationError

from events.audit_archive import StoredMessage
from events.schema import (
    Compressed,
    DecodeError,
    Downloaded,
    Event,
    Failed,
    Progress,
    Requested,
)
from events.states import LEGAL_TRANSITIONS, TaskState, Verdict, decide
from kernel.errors import InvalidInput, NotFound
from persistence.database import Database, DatabaseError
from persistence.repository import (
    ERROR_MESSAGE_MAX,
    RAW_MAX,
    TRUNCATION_MARK,
    ApplyOutcome,
    RefusedEventRecord,
    TaskDetailRecord,
    TaskRecord,
    TaskRepository,
    UnstorableEvent,
)
from persistence.subscriber import Rebuild
from tests.persistence.conftest import T0, Timeline, table_columns, table_indexes

SEED_COLUMNS = {
    "id": False,
    "task_id": False,
    "username": False,
    "docker_image_name": False,
    "gzip_file_name": True,
    "minio_object_name": True,
    "state": False,
    "error_message": True,
    "start_time": False,
    "end_time": True,
    "duration": True,
    "created_at": False,
    "updated_at": False,
}


async def apply_all(repository: TaskRepository, events: list[Event], first_seq: int = 1) -> None:
    for seq, event in enumerate(events, start=first_seq):
        await repository.apply(event, seq)


def events_to(timeline: Timeline, state: TaskState) -> list[Event]:
    """Events that bring a new task to ``state`` along legal transitions."""
    path = timeline.happy_path()
    upto = {
        TaskState.IDLE: 1,
        TaskState.DOWNLOADING: 2,
        TaskState.COMPRESSING: 4,
        TaskState.UPLOADING: 6,
        TaskState.COMPLETED: 7,
    }
    if state is TaskState.FAILED:
        return [path[0], timeline.failed()]
    return path[: upto[state]]


def moving_event(timeline: Timeline, target: TaskState) -> Event:
    """A fresh event (new id) that asks ``timeline``'s task to move to ``target``."""
    if target is TaskState.IDLE:
        return timeline.event(Requested(username="test_user", docker_image_name="nginx:latest"))
    if target is TaskState.FAILED:
        return timeline.failed("late failure")
    index = {
        TaskState.DOWNLOADING: 1,
        TaskState.COMPRESSING: 3,
        TaskState.UPLOADING: 5,
        TaskState.COMPLETED: 6,
    }
    return timeline.event(Timeline(timeline.task_id).happy_path()[index[target]].payload)


# -- schema ---------------------------------------------------------------------------


async def test_dcu_tasks_has_the_seed_columns_and_indexes(database: Database) -> None:
    columns = await table_columns(database, "dcu_tasks")
    indexes = await table_indexes(database, "dcu_tasks")

    assert columns == SEED_COLUMNS
    assert indexes == {
        ("task_id",): True,
        ("username",): False,
        ("docker_image_name",): False,
        ("state",): False,
        ("start_time",): False,
    }


async def test_side_tables_are_keyed_for_idempotency(database: Database) -> None:
    transitions = await table_indexes(database, "dcu_task_transitions")
    details = await table_indexes(database, "dcu_task_details")

    assert transitions == {("event_id",): True, ("task_id",): False}
    assert details == {("task_id",): True}


async def test_every_task_detail_but_its_key_is_optional(database: Database) -> None:
    columns = await table_columns(database, "dcu_task_details")

    assert columns == {
        "id": False,
        "task_id": False,
        **{
            name: True
            for name in [
                "image_id",
                "tar_bytes",
                "archive_bytes",
                "archive_sha256",
                "bucket",
                "stage",
                "stage_bytes_done",
                "stage_bytes_total",
                "stage_rate",
                "progress_time",
                "platform",
                "manifest_digest",
                "engine",
                "reused",
                "fetched_bytes",
                "cached_bytes",
                "archive_format",
                "images",
                "shared_bytes",
            ]
        },
    }


async def test_refused_events_are_keyed_by_stream_position(database: Database) -> None:
    columns = await table_columns(database, "dcu_refused_events")
    indexes = await table_indexes(database, "dcu_refused_events")

    assert indexes == {("stream", "stream_seq"): True}
    assert columns == {
        "id": False,
        "stream": False,
        "stream_seq": False,
        "subject": False,
        "event_id": True,
        "task_id": True,
        "event_type": True,
        "reason": False,
        "raw": False,
        "raw_truncated": False,
        "time": False,
    }


# -- the pipeline ---------------------------------------------------------------------


async def test_happy_path_completes_the_task(repository: TaskRepository) -> None:
    # Given the events of a successful pipeline
    timeline = Timeline()
    events = timeline.happy_path()

    # When they are applied in order
    outcomes = [await repository.apply(event, seq) for seq, event in enumerate(events, 1)]

    # Then the task is completed, named and timed by the events themselves
    assert outcomes == [ApplyOutcome.APPLIED] * len(events)
    task = await repository.get(timeline.task_id)
    start, end = events[0].time, events[-1].time
    assert task == TaskRecord(
        id=task.id,
        task_id=timeline.task_id,
        username="test_user",
        docker_image_name="nginx:latest",
        gzip_file_name="./data/gzip/nginx_latest.tar.gz",
        minio_object_name="dcu/nginx_latest.tar.gz",
        state=TaskState.COMPLETED,
        error_message=None,
        start_time=start,
        end_time=end,
        duration=(end - start) // timedelta(milliseconds=1),
        created_at=start,
        updated_at=end,
    )
    assert task.duration == 9000
    assert (task.progress, task.state_display) == (100, "已完成")
    detail = await repository.get_detail(timeline.task_id)
    assert detail is not None
    assert (detail.image_id, detail.tar_bytes, detail.archive_bytes) == ("sha256:abc", 1000, 400)
    assert (detail.archive_sha256, detail.bucket) == ("f" * 64, "dcu-artifacts")

    log = await repository.transitions(timeline.task_id)
    assert [(t.from_state, t.to_state) for t in log] == [
        (None, TaskState.IDLE),
        (TaskState.IDLE, TaskState.DOWNLOADING),
        (TaskState.DOWNLOADING, TaskState.DOWNLOADING),
        (TaskState.DOWNLOADING, TaskState.COMPRESSING),
        (TaskState.COMPRESSING, TaskState.COMPRESSING),
        (TaskState.COMPRESSING, TaskState.UPLOADING),
        (TaskState.UPLOADING, TaskState.COMPLETED),
    ]
    assert all(t.applied and t.error is None for t in log)
    assert [t.stream_seq for t in log] == list(range(1, 8))
    assert [t.event_id for t in log] == [e.event_id for e in events]
    assert [t.time for t in log] == [e.time for e in events]


# -- the registry engine's facts --------------------------------------------------------

DIGEST = "sha256:" + "d" * 64


def with_payload(event: Event, **changes: object) -> Event:
    """``event`` (same id and time) with some payload fields changed (and validated)."""
    payload = type(event.payload).model_validate({**event.payload.model_dump(), **changes})
    return Event(task_id=event.task_id, event_id=event.event_id, time=event.time, payload=payload)


async def replay_raw(repository: TaskRepository, data: bytes, seq: int) -> Rebuild:
    """Feed ``data`` to the repository as the subscriber's replay does (refusing what it
    cannot decode into ``dcu_refused_events``)."""
    rebuild = Rebuild(repository)
    await rebuild.apply(
        StoredMessage(
            stream="DCU_AUDIT", seq=seq, subject="dcu.task.t.x", time=T0, msg_id="m", data=data
        )
    )
    return rebuild


def registry_path(timeline: Timeline, *, reused_object: str | None = None) -> list[Event]:
    """The happy path of a task that asked for ``linux/arm64``, served by the registry
    engine from a multi-platform image."""
    path = timeline.happy_path()
    path[0] = with_payload(path[0], platform="linux/arm64")
    path[2] = with_payload(
        path[2],
        tar_path="/work/plan.json",
        engine="registry",
        layout="blobs",
        manifest_digest=DIGEST,
        platform="linux/arm64",
        fetched_bytes=600,
        cached_bytes=400,
        reused_object=reused_object,
    )
    return path


async def test_a_registry_engine_task_records_its_platform_digest_and_bytes(
    repository: TaskRepository,
) -> None:
    # Given a task that asked for linux/arm64
    timeline = Timeline()
    events = registry_path(timeline)
    await repository.apply(events[0], 1)
    detail = await repository.get_detail(timeline.task_id)
    assert detail is not None and detail.platform == "linux/arm64"
    assert (detail.engine, detail.reused, detail.image_id) == (None, None, None)

    # When the registry engine downloads, compresses and uploads it
    await apply_all(repository, events[1:], first_seq=2)

    # Then its details hold what the engine reported
    assert (await repository.get(timeline.task_id)).state is TaskState.COMPLETED
    detail = await repository.get_detail(timeline.task_id)
    assert detail == TaskDetailRecord(
        task_id=timeline.task_id,
        image_id="sha256:abc",
        tar_bytes=1000,
        archive_bytes=400,
        archive_sha256="f" * 64,
        bucket="dcu-artifacts",
        stage=None,
        stage_bytes_done=None,
        stage_bytes_total=None,
        stage_rate=None,
        progress_time=None,
        platform="linux/arm64",
        manifest_digest=DIGEST,
        engine="registry",
        reused=False,
        fetched_bytes=600,
        cached_bytes=400,
    )


async def test_a_docker_engine_task_keeps_the_platform_it_asked_for(
    repository: TaskRepository,
) -> None:
    # Given a task that asked for a platform, served by the docker engine (old events)
    timeline = Timeline()
    events = timeline.happy_path()
    events[0] = with_payload(events[0], platform="linux/amd64")

    await apply_all(repository, events)

    # Then the download names neither platform nor digest, and the request's stays
    detail = await repository.get_detail(timeline.task_id)
    assert detail is not None
    assert (detail.platform, detail.manifest_digest, detail.engine) == (
        "linux/amd64",
        None,
        "docker",
    )
    assert (detail.reused, detail.fetched_bytes, detail.cached_bytes) == (False, None, None)


async def test_a_task_without_a_platform_has_no_details_until_it_runs(
    repository: TaskRepository,
) -> None:
    timeline = Timeline()
    await repository.create_if_absent(timeline.requested())

    assert await repository.get_detail(timeline.task_id) is None


async def test_create_if_absent_records_the_requested_platform(
    repository: TaskRepository,
) -> None:
    timeline = Timeline()
    requested = timeline.requested(platform="linux/arm/v7")

    await repository.create_if_absent(requested)
    assert await repository.apply(requested, 1) is ApplyOutcome.DUPLICATE

    detail = await repository.get_detail(timeline.task_id)
    assert detail is not None and detail.platform == "linux/arm/v7"


@pytest.mark.parametrize(
    ("reused_object", "reused_from", "reused"),
    [
        pytest.param(None, None, False, id="built"),
        pytest.param("dcu/nginx_latest-1.tar.gz", None, True, id="reused-at-download"),
        pytest.param(None, "dcu/nginx_latest-1.tar.gz", True, id="reused-at-upload"),
        pytest.param(
            "dcu/nginx_latest-1.tar.gz", "dcu/nginx_latest-1.tar.gz", True, id="reused-both"
        ),
    ],
)
async def test_digest_reuse_is_recorded(
    repository: TaskRepository, reused_object: str | None, reused_from: str | None, reused: bool
) -> None:
    # Given a registry task whose download and upload say whether an archive was reused
    timeline = Timeline()
    events = registry_path(timeline, reused_object=reused_object)
    events[-1] = with_payload(
        events[-1], manifest_digest=DIGEST, platform="linux/arm64", reused_from=reused_from
    )

    # When they are applied, the download first
    await apply_all(repository, events[:3])
    detail = await repository.get_detail(timeline.task_id)
    assert detail is not None and detail.reused is (reused_object is not None)
    await apply_all(repository, events[3:], first_seq=4)

    # Then the task says whether it was reused
    detail = await repository.get_detail(timeline.task_id)
    assert detail is not None
    assert (detail.reused, detail.manifest_digest, detail.platform) == (
        reused,
        DIGEST,
        "linux/arm64",
    )


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        pytest.param({"engine": None}, "engine: Input should be a valid string", id="engine-null"),
        pytest.param(
            {"engine": "e" * 21}, "engine: String should have at most 20", id="engine-long"
        ),
        pytest.param(
            {"platform": 5}, "platform: Input should be a valid string", id="platform-number"
        ),
        pytest.param(
            {"platform": "p" * 65}, "platform: String should have at most 64", id="platform-long"
        ),
        pytest.param(
            {"manifest_digest": "sha256:" + "d" * 94},
            "manifest_digest: String should have at most 100",
            id="digest-long",
        ),
        pytest.param(
            {"fetched_bytes": "many"}, "fetched_bytes: Input should be a valid int", id="fetched"
        ),
        pytest.param(
            {"cached_bytes": -1},
            "cached_bytes: Input should be greater than or equal to 0",
            id="cached",
        ),
        pytest.param(
            {"reused_object": True}, "reused_object: Input should be a valid string", id="reused"
        ),
    ],
)
async def test_download_facts_that_do_not_fit_are_refused(
    repository: TaskRepository, changes: dict[str, object], error: str
) -> None:
    # Given a downloading task
    timeline = Timeline()
    events = registry_path(timeline)
    await apply_all(repository, events[:2])
    fields = {**events[2].payload.model_dump(), **changes}

    # When its download event carries a value that does not fit, it cannot be built...
    with pytest.raises(ValidationError):
        Downloaded.model_validate(fields)
    # ... nor decoded from the stream: persistence keeps it as a refused message
    data = {**events[2].to_dict(), "payload": fields}
    raw = json.dumps(data).encode()
    with pytest.raises(DecodeError, match=f"payload.downloaded.{error}"):
        Event.decode(raw)
    rebuild = await replay_raw(repository, raw, 3)

    # Then the refusal names the field, and no fact of the event is recorded
    assert rebuild.counts().refused == 1
    [refused] = await repository.refused_events()
    assert (refused.stream_seq, refused.event_id) == (3, events[2].event_id)
    assert refused.reason.startswith("not an event: not a DCU event: ")
    assert f"payload.downloaded.{error}" in refused.reason
    assert len(await repository.transitions(timeline.task_id)) == 2
    detail = await repository.get_detail(timeline.task_id)
    assert detail is not None and (detail.image_id, detail.engine) == (None, None)


async def test_a_requested_platform_that_does_not_fit_is_refused(
    repository: TaskRepository,
) -> None:
    timeline = Timeline()
    with pytest.raises(ValidationError, match="platform"):
        timeline.requested(platform="linux/" + "a" * 64)
    data = timeline.requested().to_dict()
    data["payload"]["platform"] = "linux/" + "a" * 64

    rebuild = await replay_raw(repository, json.dumps(data).encode(), 1)

    assert rebuild.counts().refused == 1
    [refused] = await repository.refused_events()
    assert "payload.requested.platform: String should have at most 64" in refused.reason
    with pytest.raises(NotFound):
        await repository.get(timeline.task_id)
    assert await repository.get_detail(timeline.task_id) is None


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(TaskState.IDLE, id="idle"),
        pytest.param(TaskState.DOWNLOADING, id="downloading"),
        pytest.param(TaskState.COMPRESSING, id="compressing"),
        pytest.param(TaskState.UPLOADING, id="uploading"),
    ],
)
async def test_failure_records_the_error_and_ends_the_task(
    repository: TaskRepository, state: TaskState
) -> None:
    timeline = Timeline()
    events = events_to(timeline, state)
    await apply_all(repository, events)
    failure = timeline.failed("no such image: nginx:nope")

    assert await repository.apply(failure, len(events) + 1) is ApplyOutcome.APPLIED

    task = await repository.get(timeline.task_id)
    assert task.state is TaskState.FAILED
    assert task.error_message == "no such image: nginx:nope"
    assert task.end_time == failure.time
    assert task.updated_at == failure.time
    assert task.duration == (failure.time - events[0].time) // timedelta(milliseconds=1)
    assert (task.progress, task.state_display) == (-1, "失败")


async def test_a_long_failure_reason_keeps_its_start_and_says_it_was_cut(
    repository: TaskRepository,
) -> None:
    timeline = Timeline()
    await repository.apply(timeline.requested(), 1)
    reason = "x" * 1500 + "y" * 1500

    await repository.apply(timeline.failed(reason), 2)

    message = (await repository.get(timeline.task_id)).error_message
    assert message is not None
    assert len(message) == ERROR_MESSAGE_MAX
    assert message.startswith("x" * 1500 + "y")
    assert message.endswith(TRUNCATION_MARK)


async def test_every_illegal_or_repeated_move_is_recorded_and_changes_nothing(
    repository: TaskRepository,
) -> None:
    checked = 0
    for current in TaskState:
        for target in TaskState:
            decision = decide(current, target)
            if decision.verdict is Verdict.APPLY:
                continue
            # Given a task in ``current``
            timeline = Timeline()
            events = events_to(timeline, current)
            await apply_all(repository, events)
            before = await repository.get(timeline.task_id)
            detail_before = await repository.get_detail(timeline.task_id)
            # When an event asks for a move the state machine does not allow from there
            event = moving_event(timeline, target)
            outcome = await repository.apply(event, 100)
            # Then it is recorded as refused and the task row is untouched
            pair = f"{current} -> {target}"
            assert await repository.get(timeline.task_id) == before, pair
            assert await repository.get_detail(timeline.task_id) == detail_before, pair
            last = (await repository.transitions(timeline.task_id))[-1]
            assert last.event_id == event.event_id, pair
            assert last.applied is False, pair
            if target is TaskState.IDLE:
                assert outcome is ApplyOutcome.DUPLICATE, pair
                assert last.error == "task already exists", pair
            elif decision.verdict is Verdict.ALREADY:
                assert outcome is ApplyOutcome.ALREADY, pair
                assert last.error == f"already {target}", pair
            else:
                assert outcome is ApplyOutcome.ILLEGAL, pair
                assert last.error == f"illegal transition {current} -> {target}", pair
            assert (last.from_state, last.to_state) == (current, target), pair
            checked += 1
    assert checked == len(TaskState) ** 2 - len(LEGAL_TRANSITIONS)


async def test_late_facts_do_not_touch_a_terminal_task(repository: TaskRepository) -> None:
    timeline = Timeline()
    events = timeline.happy_path()
    await apply_all(repository, events)
    before = await repository.get(timeline.task_id)
    late = timeline.event(
        Compressed(
            docker_image_name="nginx:latest",
            image_id="sha256:other",
            gzip_file_name="./data/gzip/other.tar.gz",
            bytes_in=1,
            bytes_out=1,
            sha256="0" * 64,
        )
    )

    assert await repository.apply(late, 50) is ApplyOutcome.ALREADY

    assert await repository.get(timeline.task_id) == before
    detail = await repository.get_detail(timeline.task_id)
    assert detail is not None and detail.image_id == "sha256:abc"


async def test_a_redelivered_event_changes_nothing(repository: TaskRepository) -> None:
    timeline = Timeline()
    events = timeline.happy_path()[:3]
    await apply_all(repository, events)
    before = await repository.get(timeline.task_id)
    log_before = await repository.transitions(timeline.task_id)

    for event in events:
        assert await repository.apply(event, 99) is ApplyOutcome.DUPLICATE

    assert await repository.get(timeline.task_id) == before
    assert await repository.transitions(timeline.task_id) == log_before


async def test_an_event_for_an_unknown_task_is_logged_not_applied(
    repository: TaskRepository,
) -> None:
    timeline = Timeline()
    event = timeline.event(Failed(stage="download", reason="boom"))

    assert await repository.apply(event, 7) is ApplyOutcome.UNKNOWN_TASK

    with pytest.raises(NotFound):
        await repository.get(timeline.task_id)
    [entry] = await repository.transitions(timeline.task_id)
    assert (entry.applied, entry.error, entry.stream_seq) == (False, "unknown task", 7)
    assert (entry.from_state, entry.to_state) == (None, TaskState.FAILED)
    assert await repository.apply(event, 7) is ApplyOutcome.DUPLICATE


async def test_create_if_absent_then_apply_is_a_no_op(repository: TaskRepository) -> None:
    # Given the gateway created the task right after publishing its event
    timeline = Timeline()
    requested = timeline.requested("busybox:1.36", "alice")
    created = await repository.create_if_absent(requested)
    assert created == await repository.get(timeline.task_id)
    assert (created.state, created.start_time, created.username) == (
        TaskState.IDLE,
        requested.time,
        "alice",
    )

    # When the subscriber applies the same event from the stream
    outcome = await repository.apply(requested, 42)

    # Then nothing changes but the log learns the event's stream position
    assert outcome is ApplyOutcome.DUPLICATE
    assert await repository.get(timeline.task_id) == created
    [entry] = await repository.transitions(timeline.task_id)
    assert (entry.stream_seq, entry.applied, entry.to_state) == (42, True, TaskState.IDLE)
    assert await repository.create_if_absent(requested) == created


async def test_create_if_absent_after_apply_returns_the_row(repository: TaskRepository) -> None:
    timeline = Timeline()
    requested = timeline.requested()
    await repository.apply(requested, 1)

    record = await repository.create_if_absent(requested)

    assert record == await repository.get(timeline.task_id)
    assert len(await repository.transitions(timeline.task_id)) == 1


async def test_create_if_absent_refuses_other_events_and_bad_values(
    repository: TaskRepository,
) -> None:
    timeline = Timeline()
    with pytest.raises(ValueError):
        await repository.create_if_absent(timeline.failed())
    with pytest.raises(ValidationError):  # a value that does not fit cannot reach it
        await repository.create_if_absent(timeline.requested(user="u" * 101))
    with pytest.raises(NotFound):
        await repository.get(timeline.task_id)


async def test_values_that_do_not_fit_are_refused_not_retried(
    repository: TaskRepository,
) -> None:
    timeline = Timeline()
    with pytest.raises(ValidationError, match="docker_image_name"):
        timeline.requested(image="r/" + "i" * 600)
    too_long = timeline.requested().to_dict()
    too_long["payload"]["docker_image_name"] = "r/" + "i" * 600

    # Refused at decode: kept in dcu_refused_events, never retried, nothing logged
    rebuild = await replay_raw(repository, json.dumps(too_long).encode(), 1)
    assert rebuild.counts().refused == 1
    [refused] = await repository.refused_events()
    assert (refused.stream_seq, refused.task_id) == (1, timeline.task_id)
    assert (
        "payload.requested.docker_image_name: String should have at most 500 characters"
        in refused.reason
    )
    assert await repository.transitions(timeline.task_id) == []
    await repository.apply(timeline.requested(), 2)
    nul = timeline.event(Failed(stage="download", reason="bad\x00byte"))
    assert await repository.apply(nul, 3) is ApplyOutcome.APPLIED
    assert (await repository.get(timeline.task_id)).error_message == "bad\ufffdbyte"
    with pytest.raises(ValidationError, match="bytes"):
        Downloaded(docker_image_name="x", image_id="sha256:1", tar_path="/t", bytes="many")  # type: ignore[arg-type]


async def test_progress_is_one_upsert_that_never_goes_back(repository: TaskRepository) -> None:
    timeline = Timeline()
    await repository.apply(timeline.requested(), 1)
    before = await repository.get(timeline.task_id)
    first, second = timeline.progress(100), timeline.progress(600)

    assert await repository.apply(second, 3) is ApplyOutcome.PROGRESS
    assert await repository.apply(first, 2) is ApplyOutcome.PROGRESS  # older, arrives late

    detail = await repository.get_detail(timeline.task_id)
    assert detail is not None
    assert (detail.stage, detail.stage_bytes_done, detail.stage_bytes_total) == (
        "download",
        600,
        1000,
    )
    assert (detail.stage_rate, detail.progress_time) == (12.5, second.time)
    assert await repository.get(timeline.task_id) == before
    assert len(await repository.transitions(timeline.task_id)) == 1

    later = timeline.event(
        Downloaded(docker_image_name="x", image_id="sha256:1", tar_path="/t", bytes=5)
    )
    await repository.apply(later, 4)
    detail = await repository.get_detail(timeline.task_id)
    assert detail is not None
    assert (detail.stage_bytes_done, detail.tar_bytes) == (600, 5)


async def test_lookups(repository: TaskRepository) -> None:
    with pytest.raises(NotFound):
        await repository.get("nope")
    assert await repository.get_detail("nope") is None
    assert await repository.transitions("nope") == []
    timeline = Timeline()
    await repository.apply(timeline.requested(), 1)
    assert await repository.get_detail(timeline.task_id) is None


async def test_active_tasks_are_the_quiet_unfinished_ones(repository: TaskRepository) -> None:
    quiet, busy, done = Timeline(), Timeline(start=T0 + timedelta(hours=1)), Timeline()
    await apply_all(repository, events_to(quiet, TaskState.DOWNLOADING))
    await apply_all(repository, events_to(busy, TaskState.COMPRESSING), 10)
    await apply_all(repository, events_to(done, TaskState.COMPLETED), 20)

    stale = await repository.active_tasks(older_than=T0 + timedelta(minutes=30))

    assert [task.task_id for task in stale] == [quiet.task_id]
    everything = await repository.active_tasks(older_than=T0 + timedelta(days=1))
    assert {task.task_id for task in everything} == {quiet.task_id, busy.task_id}


async def test_count_active_counts_a_users_unfinished_tasks(repository: TaskRepository) -> None:
    # Given alice's tasks in every state, and bob's idle one
    for minute, state in enumerate(TaskState):
        timeline = Timeline(start=T0 + timedelta(minutes=minute))
        events = [timeline.requested(user="alice"), *events_to(timeline, state)[1:]]
        await apply_all(repository, events, 100 * minute)
    other = Timeline(start=T0 + timedelta(hours=1))
    await apply_all(repository, [other.requested(user="bob")], 1000)
    # Then only her idle and running ones count, and nobody else's
    running = {TaskState.IDLE, TaskState.DOWNLOADING, TaskState.COMPRESSING, TaskState.UPLOADING}
    assert await repository.count_active("alice") == len(running)
    assert await repository.count_active("bob") == 1
    assert await repository.count_active("carol") == 0
    assert await repository.count_active("Alice") == 0  # exact match, as stored


async def test_count_by_state_counts_every_state(repository: TaskRepository) -> None:
    # An empty database: every state listed, at zero
    assert await repository.count_by_state() == dict.fromkeys(TaskState, 0)
    # Given one task in each state and a second completed one
    for minute, state in enumerate(TaskState):
        timeline = Timeline(start=T0 + timedelta(minutes=minute))
        await apply_all(repository, events_to(timeline, state), 100 * minute)
    extra = Timeline(start=T0 + timedelta(hours=1))
    await apply_all(repository, events_to(extra, TaskState.COMPLETED), 1000)
    # Then the counts say so, on either backend (GROUP BY through Tortoise)
    expected = dict.fromkeys(TaskState, 1) | {TaskState.COMPLETED: 2}
    assert await repository.count_by_state() == expected


# -- query ----------------------------------------------------------------------------


async def test_query_filters_sorts_and_pages(repository: TaskRepository) -> None:
    # Given tasks started one minute apart (the last one is the newest)
    specs = [
        ("nginx:latest", "alice", TaskState.COMPLETED),
        ("library/NGINX:1.25", "bob", TaskState.FAILED),
        ("redis:7", "alice", TaskState.IDLE),
        ("my_app%v2:latest", "carol", TaskState.DOWNLOADING),
        ("myXapp-v2:latest", "carol", TaskState.IDLE),
        ("my\\app:1", "dave", TaskState.IDLE),
    ]
    ids = []
    for minute, (image, user, state) in enumerate(specs):
        timeline = Timeline(start=T0 + timedelta(minutes=minute))
        events = [timeline.requested(image, user), *events_to(timeline, state)[1:]]
        await apply_all(repository, events, 100 * minute)
        ids.append(timeline.task_id)

    async def found(**filters: object) -> tuple[int, list[int]]:
        total, items = await repository.query(page=1, page_size=50, **filters)  # type: ignore[arg-type]
        return total, [ids.index(item.task_id) for item in items]

    # Then every filter narrows the result, newest first
    assert await found() == (6, [5, 4, 3, 2, 1, 0])
    assert await found(docker_image_name="nginx") == (2, [1, 0])
    assert await found(docker_image_name="NgInX:1") == (1, [1])
    assert await found(docker_image_name="_app%") == (1, [3])
    assert await found(docker_image_name="my_app") == (1, [3])
    assert await found(docker_image_name="%") == (1, [3])
    assert await found(docker_image_name="\\app") == (1, [5])
    assert await found(username="alice") == (2, [2, 0])
    assert await found(username="ALICE") == (0, [])
    assert await found(state=TaskState.IDLE) == (3, [5, 4, 2])
    assert await found(username="carol", state=TaskState.IDLE) == (1, [4])
    assert await found(docker_image_name="", username=None, state=None) == (6, [5, 4, 3, 2, 1, 0])

    # And pages split the same order with the same total
    pages = [await repository.query(page=page, page_size=4) for page in (1, 2, 3)]
    assert [total for total, _ in pages] == [6, 6, 6]
    assert [[ids.index(t.task_id) for t in items] for _, items in pages] == [
        [5, 4, 3, 2],
        [1, 0],
        [],
    ]
    with pytest.raises(InvalidInput):
        await repository.query(page=0, page_size=10)
    with pytest.raises(InvalidInput):
        await repository.query(page=1, page_size=0)


async def test_query_breaks_start_time_ties_by_newest_id(repository: TaskRepository) -> None:
    same = [Timeline(), Timeline(), Timeline()]
    for seq, timeline in enumerate(same, 1):
        await repository.apply(timeline.requested(), seq)

    _, items = await repository.query(page=1, page_size=10)

    assert [item.task_id for item in items] == [t.task_id for t in reversed(same)]


async def test_records_are_frozen_plain_values(repository: TaskRepository) -> None:
    timeline = Timeline()
    record = await repository.create_if_absent(timeline.requested())
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.state = TaskState.FAILED  # type: ignore[misc]
    assert record.start_time.utcoffset() == timedelta(0)
    assert isinstance(record.state, TaskState)


async def test_event_times_in_other_zones_are_stored_as_utc(repository: TaskRepository) -> None:
    from datetime import timezone

    task_id = str(uuid.uuid4())
    shanghai = T0.astimezone(timezone(timedelta(hours=8)))
    event = Event(
        task_id=task_id,
        payload=Requested(username="u", docker_image_name="i"),
        time=shanghai,
    )
    await repository.apply(event, 1)
    record = await repository.get(task_id)
    assert record.start_time == T0
    assert record.start_time.tzinfo is not None and record.start_time.utcoffset() == timedelta(0)


async def test_concurrent_callers_share_one_repository(repository: TaskRepository) -> None:
    # Given many tasks handled at once, each created by both the gateway and the subscriber
    timelines = [Timeline() for _ in range(12)]

    async def one_task(index: int, timeline: Timeline) -> None:
        events = timeline.happy_path()
        created, applied = await asyncio.gather(
            repository.create_if_absent(events[0]), repository.apply(events[0], index * 10)
        )
        assert applied in {ApplyOutcome.APPLIED, ApplyOutcome.DUPLICATE}
        assert created.task_id == timeline.task_id
        for seq, event in enumerate(events[1:], index * 10 + 1):
            await asyncio.gather(repository.apply(event, seq), repository.get(timeline.task_id))

    # When they all run concurrently
    await asyncio.gather(*(one_task(i, t) for i, t in enumerate(timelines)))

    # Then every task completed with exactly one log row per event
    for timeline in timelines:
        assert (await repository.get(timeline.task_id)).state is TaskState.COMPLETED
        log = await repository.transitions(timeline.task_id)
        assert len(log) == 7
        assert all(entry.applied for entry in log)
        assert all(entry.stream_seq is not None for entry in log)


# -- refused messages -----------------------------------------------------------------


async def test_a_refused_message_is_recorded_once_as_storable_text(
    repository: TaskRepository,
) -> None:
    # Given a message with bytes that are not UTF-8, a NUL, and a lone surrogate in its ids
    refusal = {
        "stream": "DCU",
        "stream_seq": 42,
        "subject": "dcu.task.t1.requested",
        "reason": "not an event: task_id holds a lone surrogate (t\ud800)",
        "raw": b'{"task_id": "t\\ud800"}\xff\x00',
        "time": T0,
        "event_id": "e\x00",
        "task_id": "t\ud800",
        "event_type": "requested",
    }

    # When it is recorded, then recorded again (a redelivery, a replay)
    assert await repository.record_refused(**refusal) is True  # type: ignore[arg-type]
    assert await repository.record_refused(**refusal) is False  # type: ignore[arg-type]

    # Then it is kept once, every text escaped rather than refused by the database
    [record] = await repository.refused_events()
    assert record == RefusedEventRecord(
        id=record.id,
        stream="DCU",
        stream_seq=42,
        subject="dcu.task.t1.requested",
        event_id="e\\x00",
        task_id="t\\ud800",
        event_type="requested",
        reason="not an event: task_id holds a lone surrogate (t\\ud800)",
        raw='{"task_id": "t\\ud800"}\\xff\\x00',
        raw_truncated=False,
        time=T0,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.reason = "x"  # type: ignore[misc]


async def test_refused_messages_are_listed_newest_first_and_cut_when_long(
    repository: TaskRepository,
) -> None:
    for seq in (1, 2, 3):
        await repository.record_refused(
            stream="DCU",
            stream_seq=seq,
            subject="dcu.task.x.requested",
            reason="not an event",
            raw=b"a" * (RAW_MAX + seq - 2),
            time=T0 + timedelta(seconds=seq),
        )

    assert [r.stream_seq for r in await repository.refused_events()] == [3, 2, 1]
    [newest] = await repository.refused_events(limit=1)
    assert (len(newest.raw), newest.raw_truncated) == (RAW_MAX, True)
    assert [r.raw_truncated for r in await repository.refused_events()] == [True, False, False]
    with pytest.raises(InvalidInput):
        await repository.refused_events(limit=0)


async def test_a_value_the_driver_cannot_encode_is_unstorable_not_a_database_error(
    repository: TaskRepository,
) -> None:
    # Given an event holding a lone surrogate, which skipped validation (building or
    # decoding one refuses it)
    timeline = Timeline()
    with pytest.raises(ValidationError, match="surrogate"):
        timeline.requested(user="u\ud800")
    unchecked = Requested.model_construct(username="u\ud800", docker_image_name="nginx:latest")
    poisoned = Event(task_id=timeline.task_id, payload=unchecked, time=timeline.now)

    # When it is applied, the driver cannot encode it: retrying can never help
    with pytest.raises(UnstorableEvent) as info:
        await repository.apply(poisoned, 1)

    # Then it is not taken for a database failure, and nothing was written
    assert not isinstance(info.value, DatabaseError)
    str(info.value).encode()  # the message itself is storable text
    with pytest.raises(NotFound):
        await repository.get(timeline.task_id)
    assert await repository.transitions(timeline.task_id) == []
    with pytest.raises(UnstorableEvent):
        stage = Progress.model_construct(stage="d\udc00", bytes_done=5, rate=0.0)
        await repository.apply(timeline.event(stage), 2)

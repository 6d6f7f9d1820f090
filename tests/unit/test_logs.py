"""``kernel.logs``: the JSON formatter and the bound task context (no servers)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from events.schema import (
    Compressed,
    Downloaded,
    Event,
    Failed,
    Progress,
    Requested,
    UploadStarted,
)
from kernel import logs

Capture = tuple[logging.Logger, io.StringIO]


@pytest.fixture
def capture() -> Iterator[Capture]:
    """A logger writing JSON lines into a buffer through ``logs``' handler setup."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(logs.ContextFilter())
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger(f"test.logs.{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, buffer
    finally:
        logger.removeHandler(handler)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    text = buffer.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_a_record_is_one_json_object_with_utc_time_level_logger_and_message(
    capture: Capture,
) -> None:
    logger, buffer = capture

    logger.warning("task %s: %d layers", "t-1", 3)

    [line] = lines(buffer)
    assert list(line) == ["time", "level", "logger", "message"]
    assert line["level"] == "WARNING"
    assert line["logger"] == logger.name
    assert line["message"] == "task t-1: 3 layers"
    assert line["time"].endswith("Z")
    moment = datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert moment.utcoffset() == timedelta(0)


def test_an_exception_is_one_string_field_and_the_record_stays_one_line(capture: Capture) -> None:
    logger, buffer = capture
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logger.exception("applying failed\nsecond line")

    assert buffer.getvalue().count("\n") == 1
    [line] = lines(buffer)
    assert line["message"] == "applying failed\nsecond line"
    assert isinstance(line["exception"], str)
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "ValueError: bad\nthing" in line["exception"]


def test_non_ascii_is_written_as_is_and_a_lone_surrogate_does_not_lose_the_record(
    capture: Capture,
) -> None:
    logger, buffer = capture

    logger.info("镜像 %s 已下载 ✓", "nginx:ünïcode")
    logger.info("undecodable %s", b"\xff".decode("utf-8", "surrogateescape"))

    first, second = buffer.getvalue().splitlines()
    assert "镜像 nginx:ünïcode 已下载 ✓" in first  # not \\u escapes
    assert json.loads(first)["message"] == "镜像 nginx:ünïcode 已下载 ✓"
    second.encode("utf-8")  # writable as UTF-8
    assert json.loads(second)["message"] == "undecodable \\udcff"


def test_bound_fields_are_added_and_removed_with_the_block(capture: Capture) -> None:
    logger, buffer = capture

    with logs.bound(task_id="t-1", stage="download", event_id="e-1"):
        logger.info("inside")
        with logs.bound(stage="compress"):
            logger.info("nested")
        logger.info("inside again", extra={"event_id": "e-2"})
    logger.info("outside")

    inside, nested, again, outside = lines(buffer)
    assert (inside["task_id"], inside["stage"], inside["event_id"]) == ("t-1", "download", "e-1")
    assert (nested["task_id"], nested["stage"]) == ("t-1", "compress")
    assert again["stage"] == "download" and again["event_id"] == "e-2"  # extra= wins
    assert not set(outside) & set(logs.FIELDS)
    assert logs.current() == {}


async def test_tasks_handled_side_by_side_keep_their_own_fields(capture: Capture) -> None:
    logger, buffer = capture
    both_inside = asyncio.Barrier(2)

    async def handle(task_id: str) -> None:
        with logs.bound(task_id=task_id, stage="upload", event_id=f"event-of-{task_id}"):
            await both_inside.wait()  # both blocks are open at once
            logger.info("working on %s", task_id)
            await asyncio.to_thread(logger.info, "in a thread for %s", task_id)

    await asyncio.gather(handle("a"), handle("b"))

    found = lines(buffer)
    assert len(found) == 4
    for line in found:
        task_id = line["message"].rsplit(" ", 1)[-1]
        assert line["task_id"] == task_id
        assert line["event_id"] == f"event-of-{task_id}"


def test_configure_json_makes_warnings_records_and_replaces_only_its_own_handler() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    first = io.StringIO()
    second = io.StringIO()
    try:
        logs.configure("json", logging.INFO, first)
        handler = logs.configure("json", logging.INFO, second)
        assert [h for h in root.handlers if h not in before] == [handler]
        logging.getLogger("test.logs.configure").info("to the second stream")
        logging.getLogger("test.logs.configure").debug("below the level")
        assert first.getvalue() == ""
        [line] = lines(second)
        assert line["message"] == "to the second stream"
    finally:
        for added in [h for h in root.handlers if h not in before]:
            root.removeHandler(added)
        root.setLevel(level)
        logging.captureWarnings(False)


@pytest.mark.parametrize(
    ("payload", "stage"),
    [
        pytest.param(Requested(username="u", docker_image_name="a"), None, id="requested"),
        pytest.param(UploadStarted(), "upload", id="started"),
        pytest.param(
            Downloaded(docker_image_name="a", image_id="i", tar_path="", bytes=1),
            "download",
            id="downloaded",
        ),
        pytest.param(
            Compressed(
                docker_image_name="a",
                image_id="i",
                gzip_file_name="g",
                bytes_in=1,
                bytes_out=1,
                sha256="0" * 64,
            ),
            "compress",
            id="compressed",
        ),
        pytest.param(Failed(stage="compress", reason="r"), "compress", id="failed"),
        pytest.param(Progress(stage="upload", bytes_done=1), "upload", id="progress"),
    ],
)
def test_event_stage(payload: Any, stage: str | None) -> None:
    assert logs.event_stage(Event(task_id="t", payload=payload)) == stage

"""Turning task records into the seed's JSON shapes, and checking query parameters."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from events.limits import ID_MAX, IMAGE_NAME_MAX, USERNAME_MAX
from events.states import TaskState
from kernel.errors import InvalidInput

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
DEFAULT_PAGE_SIZE = 10
PAGE_MAX = 1_000_000
_INTEGER = re.compile(r"-?[0-9]+")


class TaskLike(Protocol):
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


def format_time(moment: datetime | None) -> str | None:
    """``2025-12-10 20:25:00`` in the server's local time zone, as the seed shows."""
    if moment is None:
        return None
    return moment.astimezone().strftime(TIME_FORMAT)


def elapsed_ms(task: TaskLike, now: datetime) -> int:
    """The stored duration once terminal; the live elapsed time while running."""
    if task.duration is not None:
        return task.duration
    return max(0, int((now - task.start_time).total_seconds() * 1000))


def task_view(
    task: TaskLike, now: datetime, detail: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    state = TaskState(task.state)
    view: dict[str, Any] = {
        "task_id": task.task_id,
        "state": state.value,
        "state_display": state.display,
        "docker_image_name": task.docker_image_name,
        "gzip_file_name": task.gzip_file_name,
        "minio_object_name": task.minio_object_name,
        "progress": state.progress,
        "duration": elapsed_ms(task, now),
        "username": task.username,
        "start_time": format_time(task.start_time),
        "end_time": format_time(task.end_time),
        "error_message": task.error_message,
    }
    if detail is not None:
        view.update(detail)
    return view


def check_task_id(raw: str) -> str:
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise InvalidInput(f"task_id {raw[:ID_MAX]!r} is not a UUID") from None


def check_username(raw: object) -> str:
    if not isinstance(raw, str):
        raise InvalidInput("username must be a string")
    if len(raw) > USERNAME_MAX:  # as sent, surrounding spaces included
        raise InvalidInput(f"username is longer than {USERNAME_MAX} characters")
    name = raw.strip()
    if not name:
        raise InvalidInput("username must not be empty")
    if any(not ch.isprintable() for ch in name):
        raise InvalidInput("username contains control characters")
    return name


@dataclass(frozen=True, slots=True)
class QueryParams:
    docker_image_name: str | None
    username: str | None
    state: TaskState | None
    page: int
    page_size: int


def _positive_int(params: Mapping[str, str], name: str, default: int, maximum: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not _INTEGER.fullmatch(raw):  # int() alone also takes " 5", "+5", "1_0", "\u0665"
        raise InvalidInput(f"{name} must be an integer, got {raw[:50]!r}")
    # more digits than any limit is out of range, and int() refuses past 4300 of them
    if len(raw) > 20 or not 1 <= int(raw) <= maximum:
        raise InvalidInput(f"{name} must be between 1 and {maximum}, got {raw[:50]}")
    return int(raw)


def parse_query(params: Mapping[str, str], max_page_size: int) -> QueryParams:
    """Validate ``/query`` parameters; raises InvalidInput naming the bad one."""
    state: TaskState | None = None
    raw_state = params.get("state")
    if raw_state:
        try:
            state = TaskState(raw_state)
        except ValueError:
            allowed = ", ".join(s.value for s in TaskState)
            raise InvalidInput(f"state {raw_state[:50]!r} is not one of: {allowed}") from None
    image = params.get("docker_image_name") or None
    if image is not None and len(image) > IMAGE_NAME_MAX:
        raise InvalidInput(f"docker_image_name filter is longer than {IMAGE_NAME_MAX} characters")
    if image is not None and not image.isprintable():  # NUL included: no driver sees it
        raise InvalidInput("docker_image_name filter contains control characters")
    username = params.get("username") or None
    if username is not None:
        username = check_username(username)
    return QueryParams(
        docker_image_name=image,
        username=username,
        state=state,
        page=_positive_int(params, "page", 1, PAGE_MAX),
        page_size=_positive_int(params, "page_size", DEFAULT_PAGE_SIZE, max_page_size),
    )

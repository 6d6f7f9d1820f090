"""Log records as text or as one JSON object per line, with the task they concern.

``log.format: json`` (``DCU_LOG_FORMAT=json``) writes every record as one line::

    {"time": "2026-11-27T19:40:21.123Z", "level": "INFO", "logger": "actors.stages",
     "message": "task 3f…: fetching 4 layers of …", "task_id": "3f…", "stage": "download",
     "event_id": "9a…"}

``task_id``, ``stage`` and ``event_id`` come from context variables that the code
handling an event binds for the duration (``with logs.bound(task_id=…, stage=…,
event_id=…)``): a stage worker while it runs a stage, the persistence subscriber while
it applies an event. Each asyncio task (and each thread) has its own context, so two
tasks handled side by side never see each other's ids; ``asyncio.to_thread`` carries the
caller's context into the thread. A record may also name them itself with ``extra=``,
which wins over the context. An exception is one string field (``exception``), so a
traceback never splits a record over several lines.

Only the record's own message (its format string with its arguments) and these fields are
written, never the record's other attributes: what a line holds is what the code chose to
log, and no code logs a secret (tokens, passwords, keys).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Literal, TextIO

from events.schema import Event, EventType, Failed, Progress, Stage

FIELDS = ("task_id", "stage", "event_id")

_task_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("dcu_task_id", default=None)
_stage: contextvars.ContextVar[str | None] = contextvars.ContextVar("dcu_stage", default=None)
_event_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("dcu_event_id", default=None)
_VARS = {"task_id": _task_id, "stage": _stage, "event_id": _event_id}

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "dcu"


@contextlib.contextmanager
def bound(
    *, task_id: str | None = None, stage: str | None = None, event_id: str | None = None
) -> Iterator[None]:
    """Name the task, stage and event the enclosed code works on in every record it logs
    (in the current context only). ``None`` leaves a field as the enclosing block set it."""
    wanted = {"task_id": task_id, "stage": stage, "event_id": event_id}
    tokens = [
        (_VARS[name], _VARS[name].set(value)) for name, value in wanted.items() if value is not None
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def event_stage(event: Event) -> str | None:
    """The stage ``event`` belongs to: a stage's ``*_started`` and completion events, a
    failure's or a progress report's own ``stage``; None for ``requested``."""
    payload = event.payload
    if isinstance(payload, Failed | Progress):
        return payload.stage
    stage = _STAGE_OF.get(event.type)
    return None if stage is None else stage.value


_STAGE_OF = {
    EventType.DOWNLOAD_STARTED: Stage.DOWNLOAD,
    EventType.DOWNLOADED: Stage.DOWNLOAD,
    EventType.COMPRESS_STARTED: Stage.COMPRESS,
    EventType.COMPRESSED: Stage.COMPRESS,
    EventType.UPLOAD_STARTED: Stage.UPLOAD,
    EventType.UPLOADED: Stage.UPLOAD,
}


def current() -> dict[str, str]:
    """The fields bound in the current context (those set, only)."""
    found = {name: var.get() for name, var in _VARS.items()}
    return {name: value for name, value in found.items() if value is not None}


class ContextFilter(logging.Filter):
    """Copies the bound fields onto each record (unless the record names them already
    through ``extra=``); attached to a handler, so records of every logger get them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in current().items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


def _writable(text: str) -> str:
    """``text`` with each lone surrogate (from undecodable bytes) as its escape, e.g.
    ``\\udcff``: such a character cannot be written as UTF-8, and the record would be lost
    to an encoding error."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _time(created: float) -> str:
    moment = datetime.fromtimestamp(created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str] = {
            "time": _time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is None:
                value = _VARS[name].get()
            if value is not None:
                line[name] = str(value)
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(
            {key: _writable(value) for key, value in line.items()}, ensure_ascii=False
        )


def configure(
    fmt: Literal["text", "json"], level: int = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Send every record to ``stream`` (stderr) in ``fmt`` through one root handler
    (replacing the one an earlier call added; other handlers stay); warnings become
    records too, so a JSON log stays all JSON. Returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    return handler

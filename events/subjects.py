"""The NATS subject scheme. Everything DCU publishes lives under one prefix (``dcu``).

Audit stream (``<stream>_AUDIT``): the facts, kept for audits and replay.

* ``dcu.task.<task_id>.<event_type>``: every lifecycle fact about a task. Follow one task
  with ``dcu.task.<task_id>.>``, one kind of fact with ``dcu.task.*.downloaded``.
* ``dcu.cleanup.<kind>.<event_type>``: scheduled and on-demand cleanup runs.

Progress stream (``<stream>_PROGRESS``): ``dcu.progress.<task_id>``, the latest progress
report of each running task (the stream keeps one per subject).

Work stream (``<stream>_WORK``): ``dcu.queue.<queue>`` (dramatiq messages sent to a
queue) and ``dcu.dead.<queue>`` (messages a stage gave up on, with the reason).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from events.schema import Event, EventType

if TYPE_CHECKING:  # events.cleanup builds its subjects here: no import at run time
    from events.cleanup import CleanupEvent

DEFAULT_PREFIX = "dcu"


def all_events(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.>"


def task_event(task_id: str, event_type: EventType, prefix: str = DEFAULT_PREFIX) -> str:
    """Where ``event_type`` events of ``task_id`` are published (progress included)."""
    if event_type is EventType.PROGRESS:
        return progress(task_id, prefix)
    return f"{prefix}.task.{task_id}.{event_type}"


def for_event(event: Event, prefix: str = DEFAULT_PREFIX) -> str:
    return task_event(event.task_id, event.type, prefix)


def one_task(task_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Every lifecycle fact of one task (its progress is on ``progress(task_id)``)."""
    return f"{prefix}.task.{task_id}.>"


def every_task(event_type: EventType | None = None, prefix: str = DEFAULT_PREFIX) -> str:
    if event_type is None:
        return f"{prefix}.task.>"
    return f"{prefix}.task.*.{event_type}"


def cleanup(kind: str, event_type: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``<prefix>.cleanup.<kind>.<type>`` (``kind``, ``event_type``: the cleanup enums)."""
    return f"{prefix}.cleanup.{kind}.{event_type}"


def for_cleanup(event: CleanupEvent, prefix: str = DEFAULT_PREFIX) -> str:
    return cleanup(event.kind, event.type, prefix)


def every_cleanup_kind(event_type: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``<prefix>.cleanup.*.<type>``: e.g. every cleanup request, whatever its kind."""
    return f"{prefix}.cleanup.*.{event_type}"


def all_cleanup(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.cleanup.>"


def progress(task_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.progress.{task_id}"


def every_progress(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.progress.*"


def every_queue(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.queue.>"


def every_dead(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.dead.>"


def is_token(text: str) -> bool:
    """Whether ``text`` is exactly one subject token (no dot, wildcard or whitespace), so
    a subject built from it names only what it should."""
    return bool(text) and not any(ch in ".*>" or ch.isspace() for ch in text)

"""The NATS subject scheme. Everything DCU publishes lives under one prefix (``dcu``).

* ``dcu.task.<task_id>.<event_type>``: every fact about a task. Follow one task with
  ``dcu.task.<task_id>.>``, one kind of fact with ``dcu.task.*.downloaded``.
* ``dcu.queue.<queue>``: dramatiq messages published by the broker (retries, direct sends).
* ``dcu.dead.<queue>``: messages a stage gave up on, with the reason.
* ``dcu.cleanup.<kind>.<event_type>``: scheduled and on-demand cleanup runs.
"""

from __future__ import annotations

from events.schema import Event, EventType

DEFAULT_PREFIX = "dcu"


def all_events(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.>"


def task_event(task_id: str, event_type: EventType, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.task.{task_id}.{event_type}"


def for_event(event: Event, prefix: str = DEFAULT_PREFIX) -> str:
    return task_event(event.task_id, event.type, prefix)


def one_task(task_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.task.{task_id}.>"


def every_task(event_type: EventType | None = None, prefix: str = DEFAULT_PREFIX) -> str:
    if event_type is None:
        return f"{prefix}.task.>"
    return f"{prefix}.task.*.{event_type}"

"""The stuck-task watchdog: a running task that stops making progress is failed, with why.

A running task (``downloading``, ``compressing``, ``uploading``) whose latest event in
the stream, last database change and last progress report are all older than
``workers.stuck_after`` has lost its workers, or they are wedged: the watchdog publishes
its ``failed`` event, so it never stays ``downloading`` forever. The stream is asked as
well as the database because the database may lag it (a slow or restarting persistence
subscriber); a task is failed only when both have been quiet that long.

A task that is waiting is never failed: ``idle`` (its ``requested`` event waits for a
download worker), or running with a finished stage as its latest event (``downloaded``
waits for a compress worker, ``compressed`` for an upload worker). It is merely queued
behind a backlog; with no worker of that stage at all it stays where it is until one
starts. The failure event has the task's once-per-task failure id, so several
persistence replicas sweeping at once fail it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from bus import StreamEvent
from events.schema import Event, EventType, Failed, Stage, once_per_task_id, utcnow
from events.states import TaskState
from kernel.errors import DcuError
from persistence.repository import TaskRecord, TaskRepository

log = logging.getLogger(__name__)

Publish = Callable[[Event], Awaitable[None]]


# The task's latest event in the stream, None when the stream holds none of it.
# Raises BusError when the stream cannot be asked.
LastEvent = Callable[[str], Awaitable[StreamEvent | None]]

# Which stage a running task in each state is waiting on.
_STAGE_OF = {
    TaskState.DOWNLOADING: Stage.DOWNLOAD,
    TaskState.COMPRESSING: Stage.COMPRESS,
    TaskState.UPLOADING: Stage.UPLOAD,
}
# A latest event that shows the task queued for its next stage, or already ended (the
# database has not caught up): nothing for the watchdog to do.
_NOT_RUNNING = frozenset(
    {EventType.DOWNLOADED, EventType.COMPRESSED, EventType.UPLOADED, EventType.FAILED}
)


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class StuckTaskWatchdog:
    def __init__(
        self,
        repository: TaskRepository,
        publish: Publish,
        last_event: LastEvent,
        *,
        stuck_after: float,
        interval: float,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._repository = repository
        self._publish = publish
        self._last_event = last_event
        self._stuck_after = stuck_after
        self._interval = interval
        self._clock = clock

    async def sweep(self) -> list[str]:
        """Fail every stuck task once; returns their ids. Raises DatabaseError/BusError."""
        now = self._clock()
        cutoff = now - timedelta(seconds=self._stuck_after)
        failed: list[str] = []
        for task in await self._repository.active_tasks(cutoff):
            failure = await self._stuck(task, now, cutoff)
            if failure is None:
                continue
            log.warning("task %s: %s", task.task_id, failure.reason)
            await self._publish(
                Event(
                    task_id=task.task_id,
                    payload=failure,
                    event_id=once_per_task_id(task.task_id, EventType.FAILED),
                )
            )
            failed.append(task.task_id)
        return failed

    async def _stuck(self, task: TaskRecord, now: datetime, cutoff: datetime) -> Failed | None:
        """The failure of ``task`` (unchanged in the database since before ``cutoff``)
        when it is stuck, saying what the watchdog saw; None when it is not stuck."""
        stage = _STAGE_OF.get(TaskState(task.state))
        if stage is None:
            return None  # idle: queued behind a backlog, not stuck
        detail = await self._repository.get_detail(task.task_id)
        progress_time = detail.progress_time if detail is not None else None
        if progress_time is not None and progress_time > cutoff:
            return None  # still reporting progress: slow, not stuck
        last = await self._last_event(task.task_id)
        if last is not None:
            if last.time > cutoff:
                log.info(
                    "task %s: the database lags the stream (%s at %s), not stuck",
                    task.task_id,
                    last.type,
                    _when(last.time),
                )
                return None
            if last.type in _NOT_RUNNING:
                log.debug("task %s: waiting after %s, not stuck", task.task_id, last.type)
                return None
            seen = (
                f"no event for {int((now - last.time).total_seconds())}s in the stream "
                f"(last: {last.type} at {_when(last.time)})"
            )
        else:
            seen = "no event of it in the stream"
        recorded = max(task.updated_at, progress_time or task.updated_at)
        reason = (
            f"stuck: {seen} and no progress since {_when(recorded)}, while {task.state} "
            f"(workers.stuck_after={self._stuck_after:g}s); its {stage} workers are gone "
            "or stalled"
        )
        return Failed(stage=str(stage), reason=reason)

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every ``interval`` seconds until ``stop`` is set; errors are logged."""
        while not stop.is_set():
            try:
                await self.sweep()
            except DcuError as exc:
                log.warning("stuck-task sweep failed: %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)

"""The stuck-task watchdog: a running task that stops making progress is failed, with why.

A task whose last event (and last progress report) is older than ``workers.stuck_after``
has lost its workers, or they are wedged: the watchdog publishes its ``failed`` event,
so it never stays ``downloading`` forever. The event has the task's once-per-task
failure id, so several persistence replicas sweeping at once fail it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from dcu.errors import DcuError
from events.schema import Event, EventType, Failed, Stage, once_per_task_id, utcnow
from events.states import TaskState
from persistence.repository import TaskRepository

log = logging.getLogger(__name__)

Publish = Callable[[Event], Awaitable[None]]

# Which stage a task in each state is waiting on.
_STAGE_OF = {
    TaskState.IDLE: Stage.DOWNLOAD,
    TaskState.DOWNLOADING: Stage.DOWNLOAD,
    TaskState.COMPRESSING: Stage.COMPRESS,
    TaskState.UPLOADING: Stage.UPLOAD,
}


class StuckTaskWatchdog:
    def __init__(
        self,
        repository: TaskRepository,
        publish: Publish,
        *,
        stuck_after: float,
        interval: float,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._repository = repository
        self._publish = publish
        self._stuck_after = stuck_after
        self._interval = interval
        self._clock = clock

    async def sweep(self) -> list[str]:
        """Fail every stuck task once; returns their ids. Raises DatabaseError/BusError."""
        now = self._clock()
        cutoff = now - timedelta(seconds=self._stuck_after)
        failed: list[str] = []
        for task in await self._repository.active_tasks(cutoff):
            detail = await self._repository.get_detail(task.task_id)
            if detail is not None and detail.progress_time and detail.progress_time > cutoff:
                continue  # still reporting progress: slow, not stuck
            state = TaskState(task.state)
            quiet = int((now - task.updated_at).total_seconds())
            reason = (
                f"stuck: no progress for {quiet}s while {state} "
                f"(workers.stuck_after={self._stuck_after:g}s); its "
                f"{_STAGE_OF.get(state, Stage.DOWNLOAD)} workers are gone or stalled"
            )
            log.warning("task %s: %s", task.task_id, reason)
            await self._publish(
                Event(
                    task_id=task.task_id,
                    payload=Failed(stage=str(_STAGE_OF.get(state, Stage.DOWNLOAD)), reason=reason),
                    event_id=once_per_task_id(task.task_id, EventType.FAILED),
                )
            )
            failed.append(task.task_id)
        return failed

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every ``interval`` seconds until ``stop`` is set; errors are logged."""
        while not stop.is_set():
            try:
                await self.sweep()
            except DcuError as exc:
                log.warning("stuck-task sweep failed: %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)

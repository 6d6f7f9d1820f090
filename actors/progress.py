"""Rate-limited progress reports: callbacks from any thread, at most one event a period."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType

from events.schema import Progress, Stage

log = logging.getLogger(__name__)


class ProgressReporter:
    """Collects ``(done, total)`` updates and emits a ``Progress`` payload every ``interval``.

    ``update`` may be called from worker threads (the gzip thread) or the loop; only the
    newest figures are kept, so a fast stage costs one event per interval, not per chunk.
    """

    def __init__(
        self,
        stage: Stage,
        emit: Callable[[Progress], Awaitable[None]],
        interval: float,
    ) -> None:
        self._stage = stage
        self._emit = emit
        self._interval = interval
        self._latest: tuple[int, int | None] | None = None
        self._sent: tuple[int, int | None] | None = None
        self._started = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def update(self, done: int, total: int | None) -> None:
        self._latest = (done, total)  # a tuple swap is atomic under the GIL

    def _payload(self, figures: tuple[int, int | None]) -> Progress:
        done, total = figures
        elapsed = max(time.monotonic() - self._started, 1e-6)
        return Progress(
            stage=str(self._stage),
            bytes_done=done,
            bytes_total=total,
            rate=round(done / elapsed, 1),
        )

    async def _flush(self) -> None:
        latest = self._latest
        if latest is None or latest == self._sent:
            return
        self._sent = latest
        try:
            await self._emit(self._payload(latest))
        except Exception as exc:  # progress is advisory: never fail a stage over it
            log.warning("progress event for %s not sent: %s", self._stage, exc)

    async def _run(self) -> None:
        # ``_closing`` ends the loop even when the cancellation does not arrive: Python
        # 3.11's ``asyncio.wait_for`` (under nats-py's publish) returns the result and
        # drops a cancellation that lands as its future completes, and this loop would
        # then run on, and ``__aexit__`` wait for it, forever. Seen once under load: a
        # compress stage that never ended.
        while not self._closing:
            await asyncio.sleep(self._interval)
            if not self._closing:
                await self._flush()

    async def __aenter__(self) -> ProgressReporter:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._closing = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if exc_type is None:
            await self._flush()

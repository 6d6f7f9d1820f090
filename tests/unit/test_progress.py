"""The progress reporter's lifecycle: it ends with its stage even when the cancellation
meant to stop it is lost in an emit."""

from __future__ import annotations

import asyncio

from actors.progress import ProgressReporter
from events.schema import Progress, Stage


async def test_the_reporter_ends_when_an_emit_swallows_its_cancellation() -> None:
    sent: list[Progress] = []
    emitting = asyncio.Event()

    async def emit(progress: Progress) -> None:
        # As ``asyncio.wait_for`` does in Python 3.11 when the awaited future completes
        # while the task is being cancelled: the result wins, the cancellation is lost.
        sent.append(progress)
        emitting.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return

    async def stage() -> None:
        async with ProgressReporter(Stage.COMPRESS, emit, interval=0.01) as reporter:
            reporter.update(10, 100)
            await emitting.wait()  # the stage ends while a progress event is in flight

    running = asyncio.create_task(stage())
    done, _ = await asyncio.wait({running}, timeout=30)  # a bound for the failure only
    running.cancel()
    assert running in done, "the stage never ended: its reporter ran on"
    assert [(p.bytes_done, p.bytes_total) for p in sent] == [(10, 100)]


async def test_the_last_figures_are_sent_when_the_stage_ends() -> None:
    sent: list[Progress] = []

    async def emit(progress: Progress) -> None:
        sent.append(progress)

    async with ProgressReporter(Stage.UPLOAD, emit, interval=3600) as reporter:
        reporter.update(1, 2)
        reporter.update(2, 2)
    assert [(p.stage, p.bytes_done) for p in sent] == [("upload", 2)]

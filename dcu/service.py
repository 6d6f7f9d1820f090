"""Components a ``dcu`` process is made of, each with start and stop, wired by ``dcu.cli``.

* ``StageWorkers``: the dramatiq worker running some stage actors on the JetStream broker.
* ``run_http``: the gateway (optionally with the persistence subscriber) until a signal.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable

import dramatiq

from actors.pipeline import Runtime, build_broker, declare_stage, worker_name
from dcu import bus
from dcu.settings import Settings
from events.schema import Stage

log = logging.getLogger(__name__)


def concurrency(settings: Settings, stage: Stage) -> int:
    workers = settings.workers
    return {
        Stage.DOWNLOAD: workers.download_concurrency,
        Stage.COMPRESS: workers.compress_concurrency,
        Stage.UPLOAD: workers.upload_concurrency,
    }[stage]


class StageWorkers:
    """One dramatiq ``Worker`` (dramatiq allows one per process) for the given stages.

    Per-stage concurrency is enforced by the broker's per-queue limit on messages in
    flight; the thread pool is the sum of those limits.
    """

    def __init__(self, settings: Settings, nats_url: str, stages: Iterable[Stage]) -> None:
        self.settings = settings
        self.stages = list(stages)
        self.runtime = Runtime(settings, nats_url, worker_name("+".join(self.stages)))
        self.broker = build_broker(settings, nats_url, self.runtime)
        limits = {str(s): concurrency(settings, s) for s in self.stages}
        self.broker.set_queue_limits(limits)
        for stage in self.stages:
            declare_stage(self.broker, self.runtime, stage)
        self.worker = dramatiq.Worker(
            self.broker,
            queues={str(s) for s in self.stages},
            worker_threads=sum(limits.values()),
            worker_timeout=250,
        )

    def start(self) -> None:
        self.worker.start()
        log.info("stage workers started: %s", ", ".join(self.stages))

    def stop(self) -> None:
        grace_ms = int(self.settings.workers.shutdown_grace * 1000)
        self.worker.stop(timeout=grace_ms)
        self.broker.close()
        log.info("stage workers stopped: %s", ", ".join(self.stages))


async def ensure_topology(settings: Settings, nats_url: str) -> None:
    """Create the audit stream before any consumer is declared on it."""
    nc = await bus.connect(nats_url, settings.nats, "dcu-setup")
    try:
        await bus.ensure_stream(nc.jetstream(), settings.nats)
    finally:
        await nc.close()


async def wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

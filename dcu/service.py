"""Components a ``dcu`` process is made of, each with start and stop, wired by ``dcu.cli``.

* ``StageWorkers``: the dramatiq worker running some roles (the stage actors and the
  cleanup actor) on the JetStream broker.
* ``run_http``: the gateway (optionally with the persistence subscriber) until a signal.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable

import dramatiq

from actors.cleanup import CLEANUP_QUEUE, declare_cleanup
from actors.pipeline import Runtime, build_broker, declare_stage, worker_name
from bus import Bus
from events.schema import Stage
from kernel.settings import Settings

log = logging.getLogger(__name__)


# Roles a worker process can run: the three stages and the cleanup actor.
ROLES: tuple[str, ...] = (*(s.value for s in Stage), CLEANUP_QUEUE)


def concurrency(settings: Settings, role: str) -> int:
    """Messages in flight for ``role``; cleanup runs one request at a time."""
    workers = settings.workers
    return {
        Stage.DOWNLOAD: workers.download_concurrency,
        Stage.COMPRESS: workers.compress_concurrency,
        Stage.UPLOAD: workers.upload_concurrency,
        CLEANUP_QUEUE: 1,
    }[role]


class StageWorkers:
    """One dramatiq ``Worker`` (dramatiq allows one per process) for the given roles
    (stage names and ``cleanup``; raises ValueError for another).

    Per-role concurrency is enforced by the broker's per-queue limit on messages in
    flight; the thread pool is the sum of those limits.
    """

    def __init__(self, settings: Settings, nats_url: str, roles: Iterable[str]) -> None:
        self.settings = settings
        self.stages = [str(r) for r in roles]
        unknown = [r for r in self.stages if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown worker roles {unknown}; expected some of {list(ROLES)}")
        self.runtime = Runtime(settings, nats_url, worker_name("+".join(self.stages)))
        self.broker = build_broker(settings, nats_url, self.runtime)
        limits = {s: concurrency(settings, s) for s in self.stages}
        self.broker.set_queue_limits(limits)
        for role in self.stages:
            if role == CLEANUP_QUEUE:
                declare_cleanup(self.broker, self.runtime)
            else:
                declare_stage(self.broker, self.runtime, Stage(role))
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


async def ensure_topology(
    settings: Settings, nats_url: str, *, apply: bool = False
) -> dict[str, list[str]]:
    """Set up the streams before any consumer is declared on them; returns where existing
    streams differ from the settings (see ``bus.streams.ensure_streams``)."""
    connection = await Bus.connect(nats_url, settings.nats, "dcu-setup")
    try:
        return await connection.ensure_streams(apply=apply)
    finally:
        await connection.close()


async def wait_for_signal(stop: asyncio.Event | None = None) -> None:
    """Return on SIGINT/SIGTERM, or when ``stop`` is set by someone else."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

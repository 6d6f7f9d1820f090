"""The roles a ``dcu`` process runs, each an async context manager, and ``run_roles``,
which starts the chosen ones side by side and stops them in reverse order of start.

* ``nats_resolved``: the settings with ``nats.url`` filled in (the configured server, or
  an embedded one started for the process); every role reads the URL from there.
* ``persistence_running`` (``persistence.runner``): the subscriber and the watchdog.
* ``workers_running``: the dramatiq worker for stage and cleanup roles.
* ``timer_running``, ``archiver_running``: the cleanup timer and the audit archiver.
* ``gateway_running``: the HTTP gateway, started last and stopped first, so it takes no
  request the other roles of the process could not serve.

Each role opens only the clients it uses (its own NATS connection, database, object
store); nothing is shared through module globals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import dramatiq
from aiohttp import web

from actors.archiver import AuditArchiver
from actors.cleanup import declare_cleanup
from actors.object_store import open_store
from actors.pipeline import Runtime, build_broker, declare_stage, worker_name
from actors.timer import CleanupTimer
from bus import Bus
from dcu.embedded import EmbeddedNats
from dcu.roles import ROLES
from events.cleanup import CLEANUP_QUEUE
from events.schema import Stage
from gateway.app import create_app
from kernel import diagnostics
from kernel.settings import Settings, is_loopback
from persistence.runner import persistence_running

log = logging.getLogger(__name__)


# Roles a worker process can run: the three stages and the cleanup actor.


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

    def __init__(self, settings: Settings, roles: Iterable[str]) -> None:
        self.settings = settings
        self.stages = [str(r) for r in roles]
        unknown = [r for r in self.stages if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown worker roles {unknown}; expected some of {list(ROLES)}")
        self.runtime = Runtime(settings, worker_name("+".join(self.stages)))
        self.broker = build_broker(settings, self.runtime)
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


async def ensure_topology(settings: Settings, *, apply: bool = False) -> dict[str, list[str]]:
    """Set up the streams before any consumer is declared on them; returns where existing
    streams differ from the settings (see ``bus.streams.ensure_streams``)."""
    connection = await Bus.connect(settings.nats.url, settings.nats, "dcu-setup")
    try:
        return await connection.ensure_streams(apply=apply)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def nats_resolved(settings: Settings) -> AsyncIterator[Settings]:
    """``settings`` with the effective ``nats.url``: the configured one, or that of an
    embedded server (its store under ``nats.data_dir``) run until the block ends."""
    if settings.nats.url:
        yield settings
        return
    embedded = EmbeddedNats(Path(settings.nats.data_dir))
    url = await asyncio.to_thread(embedded.start)
    try:
        yield settings.model_copy(update={"nats": settings.nats.model_copy(update={"url": url})})
    finally:
        embedded.stop()


@dataclass
class RolePlan:
    """Which roles one process runs (``dcu serve`` runs them all)."""

    http: bool = False
    persist: bool = False
    stages: list[str] = field(default_factory=list)
    timer: bool = False
    archiver: bool = False


@contextlib.asynccontextmanager
async def workers_running(settings: Settings, roles: list[str]) -> AsyncIterator[None]:
    workers = StageWorkers(settings, roles)
    workers.start()
    try:
        yield
    finally:
        await asyncio.to_thread(workers.stop)


@contextlib.asynccontextmanager
async def _task_running(
    name: str, task: asyncio.Task[None], stop: asyncio.Event, failures: list[str], grace: float
) -> AsyncIterator[None]:
    """Run ``task`` for the block; a task that ends by itself stops the process."""
    task.add_done_callback(lambda _: stop.set())
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait({task}, timeout=grace)
        task.cancel()
        (outcome,) = await asyncio.gather(task, return_exceptions=True)
        if isinstance(outcome, Exception):
            log.error("%s failed: %s", name, outcome)
            failures.append(name)  # the process exits with code 1


def timer_running(
    settings: Settings, stop: asyncio.Event, failures: list[str]
) -> contextlib.AbstractAsyncContextManager[None]:
    """The cleanup timer; it ends by itself only when NATS is unreachable at start."""
    task = asyncio.create_task(CleanupTimer(settings).run(stop))
    return _task_running("cleanup timer", task, stop, failures, grace=10.0)


async def _archive(settings: Settings, stop: asyncio.Event) -> None:
    connection = await Bus.connect(settings.nats.url, settings.nats, "dcu-archiver")
    store = open_store(settings.minio)
    try:
        await AuditArchiver(settings, connection, store).run(stop)
    finally:
        await store.close()
        await connection.close()


def archiver_running(
    settings: Settings, stop: asyncio.Event, failures: list[str]
) -> contextlib.AbstractAsyncContextManager[None]:
    """The audit archiver on its own NATS connection and object store."""
    task = asyncio.create_task(_archive(settings, stop))
    return _task_running("audit archiver", task, stop, failures, grace=30.0)


MAX_REQUEST_LINE = 64 * 1024  # bytes of a request line or header the gateway reads


@contextlib.asynccontextmanager
async def gateway_running(settings: Settings) -> AsyncIterator[None]:
    # Request lines and headers up to 64 KiB reach the gateway (and get its enveloped
    # 400s); aiohttp's own parser answers longer ones in plain text.
    runner = web.AppRunner(
        create_app(settings),
        handle_signals=False,
        max_line_size=MAX_REQUEST_LINE,
        max_field_size=MAX_REQUEST_LINE,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.server.host, settings.server.port)
        await site.start()
        log.info(
            "gateway listening on http://%s:%d/api/dcu (auth %s)",
            settings.server.host,
            settings.server.port,
            "on" if settings.auth.enabled else "off",
        )
        if not settings.auth.enabled and not is_loopback(settings.server.host):
            log.warning(
                "the gateway is reachable beyond this host without authentication "
                "(server.allow_unauthenticated)"
            )
        yield
    finally:
        await runner.cleanup()


async def run_roles(settings: Settings, plan: RolePlan) -> int:
    """Run ``plan``'s roles until SIGINT/SIGTERM (or a role that ends by itself), then
    stop them in reverse order of start; returns the process's exit code."""
    stop = asyncio.Event()
    # Handled from the start, not only once every role is up: a SIGTERM while the roles
    # start (slow on a loaded host) still stops the process cleanly, with exit code 0.
    loop = asyncio.get_running_loop()
    diagnostics.register_loop("main", loop)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    failures: list[str] = []  # roles that ended with an error
    try:
        async with contextlib.AsyncExitStack() as roles:
            settings = await roles.enter_async_context(nats_resolved(settings))
            await ensure_topology(settings)
            if not settings.minio.endpoint and plan.stages:
                log.warning(
                    "minio.endpoint is empty: archives are stored under %s, not in S3",
                    Path(settings.minio.local_path).resolve(),
                )
            if plan.persist:
                await roles.enter_async_context(persistence_running(settings))
            if plan.stages:
                await roles.enter_async_context(workers_running(settings, plan.stages))
            if plan.timer:
                await roles.enter_async_context(timer_running(settings, stop, failures))
            if plan.archiver:
                await roles.enter_async_context(archiver_running(settings, stop, failures))
            if plan.http:
                await roles.enter_async_context(gateway_running(settings))
            await stop.wait()
            log.info("shutting down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 1 if failures else 0

"""The stages as dramatiq actors on the JetStream broker, and the worker that runs them.

Each stage actor's queue is bound to the previous stage's completion event
(``requested`` -> download, ``downloaded`` -> compress, ``compressed`` -> upload), so the
stages never call each other: they only publish facts. Loop-bound clients (NATS publisher,
Docker, S3) live in a ``Runtime`` opened on the AsyncIO middleware's loop on first use and
closed when the worker shuts down. A message that fails for good (a permanent error, or
retries exhausted) publishes a ``failed`` event with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import dramatiq
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.broker import MessageProxy
from dramatiq.middleware import AsyncIO, CurrentMessage, Middleware

from actors import stages
from actors.docker_engine import DockerEngine
from actors.object_store import ObjectStore, open_store
from actors.registry_engine import RegistryEngine
from bus import Bus, Published, connect_options
from dramatiq_jetstream import (
    DeliveriesExceeded,
    JetStreamBroker,
    JetStreamMessageProxy,
    Retries,
    SettleLater,
)
from events import subjects
from events.schema import DecodeError, Event, EventType, Failed, Stage, once_per_task_id
from kernel import diagnostics, logs
from kernel.errors import PermanentFailure
from kernel.settings import Settings

log = logging.getLogger(__name__)

StageFn = Callable[[stages.StageContext, Event, int], Awaitable[Event | None]]

STAGES: dict[Stage, tuple[EventType, StageFn]] = {
    Stage.DOWNLOAD: (EventType.REQUESTED, stages.download),
    Stage.COMPRESS: (EventType.DOWNLOADED, stages.compress),
    Stage.UPLOAD: (EventType.COMPRESSED, stages.upload),
}


def worker_name(role: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{role}"


class Runtime:
    """Per-process clients for the stage actors, bound to the actors' event loop."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.name = name
        self._bus: Bus | None = None
        self._engine: DockerEngine | None = None
        self._registry: RegistryEngine | None = None
        self._store: ObjectStore | None = None
        self._lock: asyncio.Lock | None = None

    async def _open(self) -> Bus:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._bus is None:
                diagnostics.register_loop(f"actors ({self.name})", asyncio.get_running_loop())
                self._bus = await Bus.connect(self.settings.nats.url, self.settings.nats, self.name)
            return self._bus

    async def publish(self, event: Event) -> None:
        await (self._bus or await self._open()).publish(event)

    async def publish_raw(self, subject: str, data: bytes, msg_id: str) -> Published:
        """Publish bytes that are not a task event (cleanup reports); raises BusError."""
        return await (self._bus or await self._open()).publish_raw(subject, data, msg_id)

    def object_store(self) -> ObjectStore:
        """The object store client, opened on first use (the cleanup role needs only it)."""
        if self._store is None:
            self._store = open_store(self.settings.minio)
        return self._store

    async def context(self) -> stages.StageContext:
        await self._open()
        if self.settings.download.engine == "docker":
            if self._engine is None:
                self._engine = DockerEngine(self.settings.docker)
        elif self._registry is None:
            self._registry = RegistryEngine(self.settings)
        return stages.StageContext(
            settings=self.settings,
            engine=self._engine,
            store=self.object_store(),
            emit=self.publish,
            worker=self.name,
            recorded=self.recorded,
            registry=self._registry,
        )

    async def recorded(self, task_id: str, event_type: EventType) -> bool:
        """Whether the stream holds a ``event_type`` event for ``task_id`` (a direct
        last-message-by-subject lookup, no consumer). Raises BusError."""
        return await (self._bus or await self._open()).has_event(task_id, event_type)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.close()
            self._engine = None
        if self._registry is not None:
            await self._registry.close()
            self._registry = None
        if self._store is not None:
            await self._store.close()
            self._store = None
        if self._bus is not None:
            await self._bus.close()
            self._bus = None


def _run_on_actor_loop(coro: Awaitable[Any]) -> Any:
    thread = get_event_loop_thread()
    if thread is None:
        raise RuntimeError("the AsyncIO middleware's event loop is not running")
    return thread.run_coroutine(coro)


class RuntimeLifecycle(Middleware):
    """Closes the runtime's clients on the actor loop once the worker threads have
    finished (or the grace period ran out), before AsyncIO stops that loop: ``after_*``
    signals run in reverse order, and this middleware stands after AsyncIO."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        try:
            _run_on_actor_loop(self.runtime.close())
        except Exception as exc:
            log.warning("closing stage clients failed: %s", exc)


class FailTaskWhenGivenUp(Middleware):
    """Publishes ``failed`` for a task whose stage message failed for good.

    Runs on ``before_nack``: the message failed with a permanent error, ran out of
    retries, or was delivered more than ``nats.max_deliver`` times without being settled
    (its workers kept dying). Publishing ``failed`` is part of that failure path: when it
    cannot be stored this raises ``SettleLater``, so dramatiq keeps the message and
    tries the whole nack again a few seconds later; it is dead-lettered only once the
    task's failure is recorded.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def before_nack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        task_id = _task_id_of(message)
        stage = message.queue_name.removesuffix(".DQ")
        with logs.bound(task_id=task_id, stage=stage):
            self._give_up(message, task_id, stage)

    def _give_up(self, message: MessageProxy, task_id: str | None, stage: str) -> None:
        exception = getattr(message, "_exception", None)
        if task_id is None:
            log.error("message %s failed for good and names no task: %s", message, exception)
            return
        reason = f"{stage} failed: {exception}"
        retries = message.options.get("retries", 0)
        if retries and not isinstance(exception, DeliveriesExceeded):
            reason += f" (after {retries} retries)"
        event = Event(
            task_id=task_id,
            payload=Failed(stage=stage, reason=reason),
            event_id=once_per_task_id(task_id, EventType.FAILED),
        )
        try:
            if _run_on_actor_loop(self.runtime.recorded(task_id, EventType.UPLOADED)):
                # A duplicate run gave up after another run finished the task.
                log.warning("task %s: %s, but the task is already uploaded", task_id, reason)
                return
            _run_on_actor_loop(self.runtime.publish(event))
        except Exception as exc:
            log.error("task %s: cannot publish its failure yet (%s); retrying", task_id, exc)
            raise SettleLater(f"cannot publish failed for task {task_id}: {exc}") from exc
        log.error("task %s: %s", task_id, reason)
        if stage in {Stage.DOWNLOAD, Stage.COMPRESS}:
            stages.remove_partial_files_for(self.runtime.settings, task_id)


def _task_id_of(message: MessageProxy) -> str | None:
    if message.args and isinstance(message.args[0], dict):
        task_id = message.args[0].get("task_id")
        return str(task_id) if task_id else None
    return None


def build_broker(settings: Settings, runtime: Runtime) -> JetStreamBroker:
    workers = settings.workers
    middleware: list[Middleware] = [
        AsyncIO(),
        CurrentMessage(),
        RuntimeLifecycle(runtime),
        FailTaskWhenGivenUp(runtime),
        Retries(
            max_retries=workers.max_retries,
            min_backoff=workers.min_backoff_ms,
            max_backoff=workers.max_backoff_ms,
        ),
    ]
    return JetStreamBroker(
        url=settings.nats.url,
        stream=settings.nats.work_stream,
        subject_prefix=settings.nats.subject_prefix,
        ack_wait=settings.nats.ack_wait,
        max_deliver=settings.nats.max_deliver,
        connect_options=connect_options(settings.nats),
        middleware=middleware,
    )


def declare_stage(
    broker: JetStreamBroker, runtime: Runtime, stage: Stage
) -> dramatiq.Actor[Any, Any]:
    """Declare ``stage``'s actor, its queue bound to the previous stage's completion event."""
    trigger, work = STAGES[stage]
    prefix = runtime.settings.nats.subject_prefix

    async def run(event_data: dict[str, Any]) -> None:
        try:  # the broker parsed the JSON once; this validates it once, no second decode
            event = Event.from_dict(event_data)
        except DecodeError as exc:
            raise PermanentFailure(f"undecodable {stage} event: {exc}") from exc
        if event.type is not trigger:
            raise PermanentFailure(f"{stage} got a {event.type} event, expected {trigger}")
        message = CurrentMessage.get_current_message()
        attempt = message.num_delivered if isinstance(message, JetStreamMessageProxy) else 1
        with logs.bound(task_id=event.task_id, stage=str(stage), event_id=event.event_id):
            ctx = await runtime.context()
            await work(ctx, event, attempt)

    run.__name__ = str(stage)
    broker.bind_events(
        str(stage),
        str(stage),
        [subjects.every_task(trigger, prefix)],
        stream=runtime.settings.nats.audit_stream,
    )
    decorate = dramatiq.actor(
        broker=broker,
        actor_name=str(stage),
        queue_name=str(stage),
        throws=(PermanentFailure,),
    )
    return decorate(run)

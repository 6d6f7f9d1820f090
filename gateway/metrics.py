"""``GET /metrics``: Prometheus metrics in the text exposition format.

Stage workers may run in other processes than the gateway, so every figure comes from
what the gateway itself sees, and every deployment shape (``dcu serve``, one process per
role) reports the same:

* **At scrape time**, each source bounded by ``SOURCE_TIMEOUT`` seconds: tasks by state
  from the database, consumer lag of every durable and the dead letters from JetStream.
  A source that fails or is slow is left out of that scrape (no stale figure is
  repeated) and ``dcu_metrics_source_up{source}`` is 0; a slow NATS or database never
  holds a scrape for longer than that.
* **From live events**: the stage histograms, retries, blob bytes and task totals are
  fed by a core NATS subscription to ``<prefix>.task.>`` opened when the app starts
  (``app.cleanup_ctx``) and closed on cleanup. They count what happened since this
  gateway started (counters restart at 0 with it, which ``rate()`` handles); every
  gateway replica sees every event, so replicas report the same figures (aggregate them
  with ``max``, not ``sum``). An event delivered twice (a stage re-publishing the same
  event id) is counted once.

Each app has its own ``CollectorRegistry`` (never the process-global default), so several
apps in one process (tests) do not collide. docs/operations.md ("Metrics") lists every
metric with its type, labels and source. Access follows the read rule of
``gateway.auth``: with ``auth.protect_reads`` a scrape needs the bearer token
(Prometheus' ``authorization`` scrape setting sends it).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from aiohttp import hdrs, web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from bus import ConsumerLag, LiveSubscription
from events import subjects
from events.limits import RAW_LOG_MAX
from events.schema import (
    Compressed,
    DecodeError,
    Downloaded,
    Event,
    Failed,
    Stage,
    StageStarted,
    Uploaded,
)
from events.states import TaskState
from gateway.keys import BUS, REPOSITORY, SETTINGS
from kernel import logs
from kernel.errors import DcuError

log = logging.getLogger(__name__)

PATH = "/metrics"
SOURCE_TIMEOUT = 4.0  # seconds each scrape-time source may take (Prometheus waits 10 s)
MAX_STARTED = 10_000  # stage starts remembered to time completions that carry no duration
MAX_SEEN = 10_000  # event ids remembered to count a re-delivered event once
OTHER_STAGE = "other"  # label of a failure whose stage is not one of the three

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
BYTES_BUCKETS = (1e5, 1e6, 1e7, 5e7, 1e8, 2.5e8, 5e8, 1e9, 2.5e9, 5e9, 1e10, 2.5e10)
RATE_BUCKETS = (1e5, 1e6, 5e6, 1e7, 2.5e7, 5e7, 1e8, 2.5e8, 5e8, 1e9, 2.5e9)
STAGES = tuple(stage.value for stage in Stage)

T = TypeVar("T")


class EventMetrics:
    """The metrics fed by live task events, on ``registry``.

    ``observe`` takes each event once; it keeps the ``*_started`` time of each running
    stage (at most ``MAX_STARTED``, oldest dropped first) to time a completion whose
    payload carries no duration.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.stage_duration = Histogram(
            "dcu_stage_duration_seconds",
            "Time a stage took, from its completion event (seconds of the payload, else "
            "since the stage's *_started event).",
            ["stage"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.stage_bytes = Histogram(
            "dcu_stage_bytes",
            "Bytes a stage produced: the image tar (download), the archive (compress), "
            "the stored object (upload).",
            ["stage"],
            buckets=BYTES_BUCKETS,
            registry=registry,
        )
        self.throughput = Histogram(
            "dcu_stage_throughput_bytes_per_second",
            "Bytes a stage moved per second: image tar bytes downloaded, tar bytes "
            "read by compress, archive bytes uploaded.",
            ["stage"],
            buckets=RATE_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "dcu_stage_retries_total",
            "Stage runs beyond the first for a task (*_started events with attempt > 1).",
            ["stage"],
            registry=registry,
        )
        self.completed = Counter(
            "dcu_tasks_completed_total",
            "Tasks completed (uploaded events).",
            registry=registry,
        )
        self.failed = Counter(
            "dcu_tasks_failed_total",
            "Tasks failed (failed events), by the stage that failed.",
            ["stage"],
            registry=registry,
        )
        self.blob_bytes = Counter(
            "dcu_download_blob_bytes_total",
            "Layer and config blob bytes of registry downloads, by where they came from "
            "(registry: fetched, cache: the blob cache).",
            ["source"],
            registry=registry,
        )
        self.events = Counter(
            "dcu_task_events_total",
            "Task events the gateway received, by type.",
            ["type"],
            registry=registry,
        )
        for stage in STAGES:
            for labelled in (self.stage_duration, self.stage_bytes, self.throughput):
                labelled.labels(stage=stage)
            self.retries.labels(stage=stage)
            self.failed.labels(stage=stage)
        for source in ("registry", "cache"):
            self.blob_bytes.labels(source=source)
        self._started: OrderedDict[tuple[str, str], datetime] = OrderedDict()
        self._seen: OrderedDict[str, None] = OrderedDict()

    def observe(self, event: Event) -> None:
        """Count ``event`` (once per event id)."""
        if event.event_id in self._seen:
            return
        self._seen[event.event_id] = None
        if len(self._seen) > MAX_SEEN:
            self._seen.popitem(last=False)
        self.events.labels(type=event.type.value).inc()
        payload = event.payload
        stage = logs.event_stage(event)
        if isinstance(payload, StageStarted) and stage is not None:
            self._remember_start(event.task_id, stage, event.time)
            if payload.attempt > 1:
                self.retries.labels(stage=stage).inc()
        elif isinstance(payload, Downloaded):
            self._finished(event, Stage.DOWNLOAD, payload.seconds, payload.bytes, payload.bytes)
            if payload.fetched_bytes is not None:
                self.blob_bytes.labels(source="registry").inc(payload.fetched_bytes)
            if payload.cached_bytes is not None:
                self.blob_bytes.labels(source="cache").inc(payload.cached_bytes)
        elif isinstance(payload, Compressed):
            self._finished(
                event, Stage.COMPRESS, payload.seconds, payload.bytes_out, payload.bytes_in
            )
        elif isinstance(payload, Uploaded):
            self._finished(event, Stage.UPLOAD, payload.seconds, payload.bytes, payload.bytes)
            self.completed.inc()
            self._forget(event.task_id)
        elif isinstance(payload, Failed):
            failed = payload.stage if payload.stage in STAGES else OTHER_STAGE
            self.failed.labels(stage=failed).inc()
            self._forget(event.task_id)

    def _remember_start(self, task_id: str, stage: str, time: datetime) -> None:
        self._started[(task_id, stage)] = time
        self._started.move_to_end((task_id, stage))
        if len(self._started) > MAX_STARTED:
            self._started.popitem(last=False)

    def _forget(self, task_id: str) -> None:
        for stage in STAGES:
            self._started.pop((task_id, stage), None)

    def _finished(
        self, event: Event, stage: Stage, seconds: float, produced: int, moved: int
    ) -> None:
        """A stage's completion: ``produced`` bytes out, ``moved`` bytes in ``seconds``
        (0: not measured, taken from the stage's start when it was seen)."""
        started = self._started.pop((event.task_id, stage.value), None)
        if seconds <= 0 and started is not None:
            seconds = max(0.0, (event.time - started).total_seconds())
        self.stage_duration.labels(stage=stage.value).observe(seconds)
        self.stage_bytes.labels(stage=stage.value).observe(produced)
        if seconds > 0 and moved > 0:
            self.throughput.labels(stage=stage.value).observe(moved / seconds)


@dataclass(slots=True)
class Snapshot:
    """What one scrape read from the database and JetStream (None: that source failed)."""

    states: dict[TaskState, int] | None = None
    consumers: list[ConsumerLag] | None = None
    dead_letters: dict[str, int] | None = None
    events_up: bool = False


class ScrapeCollector(Collector):
    """Yields the figures read at scrape time (``snapshot``, set before each export)."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def describe(self) -> Iterable[Metric]:
        return []  # names are not known before the first scrape; checked at export

    def collect(self) -> Iterable[Metric]:
        snapshot = self.snapshot
        up = GaugeMetricFamily(
            "dcu_metrics_source_up",
            "Whether this scrape could read the source (database, jetstream) or the live "
            "event subscription is open (events).",
            labels=["source"],
        )
        up.add_metric(["database"], float(snapshot.states is not None))
        jetstream = snapshot.consumers is not None and snapshot.dead_letters is not None
        up.add_metric(["jetstream"], float(jetstream))
        up.add_metric(["events"], float(snapshot.events_up))
        yield up
        if snapshot.states is not None:
            tasks = GaugeMetricFamily(
                "dcu_tasks", "Tasks in the database, by state.", labels=["state"]
            )
            for state, count in snapshot.states.items():
                tasks.add_metric([state.value], count)
            yield tasks
        if snapshot.consumers is not None:
            families = {
                "pending": GaugeMetricFamily(
                    "dcu_consumer_pending",
                    "Messages of a durable consumer's stream not yet delivered to it.",
                    labels=["stream", "durable"],
                ),
                "ack_pending": GaugeMetricFamily(
                    "dcu_consumer_ack_pending",
                    "Messages delivered to a durable consumer and not yet acknowledged.",
                    labels=["stream", "durable"],
                ),
                "redelivered": GaugeMetricFamily(
                    "dcu_consumer_redelivered",
                    "Messages a durable consumer is holding that were delivered more "
                    "than once (retries, redeliveries).",
                    labels=["stream", "durable"],
                ),
            }
            for lag in snapshot.consumers:
                labels = [lag.stream, lag.durable]
                families["pending"].add_metric(labels, lag.pending)
                families["ack_pending"].add_metric(labels, lag.ack_pending)
                families["redelivered"].add_metric(labels, lag.redelivered)
            yield from families.values()
        if snapshot.dead_letters is not None:
            dead = GaugeMetricFamily(
                "dcu_dead_letters",
                "Dead letters stored in the work stream (<prefix>.dead.<queue>), by queue.",
                labels=["queue"],
            )
            counts = dict.fromkeys(STAGES, 0) | snapshot.dead_letters  # every stage listed
            for queue, count in sorted(counts.items()):
                dead.add_metric([queue], count)
            yield dead


class Metrics:
    """One app's registry, its event metrics and its scrape-time collector."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events = EventMetrics(self.registry)
        self.scraped = ScrapeCollector()
        self.registry.register(self.scraped)
        ProcessCollector(registry=self.registry)
        self.timeout = SOURCE_TIMEOUT
        self.subscription: LiveSubscription | None = None
        self._lock = asyncio.Lock()

    async def render(self, app: web.Application) -> bytes:
        """Read the scrape-time sources (each within ``timeout``) and export everything.
        Concurrent scrapes take turns, so each exports the snapshot it read."""
        async with self._lock:
            self.scraped.snapshot = await self._read(app)
            return generate_latest(self.registry)

    async def _read(self, app: web.Application) -> Snapshot:
        bus = app[BUS]
        states, consumers, dead = await asyncio.gather(
            self._bounded("tasks by state", app[REPOSITORY].count_by_state()),
            self._bounded("consumer lag", bus.consumer_lag()),
            self._bounded("dead letters", bus.dead_letter_counts()),
        )
        return Snapshot(
            states=states,
            consumers=consumers,
            dead_letters=dead,
            events_up=self.subscription is not None and bus.connected,
        )

    async def _bounded(self, what: str, read: Awaitable[T]) -> T | None:
        try:
            return await asyncio.wait_for(read, self.timeout)
        except TimeoutError:
            log.warning("metrics: reading %s took over %gs; left out", what, self.timeout)
        except DcuError as exc:
            log.warning("metrics: cannot read %s; left out: %s", what, exc)
        return None


METRICS = web.AppKey("metrics", Metrics)


# -- the live subscription and the route --------------------------------------------------


async def _live_events(app: web.Application) -> AsyncIterator[None]:
    """Feed the event metrics from a core NATS subscription while the app runs."""
    metrics = app[METRICS]
    bus = app[BUS]
    prefix = app[SETTINGS].nats.subject_prefix

    async def deliver(subject: str, data: bytes) -> None:
        try:
            event = Event.decode(data)
        except DecodeError as exc:
            log.debug("metrics: not an event on %s (%s): %r", subject, exc, exc.raw[:RAW_LOG_MAX])
            return
        if subject != subjects.for_event(event, prefix):
            log.debug("metrics: event %s does not match its subject %s", event.event_id, subject)
            return
        try:
            metrics.events.observe(event)
        except Exception:  # a metric must never take the subscription down
            log.exception("metrics: counting event %s failed", event.event_id)

    try:
        metrics.subscription = await bus.live([subjects.every_task(prefix=prefix)], deliver)
    except DcuError as exc:
        log.error("metrics: cannot subscribe to task events, their metrics stay empty: %s", exc)
    try:
        yield
    finally:
        subscription, metrics.subscription = metrics.subscription, None
        if subscription is not None:
            await subscription.close()


async def serve(request: web.Request) -> web.Response:
    body = await request.app[METRICS].render(request.app)
    # Every name is a classic one, so the 0.0.4 text format, which every Prometheus
    # (2.x included) reads, says exactly what the body is.
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_PLAIN_0_0_4})


def setup(app: web.Application) -> None:
    """Register ``GET /metrics`` and the live subscription; call after the NATS and
    database contexts are added (it uses both)."""
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_live_events)
    app.router.add_get(PATH, serve)

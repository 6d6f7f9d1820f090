"""``GET /metrics`` in process: what the live events, the database and JetStream give,
the bounded scrape, the read rule of auth, and the Grafana dashboard's expressions.

Events are forged and published to the test's own streams with their times set, so
every duration and byte count is known exactly; the figures of a real pipeline are
checked in ``tests/e2e/test_metrics.py``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from bus import Bus
from events.schema import (
    Compressed,
    CompressStarted,
    Downloaded,
    DownloadStarted,
    Event,
    Failed,
    Payload,
    Requested,
    Uploaded,
    UploadStarted,
)
from events.states import TaskState
from gateway.app import create_app
from gateway.metrics import METRICS
from kernel.settings import AuthSettings, Settings
from tests.gateway.conftest import Gateway
from tests.polling import eventually

DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana-dashboard.json"
TOKEN = "metrics-scraper-token-0123456789"
SHA = "0" * 64

Families = dict[str, Any]


def parse(text: str) -> Families:
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: Families, name: str, **labels: str) -> float | None:
    """The value of sample ``name`` with exactly ``labels`` (None when absent)."""
    for family in families.values():
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    return None


async def scrape(client: TestClient[Any, Any], headers: dict[str, str] | None = None) -> Families:
    async with client.get("/metrics", headers=headers) as response:
        text = await response.text()
        assert response.status == 200, text
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(text)


class Tasks:
    """Publishes forged events of one task with times ``seconds`` after a fixed start."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    def event(self, task_id: str, payload: Payload, at: float, **extra: Any) -> Event:
        return Event(
            task_id=task_id, payload=payload, time=self.start + timedelta(seconds=at), **extra
        )

    async def publish(self, *events: Event) -> None:
        for event in events:
            await self.bus.publish(event)


def completed_task(tasks: Tasks, task_id: str) -> list[Event]:
    """A task that went through every stage: download 2.0 s (from its payload), compress
    without a duration (3.5 s from compress_started), upload 0.5 s on a second attempt."""
    return [
        tasks.event(task_id, Requested(username="u", docker_image_name="img:1"), 0),
        tasks.event(task_id, DownloadStarted(worker="w", attempt=1), 1),
        tasks.event(
            task_id,
            Downloaded(
                docker_image_name="img:1",
                image_id="sha256:" + SHA,
                tar_path="",
                bytes=1000,
                seconds=2.0,
                engine="registry",
                layout="blobs",
                fetched_bytes=600,
                cached_bytes=400,
            ),
            3,
        ),
        tasks.event(task_id, CompressStarted(worker="w", attempt=1), 10),
        tasks.event(
            task_id,
            Compressed(
                docker_image_name="img:1",
                image_id="sha256:" + SHA,
                gzip_file_name="a.tar.gz",
                bytes_in=1000,
                bytes_out=500,
                sha256=SHA,
                seconds=0.0,
            ),
            13.5,
        ),
        tasks.event(task_id, UploadStarted(worker="w", attempt=2), 20),
        tasks.event(
            task_id,
            Uploaded(bucket="b", minio_object_name="o", bytes=500, sha256=SHA, seconds=0.5),
            20.5,
        ),
    ]


def failed_task(tasks: Tasks, task_id: str) -> list[Event]:
    """A task whose download ran twice and failed."""
    return [
        tasks.event(task_id, Requested(username="u", docker_image_name="img:2"), 0),
        tasks.event(task_id, DownloadStarted(worker="w", attempt=1), 1),
        tasks.event(task_id, DownloadStarted(worker="w", attempt=2), 2),
        tasks.event(task_id, Failed(stage="download", reason="no such image"), 3),
    ]


async def test_live_events_feed_the_histograms_and_counters(
    gateway: Gateway, client: Client
) -> None:
    # Given a completed, a failed and a downloading task, published to the stream (the
    # completion once more, as a stage re-publishing it would) and recorded in the database
    tasks = Tasks(Bus(client, gateway.settings.nats))
    done, failed, running = (str(uuid.uuid4()) for _ in range(3))
    finished = completed_task(tasks, done)
    events = [*finished, *failed_task(tasks, failed), *completed_task(tasks, running)[:2]]
    await tasks.publish(*events)
    await tasks.publish(finished[-1])
    await gateway.record(*events)

    # When the gateway is scraped (once the last events have arrived)
    families: Families = await eventually(
        lambda: scrape(gateway.client),
        until=lambda f: (
            sample(f, "dcu_task_events_total", type="failed") == 1
            and sample(f, "dcu_task_events_total", type="download_started") == 4
        ),
        what="the published events to be counted",
    )

    # Then each stage's histograms hold the one completion each, with its figures
    def figure(name: str, stage: str) -> float | None:
        return sample(families, name, stage=stage)

    assert figure("dcu_stage_duration_seconds_count", "download") == 1
    assert figure("dcu_stage_duration_seconds_sum", "download") == 2.0
    assert figure("dcu_stage_duration_seconds_sum", "compress") == 3.5  # from compress_started
    assert figure("dcu_stage_duration_seconds_sum", "upload") == 0.5
    assert figure("dcu_stage_bytes_count", "compress") == 1
    assert [figure("dcu_stage_bytes_sum", s) for s in ("download", "compress", "upload")] == [
        1000,
        500,
        500,
    ]
    assert figure("dcu_stage_throughput_bytes_per_second_sum", "download") == 500
    assert figure("dcu_stage_throughput_bytes_per_second_sum", "compress") == pytest.approx(
        1000 / 3.5
    )
    assert figure("dcu_stage_throughput_bytes_per_second_sum", "upload") == 1000
    assert sample(families, "dcu_stage_bytes_bucket", stage="download", le="1000.0") is None
    assert sample(families, "dcu_stage_bytes_bucket", stage="download", le="100000.0") == 1
    # And the totals count each task once, the re-published completion included
    assert sample(families, "dcu_tasks_completed_total") == 1
    assert sample(families, "dcu_tasks_failed_total", stage="download") == 1
    assert sample(families, "dcu_tasks_failed_total", stage="upload") == 0
    assert sample(families, "dcu_task_events_total", type="uploaded") == 1
    # And a second attempt of a stage is a retry
    assert figure("dcu_stage_retries_total", "download") == 1
    assert figure("dcu_stage_retries_total", "upload") == 1
    assert figure("dcu_stage_retries_total", "compress") == 0
    assert sample(families, "dcu_download_blob_bytes_total", source="registry") == 600
    assert sample(families, "dcu_download_blob_bytes_total", source="cache") == 400
    # And tasks by state are what /query reports for each state
    for state in TaskState:
        status, body = await gateway.get(f"/query?state={state.value}&page_size=1")
        assert status == 200, body
        assert sample(families, "dcu_tasks", state=state.value) == body["data"]["total"], state
    assert sample(families, "dcu_tasks", state="downloading") == 1
    assert sample(families, "dcu_metrics_source_up", source="events") == 1


async def test_consumer_lag_and_dead_letters_come_from_jetstream(
    gateway: Gateway, client: Client
) -> None:
    # Given a durable consumer on the audit stream that has read nothing yet
    bus = Bus(client, gateway.settings.nats)
    nats = gateway.settings.nats
    consumer = await bus.durable(
        nats.audit_stream, "metrics-lag", f"{nats.subject_prefix}.task.>", max_ack_pending=5
    )
    tasks = Tasks(bus)
    await tasks.publish(*failed_task(tasks, str(uuid.uuid4()))[:3])
    lag = {"stream": nats.audit_stream, "durable": "metrics-lag"}

    families = await scrape(gateway.client)
    assert sample(families, "dcu_consumer_pending", **lag) == 3
    assert sample(families, "dcu_consumer_ack_pending", **lag) == 0

    # When it takes one message without settling it, and a stage dead-letters a message
    delivery = await consumer.next(timeout=5)
    assert delivery is not None
    await bus.publish_raw(f"{nats.subject_prefix}.dead.download", b"{}", str(uuid.uuid4()))
    await consumer.close()

    # Then the scrape shows the message as pending acknowledgement, and the dead letter
    families = await scrape(gateway.client)
    assert sample(families, "dcu_consumer_pending", **lag) == 2
    assert sample(families, "dcu_consumer_ack_pending", **lag) == 1
    assert sample(families, "dcu_dead_letters", queue="download") == 1
    assert sample(families, "dcu_dead_letters", queue="compress") == 0
    assert sample(families, "dcu_metrics_source_up", source="jetstream") == 1


async def test_a_hanging_database_is_left_out_of_the_scrape_in_bounded_time(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a database that never answers the count, and a short source timeout
    async def never() -> dict[TaskState, int]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(gateway.repository, "count_by_state", never)
    gateway.app[METRICS].timeout = 0.3

    # When the gateway is scraped
    started = time.monotonic()
    families = await scrape(gateway.client)

    # Then the scrape answers at once with what the other sources gave
    assert time.monotonic() - started < 5
    assert sample(families, "dcu_metrics_source_up", source="database") == 0
    assert sample(families, "dcu_metrics_source_up", source="jetstream") == 1
    assert "dcu_tasks" not in families
    assert sample(families, "dcu_dead_letters", queue="upload") == 0
    assert "metrics: reading tasks by state took over 0.3s; left out" in gateway.log.read_text()


@pytest.fixture
async def app_with_auth(settings: Settings, client: Client) -> AsyncIterator[Callable[[bool], Any]]:
    """Start gateways with auth on, reads protected or not; all closed at the end."""
    await Bus(client, settings.nats).ensure_streams()
    opened: list[TestClient[Any, Any]] = []

    async def start(protect_reads: bool) -> TestClient[Any, Any]:
        auth = AuthSettings(
            enabled=True, tokens={"prometheus": SecretStr(TOKEN)}, protect_reads=protect_reads
        )
        http = TestClient(TestServer(create_app(settings.model_copy(update={"auth": auth}))))
        await http.start_server()
        opened.append(http)
        return http

    try:
        yield start
    finally:
        for http in opened:
            await http.close()


async def test_metrics_need_the_token_only_when_reads_are_protected(
    app_with_auth: Callable[[bool], Any],
) -> None:
    # Given two gateways in one process (each has its own registry), reads protected or not
    protected = await app_with_auth(True)
    open_reads = await app_with_auth(False)

    # Then the protected one refuses a scrape without the token, or with a wrong one
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789abc"}):
        async with protected.get("/metrics", headers=headers) as response:
            assert response.status == 401, await response.text()
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # And answers with it; the other answers without one
    with_token = await scrape(protected, {"Authorization": f"Bearer {TOKEN}"})
    assert sample(with_token, "dcu_metrics_source_up", source="database") == 1
    without = await scrape(open_reads)
    assert sample(without, "dcu_tasks_completed_total") == 0


# -- the Grafana dashboard ----------------------------------------------------------------

_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions,
    aggregations, keywords, label names (in ``{…}``, ``by (…)``) or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        name = match.group()
        following = text[match.end() :].lstrip()
        if following.startswith("(") or name.lower() in _PROMQL_WORDS:
            continue
        if match.start() > 0 and (
            text[match.start() - 1].isdigit() or text[match.start() - 1] == "."
        ):
            continue  # the unit of a number such as 5m or 1e9
        names.add(name)
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    return exprs


def test_metric_names_are_read_out_of_promql() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, stage) (rate(dcu_stage_duration_seconds_bucket"
        '{stage=~"down.*"}[$__rate_interval]))) / on (stage) group_left max(dcu_tasks) > 1e9'
    )
    assert metric_names(expr) == {"dcu_stage_duration_seconds_bucket", "dcu_tasks"}


async def test_the_dashboard_reads_only_metrics_the_gateway_exposes(gateway: Gateway) -> None:
    # Given the dashboard and a scrape of a gateway with every source up
    dashboard = json.loads(DASHBOARD.read_text())
    families = await scrape(gateway.client)
    assert sample(families, "dcu_metrics_source_up", source="jetstream") == 1
    exposed = set(families) | {s.name for f in families.values() for s in f.samples}

    # Then it is a Grafana dashboard on a Prometheus datasource input
    assert dashboard["schemaVersion"] >= 36
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 8
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    # And every expression names only metrics the scrape holds
    read = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= exposed, (expr, names - exposed)
        read |= names
    # And the panels cover states, durations, throughput, bytes, retries, dead letters, lag
    for wanted in (
        "dcu_tasks",
        "dcu_stage_duration_seconds_bucket",
        "dcu_stage_throughput_bytes_per_second_bucket",
        "dcu_stage_bytes_sum",
        "dcu_stage_retries_total",
        "dcu_dead_letters",
        "dcu_consumer_pending",
        "dcu_consumer_ack_pending",
    ):
        assert wanted in read, wanted

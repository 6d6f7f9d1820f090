"""Observability of a real ``dcu serve`` (``DCU_LOG_FORMAT=json``) after two tasks, one
completed (the registry's SMALL image) and one failed (an image the registry lacks):
``GET /metrics`` against what the API reports for them, and the JSON log lines.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from events.states import TaskState
from tests.e2e.conftest import service_config
from tests.gateway.test_metrics import Families, parse, sample
from tests.polling import wait_until
from tests.servers.dcu_process import DcuProcess
from tests.servers.docker_engine import DockerEngine
from tests.servers.images import PushedImages
from tests.servers.nats import NatsServer
from tests.servers.registry import Registry
from tests.servers.s3 import S3Server

pytestmark = pytest.mark.e2e


@dataclass
class Run:
    service: DcuProcess
    completed: dict[str, Any]  # /status of the completed task
    failed: dict[str, Any]  # /status of the failed task
    events: dict[str, list[dict[str, Any]]]  # task id -> its events (no progress)


@pytest.fixture(scope="module")
def run(
    nats_server: NatsServer,
    docker_engine: DockerEngine,
    s3_server: S3Server,
    registry: Registry,
    pushed_images: PushedImages,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Run]:
    """``dcu serve`` with JSON logs (from the environment) after its two tasks."""
    tag = uuid.uuid4().hex[:8]
    config = service_config(nats=nats_server, engine=docker_engine, s3=s3_server, tag=tag)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DCU_LOG_FORMAT", "json")
        service = DcuProcess(tmp_path_factory.mktemp("dcu-json"), config, ["serve"], name="json")
        service.start()
    try:
        ids = []
        for image in (pushed_images["small"].reference, f"{registry.address}/absent/{tag}:v1"):
            status, body = service.post("/start", {"username": "ops", "docker_image_name": image})
            assert status == 200, body
            ids.append(body["data"]["task_id"])
        completed, failed = (service.wait_terminal(task_id, timeout=180) for task_id in ids)
        assert completed["state"] == "completed", completed
        assert failed["state"] == "failed", failed
        events = {}
        for task_id in ids:
            status, body = service.get(f"/events/{task_id}?include_progress=false")
            assert status == 200, body
            events[task_id] = body["data"]["events"]
        yield Run(service, completed, failed, events)
    finally:
        service.stop()


def scrape(service: DcuProcess) -> Families:
    url = service.base_url.removesuffix("/api/dcu") + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return parse(text)


def payload(run: Run, task_id: str, event_type: str) -> dict[str, Any]:
    [found] = [e["payload"] for e in run.events[task_id] if e["type"] == event_type]
    return dict(found)


def test_metrics_match_what_the_api_reports(run: Run) -> None:
    service = run.service
    good = run.completed["task_id"]
    audit = f"{service.config['nats']['stream']}_AUDIT"
    persistence = f"{service.config['nats']['stream']}-persistence"

    # When the gateway is scraped, once both tasks' last events have reached it and the
    # failure is dead-lettered
    families = wait_until(
        lambda: scrape(service),
        until=lambda f: (
            sample(f, "dcu_task_events_total", type="uploaded") == 1
            and sample(f, "dcu_task_events_total", type="failed") == 1
            and sample(f, "dcu_dead_letters", queue="download") == 1
            and sample(f, "dcu_consumer_pending", stream=audit, durable=persistence) == 0
        ),
        timeout=30,
        what="both tasks' ends, the dead letter and an idle persistence consumer in /metrics",
        interval=0.2,
    )

    # Then the totals are one completed and one failed (in the download stage)
    assert sample(families, "dcu_tasks_completed_total") == 1
    assert sample(families, "dcu_tasks_failed_total", stage="download") == 1
    failed_total = sum(
        s.value for s in families["dcu_tasks_failed"].samples if s.name.endswith("_total")
    )
    assert failed_total == 1
    # And tasks by state are what /query reports
    for state in TaskState:
        status, body = service.get(f"/query?state={state.value}&page_size=1")
        assert status == 200, body
        assert sample(families, "dcu_tasks", state=state.value) == body["data"]["total"], state
    assert sample(families, "dcu_tasks", state="completed") == 1
    assert sample(families, "dcu_tasks", state="failed") == 1

    # And each stage's histograms saw the completed task alone, with its figures
    downloaded = payload(run, good, "downloaded")
    compressed = payload(run, good, "compressed")
    uploaded = payload(run, good, "uploaded")
    for stage in ("download", "compress", "upload"):
        assert sample(families, "dcu_stage_duration_seconds_count", stage=stage) == 1, stage
        assert sample(families, "dcu_stage_bytes_count", stage=stage) == 1, stage
    assert sample(families, "dcu_stage_bytes_sum", stage="download") == downloaded["bytes"]
    assert sample(families, "dcu_stage_bytes_sum", stage="compress") == compressed["bytes_out"]
    assert sample(families, "dcu_stage_bytes_sum", stage="upload") == uploaded["bytes"]
    assert uploaded["bytes"] == compressed["bytes_out"] == run.completed["archive_bytes"]
    for stage, done in (("download", downloaded), ("compress", compressed), ("upload", uploaded)):
        if done["seconds"] > 0:  # else timed from the *_started event: not in the payload
            assert sample(families, "dcu_stage_duration_seconds_sum", stage=stage) == pytest.approx(
                done["seconds"]
            )
    assert (
        sample(families, "dcu_download_blob_bytes_total", source="registry")
        == (run.completed["download_bytes_fetched"])
    )
    assert (
        sample(families, "dcu_download_blob_bytes_total", source="cache")
        == (run.completed["download_bytes_cached"])
    )
    # And retries are the stage runs beyond the first the events show
    for stage in ("download", "compress", "upload"):
        reruns = sum(
            1
            for events in run.events.values()
            for event in events
            if event["type"] == f"{stage}_started" and event["payload"].get("attempt", 1) > 1
        )
        assert sample(families, "dcu_stage_retries_total", stage=stage) == reruns, stage

    # And every durable of the deployment has lag gauges
    work = f"{service.config['nats']['stream']}_WORK"
    durables = {
        (s.labels["stream"], s.labels["durable"]) for s in families["dcu_consumer_pending"].samples
    }
    expected = {(audit, persistence), (work, "cleanup")}
    expected |= {(stream, stage) for stream in (audit, work) for stage in ("download", "compress")}
    expected |= {(audit, "upload"), (work, "upload")}
    assert expected <= durables, durables
    assert any(s == work and d.startswith("download_DQ-") for s, d in durables), durables
    for stream, durable in durables:
        assert (
            sample(families, "dcu_consumer_ack_pending", stream=stream, durable=durable) is not None
        )
    assert sample(families, "dcu_metrics_source_up", source="events") == 1


def test_every_log_line_is_json_and_a_task_s_lines_name_it(run: Run) -> None:
    # Given the log of the whole run
    lines = [json.loads(line) for line in run.service.log.read_text().splitlines() if line]

    # Then every line is a record
    for line in lines:
        assert isinstance(line, dict)
        assert {"time", "level", "logger", "message"} <= set(line), line

    # And the completed task's lines from each stage name the task, the stage and the
    # event the stage handled
    good = run.completed["task_id"]
    ids = {event["type"]: event["event_id"] for event in run.events[good]}
    mine = [line for line in lines if line.get("task_id") == good]
    handled = {"download": "requested", "compress": "downloaded", "upload": "compressed"}
    for stage, trigger in handled.items():
        worked = [
            line for line in mine if line["logger"] == "actors.stages" and line["stage"] == stage
        ]
        assert worked, (stage, mine)
        assert {line["event_id"] for line in worked} == {ids[trigger]}, stage
    # And persistence's lines name the event each records
    moved = [line for line in mine if "idle -> downloading" in line["message"]]
    assert [(line["stage"], line["event_id"]) for line in moved] == [
        ("download", ids["download_started"])
    ]
    # And the failure is logged with the failed task's id and stage
    failed = run.failed["task_id"]
    given_up = [
        line
        for line in lines
        if line.get("task_id") == failed
        and line["level"] == "ERROR"
        and "failed" in line["message"]
    ]
    assert given_up and all(line["stage"] == "download" for line in given_up), given_up

"""Event history and server-sent events over HTTP.

Real tasks run through a real ``dcu serve``; the live merge and shutdown tests use a
``dcu gateway`` on a stream of its own and publish the events themselves; the heartbeat
test runs the routes in-process with a shortened interval.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from aiohttp import web

from bus import Bus
from events.schema import DownloadStarted, Event, Failed, Progress
from gateway import events_api
from gateway.keys import API, BUS, SETTINGS
from kernel.settings import NatsSettings, Settings
from tests.e2e.conftest import service_config
from tests.e2e.helpers import STAGE_EVENTS
from tests.polling import eventually
from tests.servers.base import free_port
from tests.servers.dcu_process import DcuProcess
from tests.servers.docker_engine import DockerEngine
from tests.servers.images import PushedImages
from tests.servers.nats import NatsServer
from tests.servers.registry import Registry
from tests.servers.s3 import S3Server

pytestmark = pytest.mark.e2e

SSE_TIMEOUT = aiohttp.ClientTimeout(total=90, sock_read=30)


async def sse_messages(
    response: aiohttp.ClientResponse,
) -> AsyncGenerator[dict[str, str], None]:
    """The SSE messages of ``response`` as dicts of their fields; a comment is
    ``{"comment": text}``. Ends when the server closes the stream."""
    fields: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if fields:
                yield fields
            fields = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def events_of(messages: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The decoded events, after checking each message's id and event fields."""
    events = []
    for message in messages:
        if "comment" in message:
            continue
        event = json.loads(message["data"])
        assert message["id"] == event["event_id"]
        assert message["event"] == event["type"]
        events.append(event)
    return events


def start(service: DcuProcess, reference: str) -> str:
    status, body = service.post("/start", {"username": "watcher", "docker_image_name": reference})
    assert status == 200, body
    task_id: str = body["data"]["task_id"]
    return task_id


@pytest.fixture
def gateway_only(
    nats_server: NatsServer, docker_engine: DockerEngine, s3_server: S3Server, tmp_path: Path
) -> Iterator[DcuProcess]:
    """``dcu gateway`` alone on a stream of its own: no worker or subscriber touches the
    events a test publishes there."""
    config = service_config(
        nats=nats_server, engine=docker_engine, s3=s3_server, tag=uuid.uuid4().hex[:8]
    )
    service = DcuProcess(tmp_path, config, ["gateway"], name="gateway").start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def completed_task(dcu_service: DcuProcess, pushed_images: PushedImages) -> str:
    task_id = start(dcu_service, pushed_images["small"].reference)
    assert dcu_service.wait_terminal(task_id, timeout=120)["state"] == "completed"
    return task_id


# --- history ---------------------------------------------------------------------------


def test_history_lists_every_stage_in_stream_order(
    dcu_service: DcuProcess, completed_task: str
) -> None:
    status, body = dcu_service.get(f"/events/{completed_task}")

    assert status == 200, body
    assert body["code"] == 0
    data = body["data"]
    assert data["task_id"] == completed_task
    assert data["truncated"] is False
    events = data["events"]
    assert data["total"] == len(events)
    assert [e["type"] for e in events if e["type"] != "progress"] == STAGE_EVENTS
    # the progress stream keeps the latest report of the task, placed by its time
    [progress] = [e for e in events if e["type"] == "progress"]
    assert progress["payload"]["stage"] == "upload"
    seqs = [e["seq"] for e in events if e["type"] != "progress"]  # audit stream sequences
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(e["task_id"] == completed_task for e in events)
    assert len({e["event_id"] for e in events}) == len(events)
    assert events[0]["payload"]["username"] == "watcher"
    assert events[-1]["payload"]["minio_object_name"].endswith(".tar.gz")


def test_history_without_progress(dcu_service: DcuProcess, completed_task: str) -> None:
    _, everything = dcu_service.get(f"/events/{completed_task}")
    status, body = dcu_service.get(f"/events/{completed_task}?include_progress=false")

    assert status == 200, body
    events = body["data"]["events"]
    assert [e["type"] for e in events] == STAGE_EVENTS
    assert body["data"]["total"] == len(STAGE_EVENTS)
    kept = [e for e in everything["data"]["events"] if e["type"] != "progress"]
    assert events == kept  # same events, same sequences


# --- one task, live --------------------------------------------------------------------


async def test_task_stream_follows_a_task_until_it_is_uploaded(
    dcu_service: DcuProcess, pushed_images: PushedImages
) -> None:
    # Given a task that was just started
    task_id = await asyncio.to_thread(start, dcu_service, pushed_images["small"].reference)

    # When its stream is read to the end
    async with aiohttp.ClientSession(timeout=SSE_TIMEOUT) as session:
        async with session.get(f"{dcu_service.base_url}/events/{task_id}/stream") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            assert response.headers["Cache-Control"] == "no-cache"
            messages = [m async for m in sse_messages(response)]

    # Then it held every stage event once, in order, and ended right after "uploaded"
    events = events_of(messages)
    assert [e["type"] for e in events if e["type"] != "progress"] == STAGE_EVENTS
    assert events[-1]["type"] == "uploaded"
    assert all(e["task_id"] == task_id for e in events)
    assert len({e["event_id"] for e in events}) == len(events)
    # and exactly what the stream stored
    _, body = await asyncio.to_thread(dcu_service.get, f"/events/{task_id}")
    assert [e["event_id"] for e in events] == [e["event_id"] for e in body["data"]["events"]]


async def test_task_stream_of_an_ended_task_replays_and_closes(
    dcu_service: DcuProcess, completed_task: str
) -> None:
    url = f"{dcu_service.base_url}/events/{completed_task}/stream"
    async with aiohttp.ClientSession(timeout=SSE_TIMEOUT) as session:
        async with session.get(url, params={"include_progress": "false"}) as response:
            assert response.status == 200
            events = events_of([m async for m in sse_messages(response)])
        assert [e["type"] for e in events] == STAGE_EVENTS

        # A client resuming after "compressed" gets only what follows it
        headers = {"Last-Event-ID": events[4]["event_id"]}
        async with session.get(url, params={"include_progress": "false"}, headers=headers) as r:
            assert r.status == 200
            resumed = events_of([m async for m in sse_messages(r)])
        assert [e["type"] for e in resumed] == ["upload_started", "uploaded"]

        # and one that already has "uploaded" is told to stop reconnecting
        headers = {"Last-Event-ID": events[-1]["event_id"]}
        async with session.get(url, headers=headers) as response:
            assert response.status == 204


async def test_task_stream_merges_history_and_live_events(gateway_only: DcuProcess) -> None:
    # Given a task whose "requested" is in the stream, followed live by two clients, and
    # a third following every task
    service = gateway_only
    nats_config = service.config["nats"]
    task_id = await asyncio.to_thread(start, service, "example.invalid/app:1")
    url = f"{service.base_url}/events/{task_id}/stream"
    nc = await nats.connect(nats_config["url"])
    try:
        js = nc.jetstream()

        async def publish(event: Event | bytes, subject_type: str, msg_id: str) -> None:
            data = event if isinstance(event, bytes) else event.encode()
            prefix = nats_config["subject_prefix"]
            subject = (
                f"{prefix}.progress.{task_id}"
                if subject_type == "progress"
                else f"{prefix}.task.{task_id}.{subject_type}"
            )
            await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})

        async with aiohttp.ClientSession(timeout=SSE_TIMEOUT) as session:
            full = await session.get(url)
            quiet = await session.get(url, params={"include_progress": "false"})
            every = await session.get(f"{service.base_url}/events/stream")
            async with full, quiet, every:
                streams = [sse_messages(full), sse_messages(quiet)]
                for messages in streams:
                    assert events_of([await anext(messages)])[0]["type"] == "requested"
                    assert await anext(messages) == {"comment": "live"}
                all_tasks = sse_messages(every)
                assert await anext(all_tasks) == {"comment": "live"}

                # When stage events arrive, with a re-publish JetStream de-duplicates (core
                # NATS delivers it twice), a message that is not an event, one that names
                # another task, and a progress event, then the task fails
                started = Event(task_id=task_id, payload=DownloadStarted(worker="test", attempt=1))
                await publish(started, "download_started", started.event_id)
                await publish(started, "download_started", started.event_id)
                await publish(b"not json", "progress", str(uuid.uuid4()))
                forged = Event(
                    task_id=str(uuid.uuid4()), payload=Progress(stage="download", bytes_done=1)
                )
                await publish(forged, "progress", forged.event_id)
                progress = Event(
                    task_id=task_id, payload=Progress(stage="download", bytes_done=5, bytes_total=9)
                )
                await publish(progress, "progress", progress.event_id)
                failed = Event(
                    task_id=task_id, payload=Failed(stage="download", reason="test says no")
                )
                await publish(failed, "failed", failed.event_id)

                # Then each client gets every event of the task once, in order, and its
                # stream ends after "failed"
                async with asyncio.timeout(20):
                    got_full = events_of([m async for m in streams[0]])
                    got_quiet = events_of([m async for m in streams[1]])
                    got_all = [events_of([await anext(all_tasks)])[0] for _ in range(3)]
                await all_tasks.aclose()
    finally:
        await nc.close()
    ids = [started.event_id, progress.event_id, failed.event_id]
    assert [e["event_id"] for e in got_full] == ids
    assert [e["event_id"] for e in got_quiet] == [started.event_id, failed.event_id]
    assert [e["event_id"] for e in got_all] == ids  # the all-tasks stream drops them too
    assert got_full[-1]["payload"] == {"stage": "download", "reason": "test says no"}

    # and the history holds the same, the junk left out
    _, body = await asyncio.to_thread(service.get, f"/events/{task_id}")
    history = body["data"]["events"]
    assert [e["type"] for e in history] == ["requested", "download_started", "progress", "failed"]
    assert [e["event_id"] for e in history[1:]] == ids


# --- every task, live ------------------------------------------------------------------


async def test_all_tasks_stream_with_a_type_filter(
    dcu_service: DcuProcess, pushed_images: PushedImages, registry: Registry
) -> None:
    async with aiohttp.ClientSession(timeout=SSE_TIMEOUT) as session:
        url = f"{dcu_service.base_url}/events/stream"
        async with session.get(url, params={"type": "failed"}) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            messages = sse_messages(response)
            assert await anext(messages) == {"comment": "live"}  # subscribed from here on

            # Given a task that succeeds, then one for an image that does not exist
            good = await asyncio.to_thread(start, dcu_service, pushed_images["small"].reference)
            done = await asyncio.to_thread(dcu_service.wait_terminal, good, 120)
            assert done["state"] == "completed"
            bad = await asyncio.to_thread(start, dcu_service, f"{registry.address}/missing:1")

            # When the stream is read until the bad task's failure
            seen: list[dict[str, Any]] = []
            async with asyncio.timeout(60):
                async for message in messages:
                    seen.extend(events_of([message]))
                    if any(e["task_id"] == bad for e in seen):
                        break
            await messages.aclose()

    # Then it carried that failure and nothing of the successful task
    assert all(e["type"] == "failed" for e in seen)
    assert not [e for e in seen if e["task_id"] == good]
    [failed] = [e for e in seen if e["task_id"] == bad]
    assert failed["payload"]["stage"] == "download"
    assert "missing" in failed["payload"]["reason"]


async def test_a_client_that_leaves_is_unsubscribed(dcu_service: DcuProcess) -> None:
    # Given a client on a stream nobody else follows
    async with aiohttp.ClientSession(timeout=SSE_TIMEOUT) as session:
        url = f"{dcu_service.base_url}/events/stream"
        async with session.get(url, params={"type": "compress_started"}) as response:
            messages = sse_messages(response)
            assert await anext(messages) == {"comment": "live"}
            await messages.aclose()
    subject = f"{dcu_service.config['nats']['subject_prefix']}.task.*.compress_started"
    line = f"event stream for {subject} closed after 0 events: client went away"

    # When it has gone, then the gateway notices within a few seconds
    await eventually(
        lambda: line in dcu_service.log.read_text(),
        timeout=10,
        what=f"{line!r} in the log",
        interval=0.2,
        describe=lambda: dcu_service.log.read_text()[-2000:],
    )


async def test_shutdown_ends_open_streams(gateway_only: DcuProcess) -> None:
    # Given a live stream for all tasks and one for a task that will never end
    service = gateway_only
    task_id = start(service, "example.invalid/never:1")
    async with aiohttp.ClientSession(timeout=SSE_TIMEOUT) as session:
        everything = await session.get(f"{service.base_url}/events/stream")
        one = await session.get(f"{service.base_url}/events/{task_id}/stream")
        async with everything, one:
            all_messages = sse_messages(everything)
            task_messages = sse_messages(one)
            assert await anext(all_messages) == {"comment": "live"}
            assert events_of([await anext(task_messages)])[0]["type"] == "requested"
            assert await anext(task_messages) == {"comment": "live"}

            # When the gateway is asked to stop
            started = time.monotonic()
            code = await asyncio.to_thread(service.terminate, 30)

            # Then both streams end and it exits cleanly, well before aiohttp's 60 s
            # shutdown timeout would have cancelled the handlers
            async with asyncio.timeout(5):
                assert [m async for m in all_messages] == []
                assert [m async for m in task_messages] == []
    assert code == 0, service.log.read_text()[-2000:]
    assert time.monotonic() - started < 15
    log = service.log.read_text()
    assert "closed after 0 events: server shutting down" in log
    assert f"task {task_id}: event stream closed after 1 events: server shutting down" in log


async def test_a_quiet_stream_sends_keep_alive_comments(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the events routes in-process (heartbeat shortened) on a stream of their own
    monkeypatch.setattr(events_api, "HEARTBEAT", 0.3)
    tag = uuid.uuid4().hex[:8]
    settings = Settings(nats=NatsSettings(stream=f"E2E_{tag}", subject_prefix=f"e2e{tag}"))
    nc = await nats.connect(nats_server.url)
    app = web.Application()
    app[SETTINGS], app[BUS] = settings, Bus(nc, settings.nats)
    events_api.setup(app)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        # When nothing happens for a while
        async with aiohttp.ClientSession(timeout=SSE_TIMEOUT) as session:
            url = f"http://127.0.0.1:{port}{API}/events/stream"
            async with session.get(url) as response:
                messages = sse_messages(response)
                async with asyncio.timeout(10):
                    got = [await anext(messages) for _ in range(3)]
                await messages.aclose()

        # Then the client sees keep-alive comments
        assert got == [{"comment": "live"}, {"comment": "keep-alive"}, {"comment": "keep-alive"}]
    finally:
        await runner.cleanup()
        await nc.close()

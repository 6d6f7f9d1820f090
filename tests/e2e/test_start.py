"""``POST /start`` as one write: the ``requested`` event in JetStream, nothing else.

Most tests run ``dcu gateway`` alone (no persistence subscriber, no worker), so whatever
``/status`` answers right after a start comes from the stream, and the task list shows
only what a subscriber recorded; ``dcu persist`` is started beside it where a test needs
the rows. The stream is read with nats-py by subject, as any subscriber would.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import nats
import nats.errors
import pytest
from nats.js.api import StreamConfig

from bus import Bus, Published
from events.schema import Event, EventType, Requested, once_per_task_id
from gateway import start
from gateway.keys import BUS, SETTINGS
from kernel.errors import BusError
from kernel.settings import NatsSettings, Settings
from tests.e2e.conftest import service_config
from tests.e2e.helpers import TIME_RE, post_start, service_transitions
from tests.polling import wait_until
from tests.servers.dcu_process import DcuProcess
from tests.servers.docker_engine import DockerEngine
from tests.servers.nats import NatsServer

pytestmark = pytest.mark.e2e

KEY = start.IDEMPOTENCY_HEADER
IMAGE = "127.0.0.1:5000/team/app:1.0"


@dataclass(frozen=True)
class _NoEngine:
    """Stands in for DockerEngine in ``service_config``: no worker runs here."""

    host: str = "unix:///nonexistent/docker.sock"


def lone_gateway_config(nats_server: NatsServer) -> dict[str, Any]:
    engine = cast(DockerEngine, _NoEngine())
    return service_config(nats=nats_server, engine=engine, s3=None, tag=uuid.uuid4().hex[:8])


@pytest.fixture(scope="module")
def lone_gateway(
    nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DcuProcess]:
    """``dcu gateway`` alone on a stream of its own: nothing records its tasks as rows."""
    workdir = tmp_path_factory.mktemp("lone-gateway")
    service = DcuProcess(workdir, lone_gateway_config(nats_server), ["gateway"], name="gateway")
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def gateway_then_persist(
    nats_server: NatsServer, tmp_path: Path
) -> Iterator[tuple[DcuProcess, Callable[[], DcuProcess]]]:
    """A lone ``dcu gateway`` of this test's own, and a way to start ``dcu persist``
    beside it (same work directory, so the same SQLite database)."""
    config = lone_gateway_config(nats_server)
    started = [DcuProcess(tmp_path, config, ["gateway"], name="gateway").start()]

    def persist() -> DcuProcess:
        process = DcuProcess(tmp_path, config, ["persist"], name="persist")
        started.append(process.start(wait_http=False))
        return process

    try:
        yield started[0], persist
    finally:
        for process in reversed(started):
            process.stop()


def requested_events(service: DcuProcess, task_id: str) -> list[dict[str, Any]]:
    """Every ``requested`` message of the task the stream holds, by subject."""
    subject = f"{service.config['nats']['subject_prefix']}.task.{task_id}.requested"

    async def main() -> list[dict[str, Any]]:
        nc = await nats.connect(service.config["nats"]["url"])
        try:
            sub = await nc.jetstream().subscribe(subject, ordered_consumer=True)
            found: list[dict[str, Any]] = []
            try:
                while True:
                    try:
                        msg = await sub.next_msg(timeout=2)
                    except nats.errors.TimeoutError:
                        return found
                    found.append(json.loads(msg.data))
                    if not msg.metadata.num_pending:
                        return found
            finally:
                await sub.unsubscribe()
        finally:
            await nc.close()

    return asyncio.run(main())


def task_total(service: DcuProcess, username: str) -> int:
    status, body = service.get(f"/query?username={username}")
    assert status == 200, body
    return int(body["data"]["total"])


def without_duration(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "duration"}


# --- one write ---------------------------------------------------------------------------


def test_status_right_after_start_answers_from_the_stream(lone_gateway: DcuProcess) -> None:
    username = f"quick-{uuid.uuid4().hex[:8]}"
    for _ in range(20):
        # Given a task just started, with no persistence subscriber to record it
        status, body = post_start(lone_gateway, {"username": username, "docker_image_name": IMAGE})
        assert status == 200, body
        assert body["data"]["state"] == "idle"
        task_id = body["data"]["task_id"]

        # When its status is read at once
        status, body = lone_gateway.get(f"/status/{task_id}")

        # Then it is the idle task its requested event describes
        assert status == 200, body
        task = body["data"]
        assert task["task_id"] == task_id
        assert (task["state"], task["state_display"], task["progress"]) == ("idle", "等待中", 0)
        assert (task["username"], task["docker_image_name"]) == (username, IMAGE)
        assert TIME_RE.match(task["start_time"])
        assert task["end_time"] is None and task["error_message"] is None
        assert task["duration"] >= 0
    # and the gateway wrote no row of its own: the list shows only what a subscriber records
    assert task_total(lone_gateway, username) == 0
    assert lone_gateway.get(f"/status/{uuid.uuid4()}")[0] == 404


# --- Idempotency-Key ---------------------------------------------------------------------


def test_a_repeated_key_starts_one_task(
    gateway_then_persist: tuple[DcuProcess, Callable[[], DcuProcess]],
) -> None:
    gateway, persist = gateway_then_persist
    username = f"retry-{uuid.uuid4().hex[:8]}"
    body = {"username": username, "docker_image_name": IMAGE, "platform": "linux/arm64"}
    headers: list[tuple[str, str | bytes]] = [(KEY, "build-42 retry")]

    # Given a start with a key, and the same start again (a client retrying)
    first = post_start(gateway, body, headers)
    again = post_start(gateway, body, headers)

    # Then both answer the same task, and the stream holds one requested event for it
    assert first == again
    assert first[0] == 200, first
    task_id = first[1]["data"]["task_id"]
    assert first[1]["data"]["state"] == "idle"
    assert first[1]["message"] == "任务已启动"
    assert len(requested_events(gateway, task_id)) == 1
    # and its status, from the stream alone (no subscriber yet), shows it
    assert task_total(gateway, username) == 0
    status, from_stream = gateway.get(f"/status/{task_id}")
    assert status == 200, from_stream

    # When persistence runs
    persist()
    wait_until(
        lambda: task_total(gateway, username),
        until=lambda total: total == 1,
        timeout=30,
        what=f"{username}'s row",
    )

    # Then it records one task from that one event, and its status has the same shape
    assert service_transitions(gateway, task_id) == [(None, "idle", True)]
    status, from_row = gateway.get(f"/status/{task_id}")
    assert status == 200, from_row
    assert without_duration(from_row["data"]) == without_duration(from_stream["data"])
    assert from_row["data"]["platform"] == "linux/arm64"
    # and a start with the key once the row exists still answers that task, publishing nothing
    assert post_start(gateway, body, headers) == first
    assert len(requested_events(gateway, task_id)) == 1
    assert task_total(gateway, username) == 1


@pytest.mark.parametrize(
    ("change", "first", "then"),
    [
        pytest.param(
            {"docker_image_name": "127.0.0.1:5000/team/other:2"},
            f"{IMAGE} for the default platform",
            "127.0.0.1:5000/team/other:2 for the default platform",
            id="another-image",
        ),
        pytest.param(
            {"platform": "linux/arm64"},
            f"{IMAGE} for the default platform",
            f"{IMAGE} for linux/arm64",
            id="another-platform",
        ),
    ],
)
def test_a_key_reused_for_another_request_is_a_409(
    lone_gateway: DcuProcess, change: dict[str, str], first: str, then: str
) -> None:
    username = f"reuse-{uuid.uuid4().hex[:8]}"
    key = f"deploy-{uuid.uuid4().hex[:8]}"
    body = {"username": username, "docker_image_name": IMAGE}
    # Given a task started with a key
    status, started = post_start(lone_gateway, body, [(KEY, key)])
    assert status == 200, started
    task_id = started["data"]["task_id"]

    # When the same user sends another request with that key
    status, answer = post_start(lone_gateway, {**body, **change}, [(KEY, key)])

    # Then it is a 409 in the envelope naming both requests, and nothing is published
    assert status == 409, answer
    assert answer == {
        "code": 40900,
        "status": 409,
        "message": f"Idempotency-Key '{key}' was used for a different request (task "
        f"{task_id}: {first}, not {then}); use a new key for a new task",
        "data": None,
    }
    events = requested_events(lone_gateway, task_id)
    assert [e["payload"]["docker_image_name"] for e in events] == [IMAGE]
    assert "platform" not in events[0]["payload"]


def test_a_key_of_200_printable_characters_is_taken(lone_gateway: DcuProcess) -> None:
    key = ("~ !" + "x" * 200)[:200]
    body = {"username": f"edge-{uuid.uuid4().hex[:8]}", "docker_image_name": IMAGE}
    status, answer = post_start(lone_gateway, body, [(KEY, key)])
    assert status == 200, answer
    assert answer["data"]["task_id"] == start.task_id_for_key(body["username"], key)


def test_without_a_key_every_start_is_a_new_task(lone_gateway: DcuProcess) -> None:
    username = f"fresh-{uuid.uuid4().hex[:8]}"
    body = {"username": username, "docker_image_name": IMAGE}
    # Given two identical starts without a key, and the same key sent by two users
    ids = [post_start(lone_gateway, body)[1]["data"]["task_id"] for _ in range(2)]
    keyed = [
        post_start(lone_gateway, {**body, "username": user}, [(KEY, "shared")])[1]["data"][
            "task_id"
        ]
        for user in (username, f"{username}-other")
    ]

    # Then each is a task of its own, with a requested event of its own
    assert len(set(ids + keyed)) == 4
    for task_id in ids + keyed:
        (event,) = requested_events(lone_gateway, task_id)
        # whose id follows from the task id: a publish retried after a lost ack is
        # stored once
        assert event["event_id"] == once_per_task_id(task_id, EventType.REQUESTED)


def test_the_user_limit_counts_tasks_without_rows_and_not_a_repeated_key(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # Given a lone gateway (no row is ever written) allowing two unfinished tasks per user
    config = lone_gateway_config(nats_server)
    config["server"]["max_active_tasks_per_user"] = 2
    gateway = DcuProcess(tmp_path, config, ["gateway"], name="gateway").start()
    try:
        username = f"limited-{uuid.uuid4().hex[:8]}"
        body = {"username": username, "docker_image_name": IMAGE}
        started = [post_start(gateway, body, [(KEY, f"job-{n}")]) for n in range(2)]
        assert [status for status, _ in started] == [200, 200], started

        # When the user repeats the first start, then asks for a third task
        repeated = post_start(gateway, body, [(KEY, "job-0")])
        third = post_start(gateway, body, [(KEY, "job-2")])

        # Then the repeat answers its task, while the third is refused: the two tasks the
        # database does not show yet count
        assert repeated == started[0]
        assert third[0] == 429, third
        assert third[1]["message"] == (
            f"user {username} already has 2 unfinished tasks, the limit is 2; "
            "try again when one has ended"
        )
        assert task_total(gateway, username) == 0
    finally:
        gateway.stop()


# --- publish retries, in process against the real NATS -----------------------------------


@pytest.fixture
async def publishing_app(nats_server: NatsServer) -> Any:
    """What ``start.publish_requested`` reads from the app (settings and a JetStream
    context) on a stream of the test's own, and that stream's name."""
    from aiohttp import web

    tag = uuid.uuid4().hex[:8]
    settings = Settings(nats=NatsSettings(url=nats_server.url, subject_prefix=f"pub{tag}"))
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    stream = f"PUB_{tag}"
    await js.add_stream(StreamConfig(name=stream, subjects=[f"pub{tag}.>"]))
    app = web.Application()
    app[SETTINGS] = settings
    app[BUS] = Bus(nc, settings.nats)
    try:
        yield app, stream
    finally:
        await js.delete_stream(stream)
        await nc.close()


def _event() -> Event:
    task_id = str(uuid.uuid4())
    return start.requested_event(task_id, Requested(username="u", docker_image_name=IMAGE))


async def test_a_publish_whose_ack_is_lost_is_retried_and_stored_once(
    publishing_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a stream that stores the first attempt but whose ack never reaches the gateway
    real = Bus.publish
    msg_ids: list[str] = []

    async def ack_lost_once(self: Bus, event: Event) -> Published:
        msg_ids.append(event.event_id)
        published = await real(self, event)
        if len(msg_ids) == 1:
            raise BusError("cannot publish: timeout")
        return published

    monkeypatch.setattr(Bus, "publish", ack_lost_once)
    monkeypatch.setattr(start, "PUBLISH_BACKOFF", 0.0)
    app, stream = publishing_app
    event = _event()

    # When the gateway publishes the requested event
    duplicate = await start.publish_requested(app, event)

    # Then it tried again with the same Nats-Msg-Id, which JetStream recognised
    assert msg_ids == [event.event_id, event.event_id]
    assert duplicate is True
    assert (await app[BUS].js.stream_info(stream)).state.messages == 1


async def test_a_publish_never_acknowledged_gives_up_after_the_attempts(
    publishing_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[str] = []

    async def never(self: Bus, event: Event) -> Published:
        attempts.append(event.event_id)
        raise BusError("cannot publish: timeout")

    monkeypatch.setattr(Bus, "publish", never)
    monkeypatch.setattr(start, "PUBLISH_BACKOFF", 0.0)
    event = _event()

    with pytest.raises(BusError, match="timeout"):
        await start.publish_requested(publishing_app[0], event)

    assert attempts == [event.event_id] * start.PUBLISH_ATTEMPTS

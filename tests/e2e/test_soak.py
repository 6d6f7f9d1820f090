"""Soak (issue 8): 200 tasks while workers are SIGKILLed at random and NATS restarts once.

Every role is its own OS process on PostgreSQL (two download workers, so a kill never
leaves a stage without one for long). Afterwards: every task has ended; a task's object
exists in S3 if and only if the task is ``completed``; and ``dcu replay`` into a fresh
database gives the live rows field by field. The counts are printed.
"""

from __future__ import annotations

import asyncio
import collections
import random
import subprocess
import threading
import time
import uuid
from pathlib import Path

import nats
import pytest

from actors.object_store import S3ObjectStore
from kernel.settings import MinioSettings, NatsSettings
from persistence.subscriber import consumer_name, progress_consumer_name
from tests.e2e.conftest import service_config
from tests.e2e.test_scaling import _rows
from tests.polling import wait_until
from tests.servers.dcu_process import DCU, DcuProcess
from tests.servers.docker_engine import DockerEngine
from tests.servers.images import PushedImages
from tests.servers.nats import NatsFactory, NatsServer, durable_caught_up
from tests.servers.postgres import create_database, drop_database
from tests.servers.s3 import S3Server

pytestmark = pytest.mark.e2e

TASKS = 200
KILLS = 6
WORKERS = {
    "download-a": ["worker", "download"],
    "download-b": ["worker", "download"],
    "compress": ["worker", "compress"],
    "upload": ["worker", "upload"],
}


async def _persistence_settled(url: str, stream: str) -> bool:
    """Both persistence durables have delivered and settled every message they take."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        names = NatsSettings(stream=stream)
        return await durable_caught_up(
            js, names.audit_stream, consumer_name(names)
        ) and await durable_caught_up(js, names.progress_stream, progress_consumer_name(names))
    finally:
        await nc.close()


async def _stream_bytes(url: str, stream: str) -> dict[str, tuple[int, int]]:
    """(messages, bytes) of the audit and progress streams."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        found = {}
        names = NatsSettings(stream=stream)
        for kind, name in (("audit", names.audit_stream), ("progress", names.progress_stream)):
            state = (await js.stream_info(name)).state
            found[kind] = (int(state.messages), int(state.bytes))
        return found
    finally:
        await nc.close()


async def _objects(settings: MinioSettings) -> set[str]:
    store = S3ObjectStore(settings)
    try:
        return {info.name for info in await store.list(settings.prefix)}
    finally:
        await store.close()


class Chaos:
    """SIGKILLs a random worker now and then and starts a replacement; restarts NATS
    once half-way. Runs in a thread until ``stop``; ``log`` says what it did."""

    def __init__(self, workers: dict[str, DcuProcess], nats_server: NatsServer, seed: int) -> None:
        self.workers = workers
        self.nats_server = nats_server
        self.random = random.Random(seed)
        self.stop = threading.Event()
        self.log: list[str] = []
        self.thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def _run(self) -> None:
        for index in range(KILLS):
            if self.stop.wait(self.random.uniform(1.0, 3.0)):
                return
            name = self.random.choice(sorted(self.workers))
            victim = self.workers[name]
            victim.kill()
            replacement = DcuProcess(
                victim.workdir, victim.config, WORKERS[name], name=f"{name}-{index}"
            )
            self.workers[name] = replacement.start(wait_http=False)
            self.log.append(f"killed {name}")
            if index == KILLS // 2:
                self.nats_server.restart()
                self.log.append("restarted NATS")


def test_two_hundred_tasks_through_kills_and_a_nats_restart(
    nats_factory: NatsFactory,
    docker_engine: DockerEngine,
    s3_server: S3Server,
    pushed_images: PushedImages,
    postgres_dsn: str,
    tmp_path: Path,
) -> None:
    nats_server = nats_factory()  # its own: the chaos restarts it
    database = create_database()
    replay_db = None
    tag = uuid.uuid4().hex[:8]
    config = service_config(
        nats=nats_server,
        engine=docker_engine,
        s3=s3_server,
        tag=tag,
        database={"url": database},
        workers={
            "max_retries": 5,
            "min_backoff_ms": 200,
            "max_backoff_ms": 2000,
            "progress_interval": 0.5,
            "upload_concurrency": 2,
        },
    )
    config["nats"]["ack_wait"] = 3
    config["download"] = {"reuse": False}  # every task runs every stage for real
    processes: dict[str, DcuProcess] = {}
    workers: dict[str, DcuProcess] = {}
    chaos = None
    try:
        processes["gateway"] = DcuProcess(tmp_path, config, ["gateway"], name="gateway").start()
        processes["persist"] = DcuProcess(tmp_path, config, ["persist"], name="persist").start(
            wait_http=False
        )
        for name, args in WORKERS.items():
            workers[name] = DcuProcess(tmp_path, config, args, name=name).start(wait_http=False)
        gateway = processes["gateway"]
        images = [pushed_images["small"].reference, pushed_images["nested"].reference]
        chaos = Chaos(workers, nats_server, seed=int(tag, 16))

        # When 200 tasks are started while workers die and NATS restarts
        started = time.monotonic()
        ids = []
        for index in range(TASKS):
            if index == 20:
                chaos.thread.start()
            request = {"username": f"soak{index % 7}", "docker_image_name": images[index % 2]}
            # a start during the NATS restart answers 503: try again
            status, body = wait_until(
                lambda: gateway.post("/start", request),  # noqa: B023 (called at once)
                until=lambda reply: reply[0] != 503,
                timeout=15,
                what="a start not answered 503",
                interval=0.2,
            )
            assert status == 200, body
            ids.append(body["data"]["task_id"])
        results = {task_id: gateway.wait_terminal(task_id, timeout=600) for task_id in ids}
        chaos.stop.set()
        chaos.thread.join(60)
        elapsed = time.monotonic() - started

        # Then every task ended, and its object exists if and only if it completed
        states = collections.Counter(r["state"] for r in results.values())
        assert set(states) <= {"completed", "failed"}, states
        minio = MinioSettings.model_validate(config["minio"])
        objects = asyncio.run(_objects(minio))
        with_object = {name.split("/")[1] for name in objects if name.count("/") == 2}
        for task_id, result in results.items():
            completed = result["state"] == "completed"
            assert (task_id in with_object) == completed, result
            if completed:
                assert result["minio_object_name"] in objects, result
        failures = collections.Counter(
            r["error_message"].split(":")[0] for r in results.values() if r["state"] == "failed"
        )
        print(
            f"\n{TASKS} tasks in {elapsed:.0f}s: {dict(states)}; chaos: {chaos.log}; "
            f"failures: {dict(failures)}"
        )
        assert states["completed"] >= TASKS * 0.9, (states, failures)

        # and a replay of the audit stream into a fresh database equals the live one
        stream = config["nats"]["stream"]
        wait_until(
            lambda: asyncio.run(_persistence_settled(nats_server.url, stream)),
            timeout=120,
            what="persistence to catch up",
            interval=0.5,
        )
        stored = asyncio.run(_stream_bytes(nats_server.url, stream))
        (audit_msgs, audit_bytes), (progress_msgs, progress_bytes) = (
            stored["audit"],
            stored["progress"],
        )
        print(
            f"stored per task: audit {audit_bytes / TASKS:.0f} B in {audit_msgs / TASKS:.1f} "
            f"facts, progress {progress_bytes / TASKS:.0f} B in {progress_msgs / TASKS:.1f} "
            "report(s)"
        )
        replay_db = create_database()
        out = subprocess.run(
            [DCU, "--config", str(tmp_path / "gateway.yaml"), "replay", "--into", replay_db],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        assert f"tasks rebuilt {TASKS}," in out.stdout, out.stdout
        live = asyncio.run(_rows(database))
        rebuilt = asyncio.run(_rows(replay_db))
        assert len(live[0]) == TASKS
        assert rebuilt == live
    finally:
        if chaos is not None:
            chaos.stop.set()
        for process in [*processes.values(), *workers.values()]:
            process.stop()
        drop_database(database)
        if replay_db is not None:
            drop_database(replay_db)

"""Independent scaling: every role as its own OS process on a shared PostgreSQL database.

Then replay for audits: the stream rebuilds the database field by field.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.e2e.conftest import service_config
from tests.e2e.helpers import consumer_waiting, stream_events
from tests.polling import wait_until
from tests.servers.dcu_process import DCU, DcuProcess
from tests.servers.postgres import create_database, drop_database

pytestmark = pytest.mark.e2e

TASKS = 10


async def _rows(dsn: str) -> tuple[list[dict], list[dict], list[dict]]:
    conn = await asyncpg.connect(dsn)
    try:
        tasks = await conn.fetch("select * from dcu_tasks order by task_id")
        log = await conn.fetch(
            "select * from dcu_task_transitions order by task_id, stream_seq, event_id"
        )
        details = await conn.fetch("select * from dcu_task_details order by task_id")
    finally:
        await conn.close()

    def strip(rows):
        return [{k: v for k, v in dict(r).items() if k != "id"} for r in rows]

    return strip(tasks), strip(log), strip(details)


def test_each_role_in_its_own_process(
    nats_server, docker_engine, s3_server, pushed_images, registry, postgres_dsn, tmp_path: Path
) -> None:
    # Given a gateway, a persistence process, one download, two compress and one upload
    # worker, all separate OS processes sharing NATS, PostgreSQL and a work directory
    database = create_database()
    config = service_config(
        nats=nats_server,
        engine=docker_engine,
        s3=s3_server,
        tag=uuid.uuid4().hex[:8],
        database={"url": database},
        workers={
            "download_concurrency": 3,
            "max_retries": 1,
            "min_backoff_ms": 100,
            "max_backoff_ms": 200,
            "progress_interval": 0.2,
        },
    )
    nats_cfg = config["nats"]
    roles = [
        ("gateway", ["gateway"], True),
        ("persist", ["persist"], False),
        ("download", ["worker", "download"], False),
        ("compress-a", ["worker", "compress"], False),
        ("compress-b", ["worker", "compress"], False),
        ("upload", ["worker", "upload"], False),
    ]
    processes: dict[str, DcuProcess] = {}
    replay_db = None
    try:
        for name, args, http in roles:
            processes[name] = DcuProcess(tmp_path, config, args, name=name).start(wait_http=http)
        gateway = processes["gateway"]
        # both compress replicas are idle and asking for work on the one shared durable
        wait_until(
            lambda: consumer_waiting(nats_cfg["url"], nats_cfg["stream"], "compress"),
            until=lambda waiting: waiting >= 2,
            timeout=60,
            what="two compress replicas waiting for work",
            interval=0.2,
        )

        # When ten tasks are started (and two that fail), all at once
        started = time.monotonic()
        images = [pushed_images["small"].reference, pushed_images["nested"].reference]
        ids = []
        for index in range(TASKS):
            status, body = gateway.post(
                "/start", {"username": f"user{index % 3}", "docker_image_name": images[index % 2]}
            )
            assert status == 200, body
            ids.append(body["data"]["task_id"])
        failing = []
        for _ in range(2):
            status, body = gateway.post(
                "/start", {"username": "x", "docker_image_name": f"{registry.address}/absent:1"}
            )
            failing.append(body["data"]["task_id"])
        results = {task_id: gateway.wait_terminal(task_id, timeout=240) for task_id in ids}
        failed = {task_id: gateway.wait_terminal(task_id, timeout=120) for task_id in failing}
        elapsed = time.monotonic() - started

        # Then every task completed, each stage ran exactly once per task
        assert {r["state"] for r in results.values()} == {"completed"}, results
        assert {r["state"] for r in failed.values()} == {"failed"}
        events = stream_events(
            nats_cfg["url"], nats_cfg["stream"], f"{nats_cfg['subject_prefix']}.task.>"
        )
        per_task = collections.defaultdict(collections.Counter)
        for event in events:
            per_task[event["task_id"]][event["type"]] += 1
        for task_id in ids:
            counts = per_task[task_id]
            for kind in ("requested", "downloaded", "compressed", "uploaded"):
                assert counts[kind] == 1, (task_id, counts)
            assert counts["failed"] == 0
        # and compress work was split across both replicas (from the events' worker field)
        compressors = collections.Counter(
            e["payload"]["worker"] for e in events if e["type"] == "compress_started"
        )
        assert len(compressors) == 2, compressors
        assert all(role.endswith(":compress") for role in compressors)
        print(f"\n{TASKS} tasks in {elapsed:.1f}s; compress split {sorted(compressors.values())}")

        # When the stream is replayed into an empty database (dcu replay)
        replay_db = create_database()
        config_file = tmp_path / "gateway.yaml"
        out = subprocess.run(
            [DCU, "--config", str(config_file), "replay", "--into", replay_db],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert f"tasks rebuilt {TASKS + 2}, events applied {len(events)}," in out.stdout, out.stdout

        # Then the rebuilt rows equal the live ones, field by field
        rebuilt = asyncio.run(_rows(replay_db))
        # (the live subscriber may still be applying the last progress reports)
        live = wait_until(
            lambda: asyncio.run(_rows(database)),
            until=lambda rows: rows == rebuilt,
            timeout=60,
            interval=0.2,
            what="the live rows to equal the rebuilt ones",
        )
        assert len(live[0]) == TASKS + 2
        assert rebuilt[0] == live[0]
        assert rebuilt[1] == live[1]
        assert rebuilt[2] == live[2]
    finally:
        for process in processes.values():
            process.stop()
        drop_database(database)
        if replay_db is not None:
            drop_database(replay_db)

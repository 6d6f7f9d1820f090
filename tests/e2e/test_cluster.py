"""DCU on a three-node JetStream cluster (issue 8, "Clustered NATS"): replicated streams
(R3), tasks in flight while the audit stream's leader is killed and later restarted all
complete, and the audit stream holds every fact."""

from __future__ import annotations

import asyncio
import collections
import uuid
from pathlib import Path
from typing import Any

import nats
import pytest

from kernel.settings import NatsSettings
from tests.e2e.conftest import service_config
from tests.e2e.helpers import stream_events
from tests.polling import wait_until
from tests.servers.dcu_process import DcuProcess
from tests.servers.docker_engine import DockerEngine
from tests.servers.images import PushedImages
from tests.servers.nats import NatsFactory
from tests.servers.s3 import S3Server

pytestmark = pytest.mark.e2e

TASKS = 6
# Facts with ids derived from (task, type): exactly one each, however often a stage ran
# (a ``*_started`` is published again by a stage redelivered after the node loss).
ONCE = ("requested", "downloaded", "compressed", "uploaded")


def _jetstream(url: str, action: Any) -> Any:
    async def main() -> Any:
        nc = await nats.connect(url)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


# While the cluster elects a leader, JetStream calls fail: ask again.
ELECTING = (Exception,)


def test_tasks_survive_the_audit_leader_going_down(
    docker_engine: DockerEngine,
    s3_server: S3Server,
    pushed_images: PushedImages,
    tmp_path: Path,
    nats_factory: NatsFactory,
) -> None:
    cluster = nats_factory.cluster()
    service = None
    try:
        first = cluster.nodes[0].url
        wait_until(
            lambda: _jetstream(first, lambda js: js.account_info()),
            timeout=60,
            what="a JetStream leader",
            interval=0.2,
            retry=ELECTING,
        )
        tag = uuid.uuid4().hex[:8]
        config = service_config(
            nats=cluster,  # type: ignore[arg-type]  # has .url, which is all it takes
            engine=docker_engine,
            s3=s3_server,
            tag=tag,
        )
        config["nats"]["replicas"] = 3
        # A leader election on a loaded host can outlast the e2e default of 2 quick
        # retries; give a stage the default's budget (a task failed that way once).
        config["workers"].update({"max_retries": 5, "min_backoff_ms": 500, "max_backoff_ms": 5000})
        service = DcuProcess(tmp_path, config, ["serve"], name="serve").start()
        audit = NatsSettings(stream=config["nats"]["stream"]).audit_stream
        info = _jetstream(first, lambda js: js.stream_info(audit))
        assert info.config.num_replicas == 3
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2

        # When tasks are in flight and the audit stream's leader is killed
        image = pushed_images["small"].reference
        ids = []
        for index in range(TASKS):
            status, body = service.post(
                "/start", {"username": f"u{index}", "docker_image_name": image}
            )
            assert status == 200, body
            ids.append(body["data"]["task_id"])
        leader = info.cluster.leader
        [victim] = [node for node in cluster.nodes if node.name == leader]
        victim.kill()
        survivor = next(node for node in cluster.nodes if node is not victim).url

        # Then every task completes (a new leader is elected, clients reconnect)
        results = {task_id: service.wait_terminal(task_id, timeout=240) for task_id in ids}
        assert {r["state"] for r in results.values()} == {"completed"}, results
        # and when the node comes back it catches up: the audit stream has every fact
        victim.start()
        prefix = config["nats"]["subject_prefix"]
        events = stream_events(survivor, config["nats"]["stream"], f"{prefix}.task.>")
        counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for event in events:
            counts[event["task_id"]][event["type"]] += 1
        for task_id in ids:
            for kind in ONCE:
                assert counts[task_id][kind] == 1, (task_id, counts[task_id])
            assert counts[task_id]["failed"] == 0
            for kind in ("download_started", "compress_started", "upload_started"):
                assert counts[task_id][kind] >= 1, (task_id, counts[task_id])
        wait_until(
            lambda: _jetstream(victim.url, lambda js: js.stream_info(audit)).state.last_seq,
            until=lambda last_seq: last_seq == len(events),
            timeout=60,
            what=f"the restarted node to catch up to {len(events)} facts",
            interval=0.2,
            retry=ELECTING,
        )
        print(f"\n{TASKS} tasks completed with node {leader} (the audit leader) killed")
    finally:
        if service is not None:
            service.stop()

"""Failures end a task ``failed`` with a clear reason; nothing is left running or stuck."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest

from tests.e2e.conftest import service_config
from tests.e2e.helpers import streams_for, transitions
from tests.servers.base import free_port
from tests.servers.dcu_process import DcuProcess

pytestmark = pytest.mark.e2e


async def _pending(url: str, stream: str) -> dict[str, tuple[int, int]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        found = {}
        for name in streams_for(stream, ">"):
            for info in await js.consumers_info(name):
                found[f"{name}/{info.name}"] = (info.num_pending, info.num_ack_pending)
        return found
    finally:
        await nc.close()


def test_unreachable_s3_fails_at_uploading(
    nats_server, docker_engine, pushed_images, tmp_path
) -> None:
    # Given a service whose S3 endpoint is a closed loopback port
    dead_port = free_port()
    config = service_config(
        nats=nats_server,
        engine=docker_engine,
        s3=None,
        tag=uuid.uuid4().hex[:8],
        s3_endpoint=f"127.0.0.1:{dead_port}",
    )
    service = DcuProcess(tmp_path, config, ["serve"], name="serve-bad-s3").start()
    try:
        # When a task runs
        status, body = service.post(
            "/start", {"username": "u", "docker_image_name": pushed_images["small"].reference}
        )
        assert status == 200
        task_id = body["data"]["task_id"]
        data = service.wait_terminal(task_id, timeout=180)

        # Then it failed at uploading, naming the endpoint, after retrying
        assert data["state"] == "failed"
        assert f"127.0.0.1:{dead_port}" in data["error_message"]
        assert "upload failed" in data["error_message"]
        assert "retries" in data["error_message"]
        log = transitions(tmp_path / "data" / "dcu.db", task_id)
        assert log[-1] == ("uploading", "failed", True)
        assert log[:-1] == [
            (None, "idle", True),
            ("idle", "downloading", True),
            ("downloading", "compressing", True),
            ("compressing", "uploading", True),
        ]
        # and nothing is left in flight on any queue
        pending = asyncio.run(_pending(nats_server.url, config["nats"]["stream"]))
        assert pending, "no consumers found"
        assert all(v == (0, 0) for v in pending.values()), pending
    finally:
        service.stop()

"""The cleanup roles as separate processes: ``dcu gateway``, ``dcu worker download
cleanup`` and ``dcu timer`` against one NATS stream, as a scaled deployment runs them."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import service_config
from tests.servers.dcu_process import DCU, DcuProcess

pytestmark = pytest.mark.e2e


@pytest.fixture
def roles(nats_server, docker_engine, tmp_path: Path) -> Iterator[dict[str, DcuProcess]]:
    tag = uuid.uuid4().hex[:8]
    config = service_config(nats=nats_server, engine=docker_engine, s3=None, tag=tag)
    started: dict[str, DcuProcess] = {}
    try:
        for name, args in (
            ("gateway", ["gateway"]),
            ("worker", ["worker", "download", "cleanup"]),
            ("timer", ["timer"]),
        ):
            process = DcuProcess(tmp_path / name, config, args, name=name)
            started[name] = process.start(wait_http=name == "gateway")
        yield started
    finally:
        for process in started.values():
            process.stop()


def test_gateway_worker_and_timer_processes_clean_up_together(roles) -> None:
    # Given an expired archive on the worker's volume
    worker = roles["worker"]
    archive = worker.workdir / "data" / "gzip" / str(uuid.uuid4()) / "app.tar.gz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"a" * 123)
    old = time.time() - 3 * 86400
    os.utime(archive, (old, old))
    roles["timer"].wait_for_log("cleanup timer")

    # When an operator asks the gateway (another process) for a gzip cleanup
    status, body = roles["gateway"].post("/cleanup", {"kind": "gzip"})

    # Then the worker process ran it and the gateway relays its report
    assert status == 200, body
    assert (body["data"]["payload"]["deleted"], body["data"]["payload"]["bytes_freed"]) == (
        1,
        123,
    )
    assert not archive.exists()
    worker.wait_for_log("cleanup gzip: request")
    # And the timer stops cleanly on SIGTERM
    assert roles["timer"].terminate(timeout=20) == 0


def test_an_invalid_schedule_stops_dcu_timer_at_start(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"storage": {"cleanup_minio_cron": "every sunday"}}))
    done = subprocess.run(
        [DCU, "--config", str(config), "timer"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "storage.cleanup_minio_cron: invalid cron expression 'every sunday'" in done.stderr

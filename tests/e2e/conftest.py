from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers.dcu_process import DcuProcess
from tests.servers.docker_engine import DockerEngine
from tests.servers.nats import NatsServer
from tests.servers.s3 import S3Server


def service_config(
    *,
    nats: NatsServer,
    engine: DockerEngine | None,
    s3: S3Server | None,
    tag: str,
    s3_endpoint: str | None = None,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """A DCU config for one test service: its own stream, subject prefix and bucket."""
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1"},
        "nats": {
            "url": nats.url,
            "stream": f"E2E_{tag}",
            "subject_prefix": f"e2e{tag}",
            "ack_wait": 10,
        },
        "minio": {
            "endpoint": s3_endpoint or (s3.endpoint if s3 else ""),
            "access_key": s3.access_key if s3 else "k",
            "secret_key": s3.secret_key if s3 else "s",
            "bucket": f"dcu-{tag}",
        },
        "workers": {
            "max_retries": 2,
            "min_backoff_ms": 200,
            "max_backoff_ms": 1000,
            "progress_interval": 0.2,
        },
    }
    if engine is not None:  # the registry engine (the default) needs no Docker engine
        config["docker"] = {"host": engine.host}
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


@pytest.fixture(scope="module")
def dcu_service(
    nats_server: NatsServer,
    docker_engine: DockerEngine,
    s3_server: S3Server,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DcuProcess]:
    """``dcu serve`` as a real process against the real engine, NATS and S3."""
    tag = uuid.uuid4().hex[:8]
    workdir: Path = tmp_path_factory.mktemp("dcu-serve")
    config = service_config(nats=nats_server, engine=docker_engine, s3=s3_server, tag=tag)
    service = DcuProcess(workdir, config, ["serve"], name="serve").start()
    try:
        yield service
    finally:
        service.stop()

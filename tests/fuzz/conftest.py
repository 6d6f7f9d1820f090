"""A real ``dcu serve`` for the fuzz tests, and a tally of the cases they send.

The service's Docker engine is a unix socket that does not exist, so a task created by a
fuzzed ``POST /start`` fails at its first pull instead of fetching anything. The tally is
shown in pytest's terminal summary and written to ``tests/fuzz/last_run.txt`` (ignored by
git) at the end of every run that sent at least one case.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from tests.e2e.conftest import service_config
from tests.servers.dcu_process import DcuProcess
from tests.servers.docker_engine import DockerEngine
from tests.servers.nats import NatsServer
from tests.servers.s3 import S3Server

CLOSED_DOCKER = "unix:///nonexistent/docker.sock"
LAST_RUN = Path(__file__).with_name("last_run.txt")

# Hypothesis examples per operation in the fuzzing phase (schemathesis adds its explicit
# examples and coverage cases on top) and per property; FUZZ_MAX_EXAMPLES=3000 for a
# longer campaign.
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "200"))
# Not the default, so the fuzzed document proves it takes the limit from the settings.
MAX_PAGE_SIZE = 50


@dataclass
class Tally:
    """Cases sent, by operation or property, and the wall time between first and last."""

    cases: Counter[str] = field(default_factory=Counter)
    first: float | None = None
    last: float | None = None

    def add(self, label: str) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.last = now
        self.cases[label] += 1

    def report(self) -> str:
        seconds = (self.last or 0.0) - (self.first or 0.0)
        lines = [f"{count:6d}  {label}" for label, count in sorted(self.cases.items())]
        lines.append(f"{sum(self.cases.values()):6d}  total cases in {seconds:.1f}s")
        return "\n".join(lines)


TALLY = Tally()


@pytest.fixture(scope="session")
def tally() -> Tally:
    return TALLY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLY.cases:
        return
    report = TALLY.report()
    terminalreporter.write_sep("-", "fuzz cases sent")
    terminalreporter.write_line(report)
    LAST_RUN.write_text(report + "\n")


@dataclass(frozen=True)
class _Engine:
    host: str


@pytest.fixture(scope="module")
def fuzz_service(
    nats_server: NatsServer,
    s3_server: S3Server,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DcuProcess]:
    """``dcu serve`` as a real process against NATS and S3, with no Docker engine."""
    tag = uuid.uuid4().hex[:8]
    workdir = tmp_path_factory.mktemp("dcu-fuzz")
    config = service_config(
        nats=nats_server,
        engine=cast(DockerEngine, _Engine(CLOSED_DOCKER)),
        s3=s3_server,
        tag=tag,
        server={"max_page_size": MAX_PAGE_SIZE},
        workers={"max_retries": 0},
    )
    service = DcuProcess(workdir, config, ["serve"], name="fuzz").start()
    try:
        yield service
    finally:
        service.stop()

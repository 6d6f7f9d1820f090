"""The web console in a real browser: Playwright (sync API) driving Debian's Chromium
against a real ``dcu serve`` with auth on (``protect_reads``), S3 from ``s3_server`` and
the real registry.

The tests are plain ``def`` functions: Playwright's sync API runs its own event loop and
refuses to start inside a running one, and pytest-asyncio runs none for a sync test.
Playwright's own browser download cannot work here, so the browser is /usr/bin/chromium,
which ``scripts/test`` installs; without it the tests fail, they do not skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, sync_playwright

from tests.e2e.conftest import service_config
from tests.servers.dcu_process import DcuProcess, http_json
from tests.servers.docker_engine import DockerEngine
from tests.servers.nats import NatsServer
from tests.servers.registry import Registry
from tests.servers.s3 import S3Server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "console-token-8d41b0e6a27c9f"
USER = "console-e2e"
REPO_ROOT = Path(__file__).resolve().parents[2]


def api(service: DcuProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """``method path`` on the API with the token; the status and the decoded envelope."""
    return http_json(method, f"{service.base_url}{path}", body, timeout=30, token=TOKEN)


@pytest.fixture(scope="module")
def artifacts() -> Path:
    """Where the screenshots go: ``$DCU_TEST_ARTIFACTS/console`` or
    ``test-artifacts/console`` at the repository root (gitignored)."""
    base = os.environ.get("DCU_TEST_ARTIFACTS")
    directory = (Path(base) if base else REPO_ROOT / "test-artifacts") / "console"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def console_service(
    nats_server: NatsServer,
    docker_engine: DockerEngine,
    s3_server: S3Server,
    registry: Registry,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DcuProcess]:
    """``dcu serve`` with a token, reads protected, and frequent progress reports."""
    tag = uuid.uuid4().hex[:8]
    config = service_config(
        nats=nats_server,
        engine=docker_engine,
        s3=s3_server,
        tag=tag,
        auth={"enabled": True, "protect_reads": True, "tokens": {USER: TOKEN}},
        workers={"progress_interval": 0.1},
    )
    workdir = tmp_path_factory.mktemp("console")
    service = DcuProcess(workdir, config, ["serve"], name="console").start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: scripts/test installs Debian's chromium package, which "
            "the browser tests drive (Playwright's own browser download cannot work here)"
        )
    launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    try:
        yield launched
    finally:
        launched.close()


@dataclass
class Problems:
    """What the page reported that should not happen: script errors, CSP refusals."""

    messages: list[str] = field(default_factory=list)

    def console(self, message: ConsoleMessage) -> None:
        # a 401 before the token is typed, or the failed task's 404s, are answers the
        # page handles; everything else logged as an error is a problem
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.messages.append(message.text)

    def page_error(self, error: Exception) -> None:
        self.messages.append(f"uncaught: {error}")


@dataclass
class ConsolePage:
    page: Page
    service: DcuProcess
    problems: Problems

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.service.port}/"

    def open(self, hash_route: str = "") -> None:
        self.page.goto(self.root + hash_route)
        self.page.wait_for_selector("body[data-ready=true]")

    def sign_in(self) -> None:
        """Type the token and submit it with the keyboard."""
        field_ = self.page.get_by_label("API token", exact=True)
        field_.fill(TOKEN)
        field_.press("Enter")
        self.page.wait_for_function(
            "document.getElementById('token-state').dataset.state === 'set'"
        )


@pytest.fixture
def console_page(browser: Browser, console_service: DcuProcess) -> Iterator[ConsolePage]:
    """A fresh browser context (English, 1280x900) on the console; fails the test when
    the page logged a script error or a CSP refusal."""
    context = browser.new_context(
        locale="en-US",
        viewport={"width": 1280, "height": 900},
        accept_downloads=True,
    )
    problems = Problems()
    page = context.new_page()
    page.on("console", problems.console)
    page.on("pageerror", problems.page_error)
    try:
        yield ConsolePage(page, console_service, problems)
        assert problems.messages == [], problems.messages
    finally:
        context.close()

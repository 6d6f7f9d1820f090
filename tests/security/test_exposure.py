"""HTTP roles refuse to listen beyond loopback without authentication, unless told to."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kernel.settings import AuthSettings, ServerSettings, Settings, is_loopback, listen_refusal
from tests.security.conftest import JENKINS_TOKEN, call, gateway_config
from tests.servers.dcu_process import DCU, DcuProcess
from tests.servers.nats import NatsServer

REFUSAL_SECONDS = 15  # the check runs before anything starts: it takes the import time


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        pytest.param("127.0.0.1", True, id="ipv4"),
        pytest.param("127.3.2.1", True, id="ipv4-net"),
        pytest.param("::1", True, id="ipv6"),
        pytest.param("[::1]", True, id="ipv6-brackets"),
        pytest.param("localhost", True, id="localhost"),
        pytest.param("LocalHost", True, id="localhost-case"),
        pytest.param("0.0.0.0", False, id="any-ipv4"),
        pytest.param("::", False, id="any-ipv6"),
        pytest.param("", False, id="empty"),
        pytest.param("192.168.1.10", False, id="private"),
        pytest.param("dcu.internal", False, id="name"),
        pytest.param("localhost.example.com", False, id="not-localhost"),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_the_refusal_rules() -> None:
    tokens = {"ci": JENKINS_TOKEN}
    exposed = ServerSettings(host="0.0.0.0")
    assert listen_refusal(Settings(server=exposed)) is not None
    assert listen_refusal(Settings(server=ServerSettings(host="127.0.0.1"))) is None
    assert (
        listen_refusal(
            Settings(
                server=exposed,
                auth=AuthSettings.model_validate({"enabled": True, "tokens": tokens}),
            )
        )
        is None
    )
    allowed = ServerSettings(host="0.0.0.0", allow_unauthenticated=True)
    assert listen_refusal(Settings(server=allowed)) is None
    # tokens are required once auth is on, wherever it listens
    refusal = listen_refusal(Settings(auth=AuthSettings(enabled=True)))
    assert refusal is not None and "auth.tokens is empty" in refusal


def run_dcu(workdir: Path, config: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [DCU, "--config", str(config_file), *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=REFUSAL_SECONDS * 2,
        check=False,
    )


@pytest.mark.parametrize("command", ["gateway", "serve"])
def test_an_exposed_http_role_without_auth_exits_2(
    nats_server: NatsServer, tmp_path: Path, command: str
) -> None:
    config = gateway_config(nats_server, server={"host": "0.0.0.0", "port": 18090})
    started = time.monotonic()
    result = run_dcu(tmp_path, config, command)
    assert time.monotonic() - started < REFUSAL_SECONDS
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(
        "dcu: refusing to listen on '0.0.0.0' without authentication"
    ), result.stderr
    assert "server.allow_unauthenticated" in result.stderr
    assert not (tmp_path / "data").exists()  # nothing was started or created


def test_auth_without_tokens_exits_2(nats_server: NatsServer, tmp_path: Path) -> None:
    config = gateway_config(nats_server, auth={"enabled": True})
    result = run_dcu(tmp_path, config, "gateway")
    assert result.returncode == 2, result.stderr
    assert "auth.enabled is true but auth.tokens is empty" in result.stderr


def test_a_bad_token_config_exits_2_without_echoing_it(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    config = gateway_config(nats_server, auth={"enabled": True, "tokens": {"ci": "tiny-Secret"}})
    result = run_dcu(tmp_path, config, "gateway")
    assert result.returncode == 2, result.stderr
    assert "auth.tokens: token of 'ci' must be at least 16" in result.stderr
    assert "tiny-Secret" not in result.stderr + result.stdout


def test_workers_do_not_need_the_http_rules(nats_server: NatsServer, tmp_path: Path) -> None:
    # A worker on an exposed config is not an HTTP role: it starts (and stops on SIGTERM).
    config = gateway_config(nats_server, server={"host": "0.0.0.0"})
    service = DcuProcess(tmp_path, config, ["worker", "compress"], name="worker")
    service.start(wait_http=False)
    try:
        # Wait for the worker to be up (its consumers started), not for a fixed time
        service.wait_for_log("stage workers started", timeout=120)
        assert service.terminate(timeout=30) == 0
    finally:
        service.stop()


def test_allow_unauthenticated_starts_on_every_interface(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    config = gateway_config(nats_server, server={"host": "0.0.0.0", "allow_unauthenticated": True})
    service = DcuProcess(tmp_path, config, ["gateway"], name="open-gateway").start()
    try:
        assert call(service, "GET", "/health").status == 200
        reply = call(service, "POST", "/start", {"username": "u", "docker_image_name": "nginx"})
        assert reply.status == 200, reply.body
        log = service.log.read_text()
        assert "(auth off)" in log
        assert "reachable beyond this host without authentication" in log
    finally:
        service.stop()

"""``dcu submit`` as a pipeline runs it: a real ``dcu serve`` (auth on), real images in
the real registry, the command as its own process.

``submit.sh`` is the acceptance test (exit codes, plain lines, ``--json``, the archive's
sha256, bad usage, ``--timeout``); the tests below look closer at what it cannot: the
output on a terminal and off one, stdout's purity, and a stream that drops (through
``FlakySseProxy``, a fake gateway in front of the real one).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.cli.conftest import DCU, TOKEN, TOKEN_NAME, SubmitImages, gateway_url
from tests.servers.dcu_process import DcuProcess

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).with_name("submit.sh")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def client_env(server: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DCU_")}
    return {**env, "DCU_SERVER": server, "DCU_TOKEN": TOKEN, **extra}


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


async def submit(server: str, *args: str, timeout: float = 180) -> Done:
    """``dcu submit ARGS`` against ``server``, stdout and stderr pipes (not a terminal)."""
    process = await asyncio.create_subprocess_exec(
        DCU,
        "submit",
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=client_env(server),
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Done(process.returncode, stdout.decode(), stderr.decode())


def test_submit_sh_passes_against_a_real_service(
    submit_service: DcuProcess, submit_images: SubmitImages
) -> None:
    env = client_env(
        gateway_url(submit_service),
        DCU=DCU,
        GOOD_IMAGE=submit_images.good,
        MISSING_IMAGE=submit_images.missing,
        SLOW_IMAGE=submit_images.slow,
        PYTHON=sys.executable,
    )

    done = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=280
    )

    output = (
        f"{done.stdout}\n{done.stderr}\n--- service log\n{submit_service.log.read_text()[-3000:]}"
    )
    assert done.returncode == 0, output
    assert "submit.sh: all checks passed" in done.stdout, output
    assert "skipped" not in done.stdout, output  # the --timeout check ran


# --- output --------------------------------------------------------------------------


async def test_off_a_terminal_stderr_has_one_plain_line_per_stage(
    submit_service: DcuProcess, submit_images: SubmitImages
) -> None:
    done = await submit(gateway_url(submit_service), "--wait", submit_images.good)

    assert done.returncode == 0, done
    task_id = done.stdout.strip()
    assert re.fullmatch(UUID, task_id), done
    short = task_id[:8]
    lines = done.stderr.splitlines()
    assert lines[0] == f"dcu: task {task_id} accepted: {submit_images.good}"
    assert lines.count(f"dcu: {short} downloading {submit_images.good}") == 1, done
    assert re.fullmatch(
        rf"dcu: {short} completed in \d+\.\d s: dcu-\w+/\S+ "
        rf"\(\d+(\.\d)? [kMG]?B, sha256 [0-9a-f]{{64}}\)",
        lines[-1],
    ), done
    # one line per stage change: no progress figures, no escape codes, no bars
    assert len(lines) <= 5, done
    assert len(set(lines)) == len(lines), done
    assert not ANSI.search(done.stderr) and "━" not in done.stderr, done


def _run_with_terminal_stderr(argv: list[str], env: Mapping[str, str]) -> tuple[int, str, str]:
    """Run ``argv`` with stderr on a pseudo-terminal (120x40) and stdout on a pipe;
    returns the exit code, stdout and what the terminal showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    shown: list[bytes] = []

    def read_terminal() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side
                return
            if not data:
                return
            shown.append(data)

    reader = threading.Thread(target=read_terminal, daemon=True)
    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=dict(env)
        )
        os.close(slave)
        slave = -1
        reader.start()
        stdout, _ = process.communicate(timeout=180)
        reader.join(10)
    finally:
        if slave != -1:
            os.close(slave)
        os.close(master)
    return process.returncode, stdout.decode(), b"".join(shown).decode(errors="replace")


def test_on_a_terminal_stderr_shows_a_bar_per_stage_that_completes(
    submit_service: DcuProcess, submit_images: SubmitImages
) -> None:
    env = client_env(gateway_url(submit_service), TERM="xterm-256color")
    env.pop("NO_COLOR", None)

    code, stdout, shown = _run_with_terminal_stderr(
        [DCU, "submit", "--wait", submit_images.good], env
    )

    text = ANSI.sub("", shown).replace("\r", "")
    assert code == 0, text
    task_id = stdout.strip()
    assert re.fullmatch(UUID, task_id), stdout
    assert "\x1b[" in shown, "no escape codes: rich did not see a terminal"
    assert f"dcu: task {task_id} accepted: {submit_images.good}" in text
    assert "completed in " in text
    # the bars, not the plain lines
    assert f"dcu: {task_id[:8]} downloading" not in text
    final = text[text.rindex("download ") :]
    for stage in ("download", "compress", "upload"):
        bar = next((line for line in final.splitlines() if line.startswith(f"{stage} ")), None)
        assert bar is not None, f"no {stage} bar in the final frame:\n{final}"
        assert "━" in bar and "100%" in bar, f"{stage} bar not complete:\n{final}"


async def test_json_stdout_is_one_document_under_the_tokens_name(
    submit_service: DcuProcess, submit_images: SubmitImages
) -> None:
    server = gateway_url(submit_service)

    waited = await submit(server, "--wait", "--json", "--user", "someone-else", submit_images.good)
    started = await submit(server, "--json", submit_images.good)

    assert waited.returncode == 0, waited
    document = json.loads(waited.stdout)  # the whole of stdout, nothing before or after
    task_id = document["task_id"]
    assert document["state"] == "completed"
    assert document["username"] == TOKEN_NAME  # auth on: the token names the user
    assert document["minio_object_name"]
    assert document["download_url"] == f"{server}/api/dcu/download/{task_id}"
    assert f"dcu: task {task_id} accepted" in waited.stderr
    assert started.returncode == 0, started
    assert set(json.loads(started.stdout)) == {"task_id", "state"}
    assert started.stderr == ""


# --- a stream that drops ------------------------------------------------------------


@dataclass
class FlakySseProxy:
    """A fake gateway in front of the real one. Every request passes through, except
    that the first ``cut`` event streams are cut after their first complete message
    (the connection closed mid-stream), and with ``refuse_streams`` every event stream
    is answered 503. Records the headers of each event-stream request."""

    upstream: str
    cut: int = 0
    refuse_streams: bool = False
    stream_requests: list[dict[str, str]] = field(default_factory=list)
    sent_before_cut: list[bytes] = field(default_factory=list)
    url: str = ""
    _session: aiohttp.ClientSession | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        forwarded = {
            name: value
            for name, value in request.headers.items()
            if name.lower() in {"authorization", "idempotency-key", "last-event-id",
                                "content-type", "accept"}
        }  # fmt: skip
        stream = request.path.endswith("/stream")
        if stream:
            self.stream_requests.append(forwarded)
            if self.refuse_streams:
                return web.json_response(
                    {"code": 50300, "status": 503, "message": "fake outage", "data": None},
                    status=503,
                )
        async with self._session.request(
            request.method,
            f"{self.upstream}{request.path_qs}",
            headers=forwarded,
            data=await request.read() or None,
            allow_redirects=False,
        ) as answer:
            if not stream or answer.status != 200:
                return web.Response(
                    body=await answer.read(),
                    status=answer.status,
                    content_type=answer.content_type,
                )
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            cut = len(self.stream_requests) <= self.cut
            buffered = b""
            async for chunk in answer.content.iter_any():
                if not cut:
                    await response.write(chunk)
                    continue
                buffered += chunk
                if b"\n\n" in buffered:
                    first = buffered[: buffered.index(b"\n\n") + 2]
                    await response.write(first)
                    self.sent_before_cut.append(first)
                    assert request.transport is not None
                    request.transport.close()
                    return response
            await response.write_eof()
            return response

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FlakySseProxy]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._session = aiohttp.ClientSession()
        try:
            yield self
        finally:
            await self._session.close()
            await runner.cleanup()


def _event_id(message: bytes) -> str:
    for line in message.decode().splitlines():
        if line.startswith("id: "):
            return line[4:]
    raise AssertionError(f"no id in {message!r}")


async def test_a_dropped_stream_resumes_after_the_last_event_it_carried(
    submit_service: DcuProcess, submit_images: SubmitImages
) -> None:
    # Given a proxy that cuts the first event stream after its first message
    proxy = FlakySseProxy(gateway_url(submit_service), cut=1)
    async with proxy.running():
        # When dcu submit --wait goes through it
        done = await submit(proxy.url, "--wait", submit_images.good)

    # Then it reconnects once, resuming after the event it had, and the task completes
    assert done.returncode == 0, done
    assert len(proxy.stream_requests) == 2, proxy.stream_requests
    first, second = proxy.stream_requests
    assert "Last-Event-ID" not in first
    assert second["Last-Event-ID"] == _event_id(proxy.sent_before_cut[0])
    assert second["Authorization"] == f"Bearer {TOKEN}"
    assert done.stderr.count("event stream lost") == 1, done
    assert done.stderr.count(" downloading ") == 1, done  # nothing shown twice
    assert "completed in " in done.stderr.splitlines()[-1], done


async def test_a_stream_that_keeps_failing_gives_way_to_polling_the_status(
    submit_service: DcuProcess, submit_images: SubmitImages
) -> None:
    proxy = FlakySseProxy(gateway_url(submit_service), refuse_streams=True)
    async with proxy.running():
        done = await submit(proxy.url, "--wait", "--json", submit_images.good)

    assert done.returncode == 0, done
    assert len(proxy.stream_requests) == 5  # STREAM_ATTEMPTS
    assert all("Last-Event-ID" not in headers for headers in proxy.stream_requests)
    assert "polling status every 2 s" in done.stderr, done
    assert json.loads(done.stdout)["state"] == "completed"

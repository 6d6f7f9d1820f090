"""``dcu submit IMAGE [IMAGE...]``: start a task from a pipeline and, with ``--wait``,
follow it to its end.

One image (without ``--name``) is ``POST /api/dcu/start``; several images, or any with
``--name``, are one ``POST /api/dcu/bundle``. Every invocation sends a fresh
``Idempotency-Key`` and reuses it when the POST is tried again after a connection error
or a 502/503/504, so a retry answers the same task instead of starting a second one.

The gateway is ``--server``, else ``$DCU_SERVER``, else ``http://127.0.0.1:8090``; the
bearer token ``--token``, else ``$DCU_TOKEN``; the username ``--user``, else
``$DCU_USERNAME``, else the OS login name (a gateway with auth ignores it and uses the
token's name).

With ``--wait`` the task's events are read from ``GET /events/{task_id}/stream``
(server-sent events, ``SseParser``). A dropped stream is reopened with ``Last-Event-ID``
(``STREAM_ATTEMPTS`` tries in a row, backoff doubling from ``STREAM_BACKOFF``), then the
command falls back to polling ``GET /status``. Once the stream has passed the terminal
event the final ``/status`` is read (polled until the database has caught up) and
reported.

Exit codes (``EXIT_*``)::

    0  completed (or, without --wait, accepted)
    1  the task failed (its error on stderr), or the gateway could not be used:
       unreachable, 401, 404, 409, 429, 5xx
    2  bad usage: an argument the command refuses, or a 400 from the gateway
    3  --timeout passed before the task ended; the task keeps running on the server

Errors (all end the command with a line on stderr)::

    SubmitError            exit 1: a refusal (401, 404, 409, 429), a malformed answer
    ├── Unreachable        exit 1: no connection, or a 5xx (worth another try)
    ├── Refused            exit 2: bad usage, or the gateway's 400
    └── WaitTimeout        exit 3: also an asyncio.TimeoutError

Output: stdout holds the task id (plain) or one JSON document (``--json``), nothing else.
Stderr gets live progress bars (``rich.progress``) when it is a terminal, else one plain
line per stage change (``PlainDisplay``).
"""

# HTTP with aiohttp rather than urllib: the event stream must be read incrementally under
# an overall deadline and a per-read timeout, which asyncio gives directly (urllib would
# need a thread per stream and cannot be interrupted); ``dcu fetch`` uses aiohttp too, so
# both commands share one client stack, its helpers and its error types.

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import getpass
import json
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, TextIO

import aiohttp

from dcu.fetch import API, auth_headers, download_url, gateway_message, server_url, token_of
from events.formats import ArchiveFormat

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3

IDEMPOTENCY_HEADER = "Idempotency-Key"  # as gateway.models names it
START_ATTEMPTS = 4  # tries of the POST, all with the same Idempotency-Key
START_BACKOFF = 0.5  # seconds before the second try, doubled before each next one
RETRY_STATUSES = frozenset({502, 503, 504})  # the gateway could not store the request
STREAM_ATTEMPTS = 5  # reconnections in a row without an event before polling instead
STREAM_BACKOFF = 0.5  # seconds before the first reconnection, doubled up to STREAM_BACKOFF_MAX
STREAM_BACKOFF_MAX = 8.0
POLL_INTERVAL = 2.0  # seconds between /status reads when the stream cannot be used
POLL_ATTEMPTS = 5  # failed /status reads in a row before giving up
# /status reads once the terminal event is seen: the first at once, then after 0.05 s,
# doubling up to 1 s (the row usually follows the event within milliseconds)
SETTLE_INTERVAL = 0.05
SETTLE_INTERVAL_MAX = 1.0
SETTLE_TIMEOUT = 60.0  # seconds /status may lag behind the terminal event
# The gateway writes a keep-alive every 15 s: three missed ones mean a dead connection.
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=45)
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
TERMINAL_STATES = frozenset({"completed", "failed"})
TERMINAL_EVENTS = frozenset({"uploaded", "failed"})
# The event that starts each stage, and the state it moves the task into.
STAGE_STARTS = {
    "download_started": "downloading",
    "compress_started": "compressing",
    "upload_started": "uploading",
}
# The event that ends each stage, and the payload field holding the stage's bytes.
STAGE_ENDS = {"downloaded": ("download", "bytes"), "compressed": ("compress", "bytes_out")}
STAGES = ("download", "compress", "upload")
STATE_STAGES = {"downloading": "download", "compressing": "compress", "uploading": "upload"}


class SubmitError(Exception):
    """Why the command ends without a completed task, worded for the terminal."""

    exit_code = EXIT_FAILED


class Unreachable(SubmitError):
    """The gateway could not be reached, or answered 5xx."""


class Refused(SubmitError):
    """Bad usage: an argument this command refuses, or the gateway's 400."""

    exit_code = EXIT_USAGE


class WaitTimeout(SubmitError, asyncio.TimeoutError):
    """``--timeout`` passed before the task ended."""

    exit_code = EXIT_TIMEOUT


class _StreamLost(Exception):
    """One connection to the event stream ended before the terminal event."""


# --- server-sent events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SseMessage:
    event: str
    """The ``event:`` field; ``message`` when the message names none."""
    data: str
    """The ``data:`` lines joined by newlines."""
    id: str | None
    """The last event id as of this message (it carries over from earlier messages)."""


_LINE_END = re.compile(r"\r\n|\r|\n")


class SseParser:
    """An incremental ``text/event-stream`` parser (the WHATWG rules): feed it the bytes as
    they arrive, in chunks of any size, and it returns the complete messages.

    Lines end in CRLF, LF or CR (a chunk that ends in CR ends its line at once, and an LF
    that starts the next chunk completes that CRLF); ``:`` starts a comment (counted in
    ``comments``: the gateway's keep-alives); a field without a colon has an empty value;
    one space after the colon is dropped; a blank line ends a message, and a message
    without ``data`` is dropped; an ``id`` holding NUL is ignored. Bytes that are not
    UTF-8 become U+FFFD.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._event = ""
        self._data: list[str] = []
        self._started = False
        self._after_cr = False
        self.last_event_id: str | None = None
        self.retry: int | None = None
        self.comments = 0

    def feed(self, chunk: bytes) -> list[SseMessage]:
        text = self._decoder.decode(chunk)
        if not text:
            return []
        if not self._started:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._after_cr:  # the LF of a CRLF split between chunks: that line has ended
            self._after_cr = False
            text = text.removeprefix("\n")
        text = self._pending + text
        messages: list[SseMessage] = []
        start = 0
        for end in _LINE_END.finditer(text):
            message = self._line(text[start : end.start()])
            start = end.end()
            if message is not None:
                messages.append(message)
        self._after_cr = start == len(text) and text.endswith("\r")
        self._pending = text[start:]
        return messages

    def _line(self, line: str) -> SseMessage | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_event_id = value or None
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> SseMessage | None:
        event, data = self._event or "message", self._data
        self._event, self._data = "", []
        if not data:
            return None
        return SseMessage(event=event, data="\n".join(data), id=self.last_event_id)


# --- the request ------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What the command line asks for, with the environment's defaults applied."""

    images: tuple[str, ...]
    server: str
    token: str | None
    username: str | None
    platform: str | None = None
    format: str | None = None
    name: str | None = None
    wait: bool = False
    timeout: float | None = None
    json: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        """Raises Refused when no username can be found and no token names the user."""
        token = token_of(args.token)
        username = args.user or os.environ.get("DCU_USERNAME") or login_name()
        if username is None and token is None:
            raise Refused("no username: give --user or set DCU_USERNAME (or use a token)")
        return cls(
            images=tuple(args.images),
            server=server_url(args.server),
            token=token,
            username=username,
            platform=args.platform,
            format=args.format,
            name=args.name,
            wait=args.wait,
            timeout=args.timeout,
            json=args.json,
        )

    @property
    def bundle(self) -> bool:
        return len(self.images) > 1 or self.name is not None

    @property
    def subject(self) -> str:
        """What the task packages, for the terminal."""
        if not self.bundle:
            return self.images[0]
        return f"bundle {self.name or 'bundle'} of {', '.join(self.images)}"


def login_name() -> str | None:
    """The OS login name (``LOGNAME``, ``USER``, then the password database), None when
    the process has none (a container's arbitrary uid)."""
    try:
        return getpass.getuser() or None
    except (OSError, KeyError):
        return None


def start_request(options: Options) -> tuple[str, dict[str, Any]]:
    """The path and JSON body of the POST that starts the task."""
    body: dict[str, Any] = {}
    if options.username is not None:
        body["username"] = options.username
    if options.bundle:
        path = f"{API}/bundle"
        if options.name is not None:
            body["name"] = options.name
        body["images"] = list(options.images)
    else:
        path = f"{API}/start"
        body["docker_image_name"] = options.images[0]
    if options.platform is not None:
        body["platform"] = options.platform
    if options.format is not None:
        body["format"] = options.format
    return path, body


def positive_seconds(text: str) -> float:
    """``--timeout``'s value: a positive number of seconds (argparse type)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return seconds


# --- the gateway ------------------------------------------------------------------------


class Gateway:
    """The HTTP calls ``dcu submit`` makes; aiohttp's errors become SubmitError here."""

    def __init__(self, server: str, token: str | None, err: TextIO) -> None:
        self.server = server
        self._headers = auth_headers(token)
        self._err = err
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Gateway:
        self._session = aiohttp.ClientSession(timeout=REQUEST_TIMEOUT)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use Gateway in an async with"
        return self._session

    def _unreachable(self, exc: BaseException) -> Unreachable:
        why = str(exc) or type(exc).__name__
        return Unreachable(f"cannot reach the gateway at {self.server}: {why}")

    async def _refusal(self, response: aiohttp.ClientResponse) -> SubmitError:
        message = await gateway_message(response)
        if response.status >= 500:
            return Unreachable(f"the gateway answered {response.status}: {message}")
        if response.status == 400:
            return Refused(f"the gateway refused the request: {message}")
        hint = " (give --token or set DCU_TOKEN)" if response.status == 401 else ""
        return SubmitError(f"the gateway answered {response.status}: {message}{hint}")

    async def _data(self, response: aiohttp.ClientResponse) -> dict[str, Any]:
        if response.status != 200:
            raise await self._refusal(response)
        try:
            body = await response.json(content_type=None)
            data = body["data"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SubmitError(f"the gateway's answer is not an envelope: {exc}") from None
        if not isinstance(data, dict):
            raise SubmitError("the gateway's answer holds no data")
        return data

    async def start(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST ``body``; returns the envelope's data (``task_id``, ``state``).

        Tries again (same Idempotency-Key) after a connection error or a 502/503/504,
        at most START_ATTEMPTS times. Raises Refused for a 400, SubmitError otherwise.
        """
        headers = {**self._headers, IDEMPOTENCY_HEADER: str(uuid.uuid4())}
        delay = START_BACKOFF
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                async with self.session.post(
                    f"{self.server}{path}", json=body, headers=headers
                ) as response:
                    if response.status not in RETRY_STATUSES or attempt == START_ATTEMPTS:
                        return await self._data(response)
                    why = f"{response.status} {await gateway_message(response)}"
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                if attempt == START_ATTEMPTS:
                    raise self._unreachable(exc) from None
                why = str(exc) or type(exc).__name__
            print(
                f"dcu submit: POST {path} not answered ({why}); again in {delay:g} s "
                f"with the same {IDEMPOTENCY_HEADER} (try {attempt + 1} of {START_ATTEMPTS})",
                file=self._err,
                flush=True,
            )
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    async def status(self, task_id: str) -> dict[str, Any]:
        """The task's ``/status`` data. Raises SubmitError."""
        try:
            async with self.session.get(f"{self.server}{API}/status/{task_id}",
                                        headers=self._headers) as response:  # fmt: skip
                return await self._data(response)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise self._unreachable(exc) from None

    @contextlib.asynccontextmanager
    async def events(self, task_id: str, last_event_id: str | None) -> AsyncIterator[
        AsyncIterator[SseMessage] | None
    ]:  # fmt: skip
        """The task's event stream, resumed after ``last_event_id``; None for a 204 (the
        gateway says the client has the terminal event). Raises SubmitError for a
        refusal (4xx), and _StreamLost when the connection fails or a 5xx answers."""
        headers = {**self._headers, "Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        url = f"{self.server}{API}/events/{task_id}/stream"
        try:
            async with self.session.get(
                url, params={"include_progress": "true"}, headers=headers, timeout=STREAM_TIMEOUT
            ) as response:
                if response.status >= 500:
                    raise _StreamLost(f"{response.status} {await gateway_message(response)}")
                if response.status not in (200, 204):
                    raise await self._refusal(response)
                yield None if response.status == 204 else _messages(response)
        except aiohttp.ClientPayloadError:
            raise _StreamLost("the connection closed mid-stream") from None
        except aiohttp.ClientConnectionError as exc:
            raise _StreamLost(str(exc) or type(exc).__name__) from None


async def _messages(response: aiohttp.ClientResponse) -> AsyncIterator[SseMessage]:
    parser = SseParser()
    async for chunk in response.content.iter_any():
        for message in parser.feed(chunk):
            yield message


# --- what the terminal shows ------------------------------------------------------------


class Display(Protocol):
    """Where the task's progress goes (stderr); never stdout."""

    def accepted(self, task_id: str, subject: str) -> None: ...

    def event(self, kind: str, payload: Mapping[str, Any]) -> None: ...

    def state(self, state: str) -> None:
        """A state read from ``/status`` (while polling instead of streaming)."""

    def note(self, text: str) -> None: ...

    def completed(self, line: str) -> None: ...

    def close(self) -> None: ...


def short_id(task_id: str) -> str:
    return task_id[:8]


def human_bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def completion_line(task_id: str, status: Mapping[str, Any], bucket: str | None) -> str:
    """``dcu: 2f1c0a9e completed in 12.3 s: bucket/object (41.2 MB, sha256 ...)``."""
    seconds = (status.get("duration") or 0) / 1000
    where = status.get("minio_object_name") or status.get("gzip_file_name") or "?"
    if bucket:
        where = f"{bucket}/{where}"
    facts = []
    if isinstance(status.get("archive_bytes"), int):
        facts.append(human_bytes(status["archive_bytes"]))
    if status.get("archive_sha256"):
        facts.append(f"sha256 {status['archive_sha256']}")
    detail = f" ({', '.join(facts)})" if facts else ""
    return f"dcu: {short_id(task_id)} completed in {seconds:.1f} s: {where}{detail}"


@dataclass
class PlainDisplay:
    """One line per stage change, for logs: no progress figures, no escape codes."""

    err: TextIO
    task_id: str = ""
    subject: str = ""
    _state: str = "idle"

    def _print(self, text: str) -> None:
        print(f"dcu: {short_id(self.task_id)} {text}", file=self.err, flush=True)

    def accepted(self, task_id: str, subject: str) -> None:
        self.task_id, self.subject = task_id, subject
        print(f"dcu: task {task_id} accepted: {subject}", file=self.err, flush=True)

    def event(self, kind: str, payload: Mapping[str, Any]) -> None:
        state = STAGE_STARTS.get(kind)
        if state is None:
            return
        attempt = payload.get("attempt")
        again = f" (attempt {attempt})" if isinstance(attempt, int) and attempt > 1 else ""
        if state != self._state or again:
            self._enter(state, again)

    def state(self, state: str) -> None:
        if state in STATE_STAGES and state != self._state:
            self._enter(state, "")

    def _enter(self, state: str, again: str) -> None:
        self._state = state
        what = f" {self.subject}" if state == "downloading" else ""
        self._print(f"{state}{what}{again}")

    def note(self, text: str) -> None:
        self._print(text)

    def completed(self, line: str) -> None:
        print(line, file=self.err, flush=True)

    def close(self) -> None:
        return None


class BarDisplay:
    """A live bar per stage (``rich.progress``) on a terminal, driven by the progress
    events' bytes and rate; a bar completes when its stage's completion event arrives.
    Text from the gateway is printed as it is (no rich markup, no highlighting)."""

    def __init__(self, err: TextIO) -> None:
        # imported here: only a terminal needs rich
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskID,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description:<9}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[size]:>19}"),
            TextColumn("{task.fields[rate]:>11}"),
            TimeElapsedColumn(),
            console=Console(file=err),
        )
        self._bars: dict[str, TaskID] = {}
        self._task_id = ""

    def _print(self, text: str) -> None:
        self._progress.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def accepted(self, task_id: str, subject: str) -> None:
        self._task_id = task_id
        self._print(f"dcu: task {task_id} accepted: {subject}")
        for stage in STAGES:
            self._bars[stage] = self._progress.add_task(
                stage, total=None, start=False, size="", rate=""
            )
        self._progress.start()

    def _begin(self, stage: str) -> None:
        bar = self._bars[stage]
        if not self._progress.tasks[bar].started:
            self._progress.start_task(bar)

    def _show(self, stage: str, done: int, total: int | None, rate: str = "") -> None:
        size = human_bytes(done) + ("" if total is None else f" / {human_bytes(total)}")
        self._progress.update(self._bars[stage], completed=done, total=total, size=size, rate=rate)

    def _finish(self, stage: str, size: object) -> None:
        """Fill the stage's bar: to ``size`` bytes when known, else as far as it got."""
        task = self._progress.tasks[self._bars[stage]]
        if task.finished:
            return
        self._begin(stage)
        done = size if isinstance(size, int) and size > 0 else int(task.completed)
        if done:
            self._show(stage, done, done)
        else:  # nothing to count (a reused archive skips the stage's work)
            self._progress.update(self._bars[stage], total=1, completed=1, size="-")

    def event(self, kind: str, payload: Mapping[str, Any]) -> None:
        if not self._bars:
            return
        if kind in STAGE_STARTS:
            self._begin(STATE_STAGES[STAGE_STARTS[kind]])
        elif kind == "progress" and payload.get("stage") in self._bars:
            stage = str(payload["stage"])
            self._begin(stage)
            done, total, rate = (payload.get(key) for key in ("bytes_done", "bytes_total", "rate"))
            self._show(
                stage,
                done if isinstance(done, int) else 0,
                total if isinstance(total, int) and total > 0 else None,
                f"{human_bytes(int(rate))}/s" if isinstance(rate, int | float) else "",
            )
        elif kind in STAGE_ENDS:
            stage, size_field = STAGE_ENDS[kind]
            self._finish(stage, payload.get(size_field))
        elif kind == "uploaded":
            for stage in STAGES:  # a reused archive skips the compress stage's events
                self._finish(stage, payload.get("bytes") if stage == "upload" else None)

    def state(self, state: str) -> None:
        order = list(STATE_STAGES)
        if not self._bars or state not in STATE_STAGES:
            return
        for earlier in order[: order.index(state)]:
            self._finish(STATE_STAGES[earlier], None)
        self._begin(STATE_STAGES[state])

    def note(self, text: str) -> None:
        self._print(f"dcu: {short_id(self._task_id)} {text}")

    def completed(self, line: str) -> None:
        self._print(line)

    def close(self) -> None:
        self._progress.stop()


def display_for(err: TextIO) -> Display:
    """Bars when ``err`` is a terminal, plain lines otherwise (a pipeline's log)."""
    return BarDisplay(err) if err.isatty() else PlainDisplay(err)


# --- following the task -----------------------------------------------------------------


@dataclass
class Follower:
    """Follows one task's event stream to its terminal event, reconnecting with
    ``Last-Event-ID``; falls back to polling ``/status`` when the stream keeps failing."""

    gateway: Gateway
    task_id: str
    display: Display
    last_event_id: str | None = None
    bucket: str | None = None
    terminal: str | None = None
    reconnects: int = 0
    _seen: set[str] = field(default_factory=set)

    async def follow(self) -> dict[str, Any] | None:
        """Until the task ends: None once the stream has carried the terminal event (then
        ``settle``), or the final ``/status`` data when the stream could not be used and
        ``/status`` was polled instead. Raises SubmitError."""
        if await self._stream():
            return None
        self.display.note(
            f"event stream unavailable after {STREAM_ATTEMPTS} tries; "
            f"polling status every {POLL_INTERVAL:g} s"
        )
        return await self._poll(POLL_INTERVAL)

    async def _stream(self) -> bool:
        """Read the stream until the terminal event (True) or until STREAM_ATTEMPTS
        connections in a row bring no event (False)."""
        failures = 0
        delay = STREAM_BACKOFF
        while True:
            got = 0
            try:
                async with self.gateway.events(self.task_id, self.last_event_id) as messages:
                    if messages is None:  # 204: believed only when /status agrees
                        if await self._ended():
                            return True
                        raise _StreamLost("204 from the stream, but the task runs on")
                    async for message in messages:
                        got += 1
                        self._receive(message)
                        if self.terminal is not None:
                            return True
                why = "the stream ended before the task did"
            except _StreamLost as exc:
                why = str(exc)
            if got:
                failures, delay = 0, STREAM_BACKOFF
            else:
                failures += 1
            if failures >= STREAM_ATTEMPTS:
                return False
            self.reconnects += 1
            self.display.note(f"event stream lost ({why}); reconnecting in {delay:g} s")
            await asyncio.sleep(delay)
            if not got:
                delay = min(delay * 2, STREAM_BACKOFF_MAX)

    async def _ended(self) -> bool:
        status = await self.gateway.status(self.task_id)
        if status.get("state") in TERMINAL_STATES:
            self.terminal = "uploaded" if status["state"] == "completed" else "failed"
            return True
        return False

    def _receive(self, message: SseMessage) -> None:
        if message.id is not None:
            if message.id in self._seen:
                return
            self._seen.add(message.id)
            self.last_event_id = message.id
        try:
            event = json.loads(message.data)
            payload = event.get("payload") or {}
        except (ValueError, AttributeError):
            return  # not an event of ours: nothing to show
        if not isinstance(payload, dict):
            return
        self.display.event(message.event, payload)
        if message.event == "uploaded":
            self.bucket = payload.get("bucket")
        if message.event in TERMINAL_EVENTS:
            self.terminal = message.event

    async def settle(self) -> dict[str, Any]:
        """``/status`` once it shows the end the stream told (the database records the
        event shortly after the stream carries it). Not bound by --timeout: the task has
        ended. Raises SubmitError after SETTLE_TIMEOUT seconds."""
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT):
                return await self._poll(SETTLE_INTERVAL, SETTLE_INTERVAL_MAX)
        except TimeoutError:
            raise SubmitError(
                f"task {self.task_id} ended ({self.terminal}) but /status did not say so "
                f"within {SETTLE_TIMEOUT:g} s"
            ) from None

    async def _poll(self, interval: float, longest: float | None = None) -> dict[str, Any]:
        """``/status`` once it is terminal, read every ``interval`` seconds (doubled after
        each read up to ``longest``, when given). Raises Unreachable after POLL_ATTEMPTS
        failed reads in a row, SubmitError at once for a refusal."""
        failures = 0
        while True:
            try:
                status = await self.gateway.status(self.task_id)
            except Unreachable:
                failures += 1
                if failures >= POLL_ATTEMPTS:
                    raise
            else:
                failures = 0
                state = str(status.get("state"))
                if state in TERMINAL_STATES:
                    return status
                self.display.state(state)
            await asyncio.sleep(interval)
            if longest is not None:
                interval = min(interval * 2, longest)


# --- the command ------------------------------------------------------------------------


@dataclass
class Submission:
    """One run of the command, writing to ``out`` (stdout) and ``err`` (stderr)."""

    options: Options
    out: TextIO
    err: TextIO
    began: float = field(default_factory=time.monotonic)

    def _fail(self, text: str) -> None:
        print(f"dcu submit: {text}", file=self.err, flush=True)

    def _print_json(self, document: Mapping[str, Any]) -> None:
        print(json.dumps(document, ensure_ascii=False, indent=2), file=self.out, flush=True)

    def _result(self, status: Mapping[str, Any], task_id: str) -> dict[str, Any]:
        return {**status, "download_url": download_url(self.options.server, task_id)}

    async def run(self) -> int:
        """Start the task and, with --wait, follow it; returns the exit code."""
        options = self.options
        path, body = start_request(options)
        async with Gateway(options.server, options.token, self.err) as gateway:
            try:
                started = await gateway.start(path, body)
                task_id = str(started["task_id"])
            except SubmitError as exc:
                self._fail(str(exc))
                return exc.exit_code
            except KeyError:
                self._fail("the gateway's answer names no task_id")
                return EXIT_FAILED
            if not options.json:
                print(task_id, file=self.out, flush=True)
            if not options.wait:
                if options.json:
                    self._print_json(started)
                return EXIT_COMPLETED
            return await self._wait(gateway, task_id)

    async def _wait(self, gateway: Gateway, task_id: str) -> int:
        options = self.options
        display = display_for(self.err)
        display.accepted(task_id, options.subject)
        follower = Follower(gateway, task_id, display)
        try:
            status = await self._within_timeout(follower, task_id) or await follower.settle()
        except WaitTimeout as exc:
            display.close()
            self._fail(str(exc))
            if options.json:  # the task as it is now: the pipeline keeps its id
                with contextlib.suppress(SubmitError, TimeoutError):
                    async with asyncio.timeout(SETTLE_TIMEOUT / 6):
                        now = await gateway.status(task_id)
                    self._print_json(self._result(now, task_id))
            return exc.exit_code
        except SubmitError as exc:
            display.close()
            self._fail(str(exc))
            return exc.exit_code
        display.close()
        if options.json:
            self._print_json(self._result(status, task_id))
        if status.get("state") != "completed":
            message = status.get("error_message") or "no error message recorded"
            self._fail(f"task {task_id} failed: {message}")
            return EXIT_FAILED
        display.completed(completion_line(task_id, status, follower.bucket))
        return EXIT_COMPLETED

    async def _within_timeout(self, follower: Follower, task_id: str) -> dict[str, Any] | None:
        """``follower.follow()``, ended by WaitTimeout ``--timeout`` seconds after the
        command began (the task is left running)."""
        if self.options.timeout is None:
            return await follower.follow()
        deadline = self.began + self.options.timeout
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                return await follower.follow()
        except TimeoutError:
            raise WaitTimeout(
                f"task {task_id} not finished after {self.options.timeout:g} s (--timeout); "
                f"it keeps running on the server: {self.options.server}{API}/status/{task_id}"
            ) from None


def _loop_time(monotonic_deadline: float) -> float:
    """``monotonic_deadline`` (a ``time.monotonic`` value) on the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The ``dcu submit`` command (parsed by ``dcu.cli``); returns its exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        options = Options.from_args(args)
    except Refused as exc:
        print(f"dcu submit: {exc}", file=err)
        return exc.exit_code
    submission = Submission(options, out, err)
    try:
        return asyncio.run(submission.run())
    except KeyboardInterrupt:
        print("dcu submit: interrupted; a started task keeps running on the server", file=err)
        return 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``dcu submit``'s arguments, on its subparser."""
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image reference(s)")
    parser.add_argument("--platform", default=None, help="os/arch[/variant], e.g. linux/arm64")
    parser.add_argument(
        "--format",
        default=None,
        choices=[fmt.value for fmt in ArchiveFormat],
        help="archive format",
    )
    parser.add_argument(
        "--name", default=None, help="bundle name (several images, or one as a bundle)"
    )
    parser.add_argument("--server", default=None, help="gateway URL (env DCU_SERVER)")
    parser.add_argument("--token", default=None, help="bearer token (env DCU_TOKEN)")
    parser.add_argument(
        "--user", default=None, help="username (env DCU_USERNAME, else the login name)"
    )
    parser.add_argument("--wait", action="store_true", help="follow the task to its end")
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=None,
        metavar="S",
        help="with --wait: exit 3 after S seconds (the task keeps running)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the start result (or final status) as JSON"
    )

"""What the end-to-end tests check an archive and a task with, against the real servers."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import re
import sqlite3
import subprocess
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from miniopy_async import Minio

from kernel.settings import NatsSettings
from tests.servers.docker_engine import DockerEngine
from tests.servers.s3 import S3Server

TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
STAGE_EVENTS = [
    "requested",
    "download_started",
    "downloaded",
    "compress_started",
    "compressed",
    "upload_started",
    "uploaded",
]
"""The non-progress events of a task that completes, in stream order."""
HAPPY_PATH = [
    (None, "idle"),
    ("idle", "downloading"),
    ("downloading", "compressing"),
    ("compressing", "uploading"),
    ("uploading", "completed"),
]
"""The transition log of a task that completes: (from_state, to_state)."""
STATUS_FIELDS = {
    "task_id",
    "state",
    "state_display",
    "docker_image_name",
    "gzip_file_name",
    "minio_object_name",
    "progress",
    "duration",
    "username",
    "start_time",
    "end_time",
    "error_message",
}


class EventRecorder:
    """Subscribes (core NATS, no JetStream) to ``<prefix>.>`` in a thread of its own."""

    def __init__(self, url: str, subject: str) -> None:
        self.url = url
        self.subject = subject
        self.events: list[dict[str, Any]] = []
        self.subjects: list[str] = []
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        nc = await nats.connect(self.url)

        async def handler(msg: Any) -> None:
            self.subjects.append(msg.subject)
            try:
                self.events.append(json.loads(msg.data))
            except ValueError:
                self.events.append({"raw": msg.data.decode(errors="replace")})

        await nc.subscribe(self.subject, cb=handler)
        await nc.flush()
        self._ready.set()
        await self._stop.wait()
        try:
            await nc.drain()
        except (nats.errors.Error, ConnectionError):  # e.g. a connection a server restart
            await nc.close()  # reset, and nats-py is still reconnecting

    def __enter__(self) -> EventRecorder:
        self._thread.start()
        assert self._ready.wait(10), "event recorder did not connect"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def for_task(self, task_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("task_id") == task_id]


def fetch_object(s3: S3Server, bucket: str, name: str, dest: Path) -> dict[str, str]:
    async def main() -> dict[str, str]:
        client = Minio(
            s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=False
        )
        try:
            await client.fget_object(bucket, name, str(dest))
            stat = await client.stat_object(bucket, name)
            return {str(k).lower(): str(v) for k, v in (stat.metadata or {}).items()}
        finally:
            await client.close_session()

    return asyncio.run(main())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_and_get_id(engine: DockerEngine, archive: Path, forget: list[str]) -> str:
    """``docker rmi`` the given names, ``docker load -i`` the archive, return the image ID."""
    for name in forget:
        engine.docker("rmi", "-f", name, check=False)
    for name in forget:
        gone = engine.docker("image", "inspect", name, check=False)
        assert gone.returncode != 0, f"{name} still in the engine before load"
    out = engine.docker("load", "-i", str(archive)).stdout
    if match := re.search(r"Loaded image ID: (sha256:[0-9a-f]{64})", out):
        return match.group(1)
    match = re.search(r"Loaded image: (\S+)", out)
    assert match, f"unexpected docker load output: {out!r}"
    return engine.docker("image", "inspect", "--format", "{{.Id}}", match.group(1)).stdout.strip()


def tar_members(archive: Path) -> list[str]:
    out = subprocess.run(["tar", "tzf", str(archive)], check=True, capture_output=True, text=True)
    return out.stdout.split()


def transitions(db: Path, task_id: str) -> list[tuple[str | None, str | None, bool]]:
    """The state changes in the transition log, in stream order (field-only events and
    refused duplicates, which the log also keeps, are left out)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "select from_state, to_state, applied from dcu_task_transitions "
            "where task_id = ? and applied and (from_state is null or from_state != to_state) "
            "order by stream_seq, id",
            (task_id,),
        ).fetchall()
    return [(a, b, bool(c)) for a, b, c in rows]


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S")


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` is one token, a trailing ``>`` one or more."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or token not in ("*", tokens[index]):
            return False
    return len(wanted) == len(tokens)


def streams_for(stream: str, subject: str) -> list[str]:
    """The streams of a deployment whose ``nats.stream`` is ``stream`` that can hold
    ``subject``: task and cleanup facts are audited, progress and work have their own."""
    names = NatsSettings(stream=stream)
    kind = subject.split(".")[1] if subject.count(".") else ">"
    if kind in {"task", "cleanup"}:
        return [names.audit_stream]
    if kind == "progress":
        return [names.progress_stream]
    if kind in {"queue", "dead"}:
        return [names.work_stream]
    return [names.audit_stream, names.progress_stream, names.work_stream]


def stream_events(url: str, stream: str, subject: str) -> list[dict[str, Any]]:
    """Every message on ``subject`` still in the deployment's streams (``stream`` is its
    ``nats.stream``), decoded, in stream order (audit, then progress, then work)."""

    async def read(js: Any, name: str) -> list[dict[str, Any]]:
        # By sequence, not with a consumer: the work stream (work-queue retention) takes
        # no consumer without acks, and reading must not take messages from it.
        found: list[dict[str, Any]] = []
        state = (await js.stream_info(name)).state
        if not state.messages:
            return found
        for seq in range(state.first_seq, state.last_seq + 1):
            try:
                msg = await js.get_msg(name, seq)
            except nats.js.errors.NotFoundError:
                continue
            if not subject_matches(subject, str(msg.subject)):
                continue
            event = json.loads(msg.data or b"null")
            if isinstance(event, dict):
                event["seq"] = seq
            found.append(event)
        return found

    async def main() -> list[dict[str, Any]]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            found: list[dict[str, Any]] = []
            for name in streams_for(stream, subject):
                found.extend(await read(js, name))
            return found
        finally:
            await nc.close()

    return asyncio.run(main())


def consumer_waiting(url: str, stream: str, durable: str) -> int:
    """How many pull requests the stage durable has waiting on the audit stream, where
    its events come from (one per idle replica); ``stream`` is ``nats.stream``."""

    async def main() -> int:
        nc = await nats.connect(url)
        try:
            try:
                audit = NatsSettings(stream=stream).audit_stream
                info = await nc.jetstream().consumer_info(audit, durable)
            except nats.js.errors.NotFoundError:
                return 0  # no replica has declared it yet
            return int(info.num_waiting or 0)
        finally:
            await nc.close()

    return asyncio.run(main())


def transitions_of_db(db: Path, task_id: str) -> list[tuple[str | None, str | None]]:
    """``transitions`` without the applied flag (every row returned is applied)."""
    return [(a, b) for a, b, _ in transitions(db, task_id)]


def service_transitions(service: Any, task_id: str) -> list[tuple[str | None, str | None, bool]]:
    """``transitions`` from whichever database the service uses (SQLite or PostgreSQL)."""
    url = service.config.get("database", {}).get("url")
    if not url:
        return transitions(service.workdir / "data" / "dcu.db", task_id)

    async def main() -> list[tuple[str | None, str | None, bool]]:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch(
                "select from_state, to_state, applied from dcu_task_transitions "
                "where task_id = $1 and applied "
                "and (from_state is null or from_state != to_state) "
                "order by stream_seq, id",
                task_id,
            )
        finally:
            await conn.close()
        return [(r[0], r[1], bool(r[2])) for r in rows]

    return asyncio.run(main())


def incomplete_uploads(s3: S3Server, bucket: str) -> list[str]:
    """Keys with a multipart upload started and never completed or aborted."""

    async def main() -> list[str]:
        client = Minio(
            s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=False
        )
        try:
            result = await client._list_multipart_uploads(bucket)
            return [upload.object_name for upload in result.uploads]
        finally:
            await client.close_session()

    return asyncio.run(main())


def post_start(
    service: Any, body: dict[str, Any], headers: Sequence[tuple[str, str | bytes]] = ()
) -> tuple[int, dict[str, Any]]:
    """POST /start to the gateway on 127.0.0.1:``service.port`` (a ``DcuProcess`` or the
    in-process one) with these headers, each sent as given (bytes: raw, repeats kept)."""
    data = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    try:
        conn.putrequest("POST", "/api/dcu/start")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(data)))
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders(data)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()

"""Stage functions on real files, a real registry and a real S3 server (moto), with the
stream replaced by a fake (the stages take their publisher and their stream lookup as
plain callables; the broker is tested in tests/broker). One test runs a stage against a
real nats-server stream with the production lookup."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.errors import NotFoundError

from actors import stages
from actors.object_store import S3ObjectStore
from actors.pipeline import Runtime
from actors.registry_engine import RegistryEngine
from bus import Bus
from events import naming, subjects
from events.formats import ArchiveFormat
from events.reference import parse_reference
from events.schema import (
    Compressed,
    Downloaded,
    Event,
    EventType,
    Failed,
    Requested,
    once_per_task_id,
)
from kernel.errors import BusError
from kernel.settings import Settings, load_settings
from tests.servers.oci import layer_tar, push_image

IMAGE = "nginx:latest"


class FakeStream:
    """A fake of the JetStream stream: keeps what the stage publishes in a list and
    answers ``recorded`` from that list, as the real last-message-by-subject lookup
    answers from the stream (that lookup is exercised against nats-server in
    ``test_a_failed_task_on_a_real_stream_is_not_compressed``).

    ``refuse``: the next publish of that type is refused once. ``fail_on``: publishing
    that type puts a ``failed`` event in the stream right after it (the watchdog failing
    the task while the stage runs). ``broken_lookup``: asking about that type raises
    BusError (the stream cannot be asked).
    """

    def __init__(
        self,
        refuse: EventType | None = None,
        *,
        fail_on: EventType | None = None,
        broken_lookup: EventType | None = None,
    ) -> None:
        self.events: list[Event] = []
        self.refuse = refuse
        self.fail_on = fail_on
        self.broken_lookup = broken_lookup

    async def emit(self, event: Event) -> None:
        if event.type is self.refuse:
            self.refuse = None
            raise BusError("stream refused the publish (test)")
        self.events.append(event)
        if event.type is self.fail_on:
            self.fail(event.task_id)

    def fail(self, task_id: str) -> None:
        self.events.append(
            Event(task_id=task_id, payload=Failed(stage="test", reason="stuck (test)"))
        )

    async def recorded(self, task_id: str, event_type: EventType) -> bool:
        if event_type is self.broken_lookup:
            raise BusError("stream lookup timed out (test)")
        return any(e.task_id == task_id and e.type is event_type for e in self.events)

    def published(self, task_id: str) -> list[EventType]:
        """Types the stage published for the task, but progress reports (and the
        injected ``failed``)."""
        left_out = {EventType.FAILED, EventType.PROGRESS}
        return [e.type for e in self.events if e.task_id == task_id and e.type not in left_out]


def _settings(tmp_path: Path, **sections: Any) -> Settings:
    return load_settings(
        None,
        storage={"work_path": str(tmp_path / "work"), "gzip_path": str(tmp_path / "gzip")},
        **sections,
    )


def _context(
    tmp_path: Path,
    stream: FakeStream,
    *,
    settings: Settings | None = None,
    store: Any = None,
    registry: RegistryEngine | None = None,
) -> stages.StageContext:
    return stages.StageContext(
        settings=settings or _settings(tmp_path),
        engine=None,
        store=store,  # None: compress never uploads
        emit=stream.emit,
        worker="test",
        recorded=stream.recorded,
        registry=registry,
    )


def _image_tar(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        data = b"[]"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _downloaded(ctx: stages.StageContext, task_id: str) -> Event:
    """A ``downloaded`` event whose engine tar is in the task's work directory."""
    tar = ctx.work_tar(task_id)
    _image_tar(tar)
    return Event(
        task_id=task_id,
        payload=Downloaded(
            docker_image_name=IMAGE, image_id="sha256:x", tar_path=str(tar), bytes=1
        ),
    )


def _archive(ctx: stages.StageContext, task_id: str) -> Path:
    return Path(ctx.archive(task_id, IMAGE, ArchiveFormat.DOCKER_GZIP))


def _object_name(settings: Settings, task_id: str) -> str:
    return naming.object_name(settings.minio.prefix, task_id, str(parse_reference(IMAGE)))


def _compressed(ctx: stages.StageContext, task_id: str) -> Event:
    """A ``compressed`` event whose archive is where the compress stage writes it."""
    archive = _archive(ctx, task_id)
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(os.urandom(64 * 1024))
    return Event(
        task_id=task_id,
        payload=Compressed(
            docker_image_name=IMAGE,
            image_id="sha256:x",
            gzip_file_name=str(archive),
            bytes_in=1,
            bytes_out=archive.stat().st_size,
            sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
        ),
    )


async def test_a_refused_compressed_publish_keeps_the_input_for_the_redelivery(
    tmp_path: Path,
) -> None:
    # Given an engine tar in the task's work directory
    task_id = str(uuid.uuid4())
    stream = FakeStream(refuse=EventType.COMPRESSED)
    ctx = _context(tmp_path, stream)
    event = _downloaded(ctx, task_id)
    tar = ctx.work_tar(task_id)
    # When the stage's completion cannot be published
    with pytest.raises(BusError):
        await stages.compress(ctx, event)
    # Then its input is still there, so the redelivery completes the stage
    assert tar.exists()
    done = await stages.compress(ctx, event, attempt=2)
    assert done is not None and isinstance(done.payload, Compressed)
    assert not tar.parent.exists()
    assert Path(done.payload.gzip_file_name).exists()


# -- a task that ended is not worked on -----------------------------------------------


async def test_a_failed_task_is_not_downloaded(tmp_path: Path) -> None:
    # Given a task the watchdog failed, with a file an earlier attempt left in its work dir
    task_id = str(uuid.uuid4())
    stream = FakeStream()
    stream.fail(task_id)
    ctx = _context(tmp_path, stream)  # no engine: a download that ran would raise
    leftover = ctx.work_tar(task_id).parent / "blobs" / "abc"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    requested = Event(task_id=task_id, payload=Requested(username="u", docker_image_name=IMAGE))
    # When its download message is delivered (late, or replayed)
    result = await stages.download(ctx, requested)
    # Then nothing is published and the task's work directory is gone
    assert result is None
    assert stream.published(task_id) == []
    assert not ctx.work_tar(task_id).parent.exists()


async def test_a_failed_task_is_not_compressed(tmp_path: Path) -> None:
    task_id = str(uuid.uuid4())
    stream = FakeStream()
    ctx = _context(tmp_path, stream)
    event = _downloaded(ctx, task_id)
    stream.fail(task_id)
    assert await stages.compress(ctx, event) is None
    assert stream.published(task_id) == []
    assert not ctx.work_tar(task_id).parent.exists()
    assert not _archive(ctx, task_id).parent.exists()


async def test_compress_publishes_nothing_for_a_task_failed_while_it_ran(tmp_path: Path) -> None:
    # Given a task that is failed right after its compression started
    task_id = str(uuid.uuid4())
    stream = FakeStream(fail_on=EventType.COMPRESS_STARTED)
    ctx = _context(tmp_path, stream)
    event = _downloaded(ctx, task_id)
    # When the compression finishes
    result = await stages.compress(ctx, event)
    # Then ``compressed`` is not published, and neither its input nor the archive is left
    assert result is None
    assert stream.published(task_id) == [EventType.COMPRESS_STARTED]
    assert not ctx.work_tar(task_id).parent.exists()
    assert not _archive(ctx, task_id).parent.exists()


async def test_a_failing_stream_lookup_is_retried_not_ignored(tmp_path: Path) -> None:
    # Given a stream that cannot say whether the task failed
    task_id = str(uuid.uuid4())
    stream = FakeStream(broken_lookup=EventType.FAILED)
    ctx = _context(tmp_path, stream)
    event = _downloaded(ctx, task_id)
    # When the stage runs, it raises BusError (dramatiq retries it) and publishes nothing
    with pytest.raises(BusError):
        await stages.compress(ctx, event)
    assert stream.published(task_id) == []
    assert ctx.work_tar(task_id).exists()


async def test_download_publishes_nothing_for_a_task_failed_while_it_ran(
    tmp_path: Path, registry
) -> None:
    # Given an image in a real registry, and a task failed right after its download started
    image = push_image(
        registry.url, f"stages/{uuid.uuid4().hex[:8]}", "1", [layer_tar({"f": b"data"})]
    )
    settings = _settings(tmp_path, download={"reuse": False})
    engine = RegistryEngine(settings)
    task_id = str(uuid.uuid4())
    stream = FakeStream(fail_on=EventType.DOWNLOAD_STARTED)
    ctx = _context(tmp_path, stream, settings=settings, registry=engine)
    requested = Event(
        task_id=task_id, payload=Requested(username="u", docker_image_name=image.reference)
    )
    try:
        # When the download finishes
        result = await stages.download(ctx, requested)
    finally:
        await engine.close()
    # Then ``downloaded`` is not published and the blobs it fetched for the task are gone
    assert result is None
    assert stream.published(task_id) == [EventType.DOWNLOAD_STARTED]
    assert not ctx.work_tar(task_id).parent.exists()


@pytest.fixture
async def s3_context(s3_server, tmp_path: Path) -> AsyncIterator[tuple[S3ObjectStore, Settings]]:
    settings = _settings(
        tmp_path,
        minio={
            "endpoint": s3_server.endpoint,
            "access_key": s3_server.access_key,
            "secret_key": s3_server.secret_key,
            "bucket": f"dcu-{uuid.uuid4().hex[:8]}",
        },
    )
    store = S3ObjectStore(settings.minio)
    try:
        yield store, settings
    finally:
        await store.close()


async def test_a_failed_task_is_not_uploaded(
    tmp_path: Path, s3_context: tuple[S3ObjectStore, Settings]
) -> None:
    store, settings = s3_context
    task_id = str(uuid.uuid4())
    stream = FakeStream()
    ctx = _context(tmp_path, stream, settings=settings, store=store)
    event = _compressed(ctx, task_id)
    stream.fail(task_id)
    assert await stages.upload(ctx, event) is None
    assert stream.published(task_id) == []
    name = _object_name(settings, task_id)
    assert await store.stat(name) is None
    assert await store.abort_incomplete(name, older_than=None) == 0


async def test_upload_publishes_nothing_for_a_task_failed_while_it_ran(
    tmp_path: Path, s3_context: tuple[S3ObjectStore, Settings]
) -> None:
    # Given a task that is failed right after its upload started
    store, settings = s3_context
    task_id = str(uuid.uuid4())
    stream = FakeStream(fail_on=EventType.UPLOAD_STARTED)
    ctx = _context(tmp_path, stream, settings=settings, store=store)
    event = _compressed(ctx, task_id)
    # When the upload finishes
    result = await stages.upload(ctx, event)
    # Then ``uploaded`` is not published and the object it stored is removed again
    assert result is None
    assert stream.published(task_id) == [EventType.UPLOAD_STARTED]
    name = _object_name(settings, task_id)
    assert await store.stat(name) is None
    assert await store.abort_incomplete(name, older_than=None) == 0


async def test_a_failed_task_on_a_real_stream_is_not_compressed(
    tmp_path: Path, nats_server
) -> None:
    # Given a real stream holding the task's ``failed`` event, and the workers' own
    # publisher and last-message-by-subject lookup (``Runtime``)
    tag = uuid.uuid4().hex[:8]
    settings = _settings(
        tmp_path, nats={"url": nats_server.url, "stream": f"T{tag}", "subject_prefix": f"t{tag}"}
    )
    prefix = settings.nats.subject_prefix
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    runtime = Runtime(settings, "stage-tests")
    try:
        await Bus(nc, settings.nats).ensure_streams()
        task_id = str(uuid.uuid4())
        await runtime.publish(
            Event(
                task_id=task_id,
                payload=Failed(stage="compress", reason="stuck (test)"),
                event_id=once_per_task_id(task_id, EventType.FAILED),
            )
        )
        ctx = stages.StageContext(
            settings=settings,
            engine=None,
            store=None,  # type: ignore[arg-type]  # compress never uploads
            emit=runtime.publish,
            worker="test",
            recorded=runtime.recorded,
        )
        event = _downloaded(ctx, task_id)
        # When its compress message is delivered
        result = await stages.compress(ctx, event)
        # Then the stage published nothing, and the work directory is gone
        assert result is None
        last = await js.get_last_msg(settings.nats.audit_stream, subjects.one_task(task_id, prefix))
        assert last.subject == subjects.task_event(task_id, EventType.FAILED, prefix)
        assert not ctx.work_tar(task_id).parent.exists()
    finally:
        await runtime.close()
        for info in await js.streams_info():
            if info.config.name and info.config.name.startswith(settings.nats.stream):
                with contextlib.suppress(NotFoundError):
                    await js.delete_stream(info.config.name)
        await nc.close()


# -- another run's leftovers ----------------------------------------------------------


def test_only_part_files_quiet_for_longer_than_the_threshold_are_removed(
    tmp_path: Path,
) -> None:
    # Given a part file a dead run left long ago, and one a live duplicate is writing
    dead = tmp_path / "image.tar.1.part"
    live = tmp_path / "image.tar.2.part"
    kept = tmp_path / "image.tar"
    for path in (dead, live, kept):
        path.write_bytes(b"x")
    old = time.time() - 300
    os.utime(dead, (old, old))
    os.utime(kept, (old, old))
    # When a run starts and cleans up with a 90 s threshold
    stages.remove_stale_parts(tmp_path, 90)
    # Then only the dead run's part is gone (and never a finished file)
    assert not dead.exists()
    assert live.exists() and kept.exists()
    # and the live one goes too once it has been quiet for longer than that
    stages.remove_stale_parts(tmp_path, 90, now=datetime.now(UTC) + timedelta(seconds=120))
    assert not live.exists() and kept.exists()


async def test_compress_leaves_a_young_part_file_of_another_run_while_it_works(
    tmp_path: Path,
) -> None:
    # Given a live duplicate's part file beside the archive the stage is about to write
    task_id = str(uuid.uuid4())
    stream = FakeStream()
    ctx = _context(tmp_path, stream)
    event = _downloaded(ctx, task_id)
    archive = _archive(ctx, task_id)
    archive.parent.mkdir(parents=True)
    duplicate = archive.with_name(f"{archive.name}.0123456789ab.part")
    duplicate.write_bytes(b"being written")
    seen: list[bool] = []

    async def emit(event: Event) -> None:
        if event.type is EventType.COMPRESSED:
            seen.append(duplicate.exists())
        await stream.emit(event)

    ctx.emit = emit
    # When the stage runs
    done = await stages.compress(ctx, event)
    # Then the part survived the stage's start-up clean-up (it was still there when
    # ``compressed`` was published), and is only swept once ``compressed`` is stored
    assert done is not None
    assert seen == [True]
    assert not duplicate.exists()
    assert archive.exists()

"""What each stage does with the event it consumes, independent of dramatiq.

Each stage announces itself (``*_started``), does its work through the edges it is given
(engine, gzip, object store), publishes its completion event and returns it. Paths are
always recomputed from the task id and the re-validated reference, never taken from an
event's payload, so a forged event cannot point a stage at another file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from actors.compression import compress_file
from actors.docker_engine import DockerEngine
from actors.object_store import ObjectStore
from actors.progress import ProgressReporter
from dcu.errors import PermanentFailure
from dcu.settings import Settings
from events import naming
from events.reference import ImageReference, InvalidReference, parse_reference, registry_refusal
from events.schema import (
    Compressed,
    CompressStarted,
    Downloaded,
    DownloadStarted,
    Event,
    EventType,
    Payload,
    Progress,
    Requested,
    Stage,
    Uploaded,
    UploadStarted,
    once_per_task_id,
)

log = logging.getLogger(__name__)

Emit = Callable[[Event], Awaitable[None]]
Recorded = Callable[[str, EventType], Awaitable[bool]]


@dataclass(slots=True)
class StageContext:
    settings: Settings
    engine: DockerEngine
    store: ObjectStore
    emit: Emit
    worker: str
    recorded: Recorded

    async def announce(self, task_id: str, payload: Payload) -> Event:
        event = Event(task_id=task_id, payload=payload)
        await self.emit(event)
        return event

    async def complete(self, task_id: str, payload: Payload) -> Event:
        """Publish a stage's completion event, with its once-per-task id."""
        event = Event(
            task_id=task_id, payload=payload, event_id=once_per_task_id(task_id, payload.type)
        )
        await self.emit(event)
        return event

    async def already_done(self, task_id: str, completion: EventType) -> bool:
        """True when the stream already holds this stage's completion for the task: the
        message is a redelivery (its worker died after finishing, before the ack) or a
        duplicate, and the stage must not run again."""
        if await self.recorded(task_id, completion):
            log.info(
                "task %s: %s already recorded, not running the stage again", task_id, completion
            )
            return True
        return False

    def reporter(self, task_id: str, stage: Stage) -> ProgressReporter:
        async def send(progress: Progress) -> None:
            await self.emit(Event(task_id=task_id, payload=progress))

        return ProgressReporter(stage, send, self.settings.workers.progress_interval)

    def work_tar(self, task_id: str) -> Path:
        return naming.work_tar_path(Path(self.settings.storage.work_path), task_id)

    def archive(self, task_id: str, ref: ImageReference) -> str:
        return naming.archive_path(self.settings.storage.gzip_path, task_id, str(ref))


def _reference(text: str) -> ImageReference:
    try:
        return parse_reference(text)
    except InvalidReference as exc:
        raise PermanentFailure(str(exc)) from exc


def _task_id(event: Event) -> str:
    try:
        return naming.check_task_id(event.task_id)
    except naming.UnsafeName as exc:
        raise PermanentFailure(str(exc)) from exc


async def download(ctx: StageContext, event: Event, attempt: int = 1) -> Event | None:
    """Pull the image and export it to the task's work tar; emits ``downloaded``.

    Returns None (doing nothing) when the download already completed for this task.
    Raises PermanentFailure for a registry outside ``docker.allowed_registries`` (checked
    here again: a ``requested`` event published straight to NATS skips the gateway).
    """
    assert isinstance(event.payload, Requested)
    task_id = _task_id(event)
    ref = _reference(event.payload.docker_image_name)
    refusal = registry_refusal(ref, ctx.settings.docker.allowed_registries)
    if refusal is not None:
        raise PermanentFailure(refusal)
    if await ctx.already_done(task_id, EventType.DOWNLOADED):
        return None
    await ctx.announce(task_id, DownloadStarted(worker=ctx.worker, attempt=attempt))
    loop = asyncio.get_running_loop()
    started = loop.time()
    tar = ctx.work_tar(task_id)
    remove_stale_parts(tar.parent)
    async with ctx.reporter(task_id, Stage.DOWNLOAD) as progress:
        log.info("task %s: pulling %s", task_id, ref)
        await ctx.engine.pull(ref, progress.update)
        limit = ctx.settings.workers.max_image_bytes
        if limit:
            size = await ctx.engine.image_size(ref.pinned)
            if size is not None and size > limit:
                raise PermanentFailure(
                    f"image {ref} is {size} bytes, over the limit of {limit} bytes"
                )
        exported = await ctx.engine.export(ref, tar, progress.update)
    return await ctx.complete(
        task_id,
        Downloaded(
            docker_image_name=str(ref),
            image_id=exported.image_id,
            tar_path=str(exported.path),
            bytes=exported.bytes,
            seconds=round(loop.time() - started, 3),
        ),
    )


async def compress(ctx: StageContext, event: Event, attempt: int = 1) -> Event | None:
    """gzip the work tar into the task's archive, then drop the tar; emits ``compressed``.

    Returns None (doing nothing) when the compression already completed for this task.
    """
    assert isinstance(event.payload, Downloaded)
    task_id = _task_id(event)
    ref = _reference(event.payload.docker_image_name)
    if await ctx.already_done(task_id, EventType.COMPRESSED):
        return None
    tar = ctx.work_tar(task_id)
    archive = ctx.archive(task_id, ref)
    if not tar.exists():
        raise PermanentFailure(f"work file {tar} is missing (removed, or not on a shared volume)")
    await ctx.announce(task_id, CompressStarted(worker=ctx.worker, attempt=attempt))
    remove_stale_parts(Path(archive).parent)
    storage = ctx.settings.storage
    async with ctx.reporter(task_id, Stage.COMPRESS) as progress:
        result = await asyncio.to_thread(
            compress_file,
            tar,
            Path(archive),
            level=storage.compress_level,
            threads=storage.compress_threads,
            progress=progress.update,
        )
    log.info(
        "task %s: compressed %d -> %d bytes in %.1fs (%.0f MB/s)",
        task_id,
        result.bytes_in,
        result.bytes_out,
        result.seconds,
        result.throughput,
    )
    _remove_work_dir(tar)
    return await ctx.complete(
        task_id,
        Compressed(
            docker_image_name=str(ref),
            image_id=event.payload.image_id,
            gzip_file_name=archive,
            bytes_in=result.bytes_in,
            bytes_out=result.bytes_out,
            sha256=result.sha256,
            seconds=round(result.seconds, 3),
        ),
    )


async def upload(ctx: StageContext, event: Event, attempt: int = 1) -> Event | None:
    """Upload the archive with its image ID and sha256 as metadata; emits ``uploaded``.

    Returns None (doing nothing) when the upload already completed for this task.
    """
    assert isinstance(event.payload, Compressed)
    task_id = _task_id(event)
    ref = _reference(event.payload.docker_image_name)
    if await ctx.already_done(task_id, EventType.UPLOADED):
        return None
    archive = Path(ctx.archive(task_id, ref))
    if not archive.exists():
        raise PermanentFailure(f"archive {archive} is missing (removed, or not on a shared volume)")
    name = naming.object_name(ctx.settings.minio.prefix, task_id, str(ref))
    await ctx.announce(task_id, UploadStarted(worker=ctx.worker, attempt=attempt))
    loop = asyncio.get_running_loop()
    started = loop.time()
    metadata = {
        "dcu-task-id": task_id,
        "dcu-image-id": event.payload.image_id,
        "dcu-sha256": event.payload.sha256,
        "dcu-image": str(ref),
    }
    aborted = await ctx.store.abort_incomplete(name)
    if aborted:
        log.info("task %s: aborted %d unfinished upload(s) of an earlier attempt", task_id, aborted)
    async with ctx.reporter(task_id, Stage.UPLOAD) as progress:
        stored = await ctx.store.put_file(name, archive, metadata, progress.update)
    log.info(
        "task %s: uploaded %s to %s (%d bytes)", task_id, name, ctx.store.location, stored.size
    )
    return await ctx.complete(
        task_id,
        Uploaded(
            bucket=ctx.settings.minio.bucket,
            minio_object_name=name,
            bytes=stored.size,
            sha256=event.payload.sha256,
            image_id=event.payload.image_id,
            seconds=round(loop.time() - started, 3),
        ),
    )


def remove_stale_parts(directory: Path) -> None:
    """Drop ``*.part`` files a killed worker left in this task's own directory; a stage
    that starts for a task owns that directory."""
    with contextlib.suppress(FileNotFoundError):
        for leftover in directory.glob("*.part"):
            if leftover.is_file() and not leftover.is_symlink():
                log.info("removing %s left by an earlier attempt", leftover)
                leftover.unlink(missing_ok=True)


def _remove_work_dir(tar: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        tar.unlink()
    with contextlib.suppress(OSError):
        tar.parent.rmdir()


def remove_partial_files_for(settings: Settings, task_id: str) -> None:
    """Drop a failed task's work directory (only ever that task's own)."""
    with contextlib.suppress(naming.UnsafeName):
        work_dir = naming.work_tar_path(Path(settings.storage.work_path), task_id).parent
        shutil.rmtree(work_dir, ignore_errors=True)

"""What each stage does with the event it consumes, independent of dramatiq.

Each stage announces itself (``*_started``), does its work through the edges it is given
(engine, gzip, object store), publishes its completion event and returns it. Paths are
always recomputed from the task id and the re-validated reference, never taken from an
event's payload, so a forged event cannot point a stage at another file.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from actors import reuse
from actors.archive import write_archive
from actors.compression import compress_file
from actors.docker_engine import DockerEngine
from actors.object_store import ObjectStore
from actors.progress import ProgressReporter
from actors.registry_engine import ImagePlan, RegistryEngine
from dcu.errors import PermanentFailure
from dcu.settings import Settings
from events import naming
from events.platform import InvalidPlatform, parse_platform
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
    engine: DockerEngine | None  # ``download.engine: docker`` only
    store: ObjectStore
    emit: Emit
    worker: str
    recorded: Recorded
    registry: RegistryEngine | None = None  # ``download.engine: registry`` only

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
    """Get the image with the configured engine; emits ``downloaded``.

    ``registry``: resolve the manifest for the task's platform and, when the same archive
    was packaged before (digest reuse), emit ``downloaded`` naming that object at once;
    otherwise fetch and verify the blobs into the task's directory. ``docker``: pull and
    export the image's tar. Returns None (doing nothing) when the download already
    completed for this task. Raises PermanentFailure for a registry outside
    ``docker.allowed_registries`` (checked here again: a ``requested`` event published
    straight to NATS skips the gateway) or a malformed platform.
    """
    assert isinstance(event.payload, Requested)
    task_id = _task_id(event)
    ref = _reference(event.payload.docker_image_name)
    refusal = registry_refusal(ref, ctx.settings.docker.allowed_registries)
    if refusal is not None:
        raise PermanentFailure(refusal)
    try:
        wanted = parse_platform(event.payload.platform or ctx.settings.download.platform)
    except InvalidPlatform as exc:
        raise PermanentFailure(str(exc)) from exc
    if await ctx.already_done(task_id, EventType.DOWNLOADED):
        return None
    await ctx.announce(task_id, DownloadStarted(worker=ctx.worker, attempt=attempt))
    loop = asyncio.get_running_loop()
    started = loop.time()
    tar = ctx.work_tar(task_id)
    remove_stale_parts(tar.parent)
    if ctx.registry is None:
        return await _download_with_engine(ctx, task_id, ref, tar, started)
    registry = ctx.registry
    async with ctx.reporter(task_id, Stage.DOWNLOAD) as progress:
        log.info("task %s: resolving %s for %s", task_id, ref, wanted)
        resolved = await registry.resolve(ref, wanted, explicit=event.payload.platform is not None)
        if ctx.settings.download.reuse:
            found = await reuse.find(ctx.store, ctx.settings.minio.prefix, resolved, ref)
            if found is not None:
                log.info("task %s: %s was packaged before as %s", task_id, ref, found.object)
                return await ctx.complete(
                    task_id,
                    Downloaded(
                        docker_image_name=str(ref),
                        image_id=found.image_id,
                        tar_path="",
                        bytes=0,
                        seconds=round(loop.time() - started, 3),
                        engine="registry",
                        layout="reuse",
                        manifest_digest=resolved.manifest.digest,
                        platform=found.platform,
                        fetched_bytes=0,
                        cached_bytes=0,
                        reused_object=found.object,
                    ),
                )
        log.info(
            "task %s: fetching %d layers of %s (%s, %s)",
            task_id,
            len(resolved.layers),
            ref,
            resolved.platform,
            resolved.manifest.digest,
        )
        got = await registry.download(ref, resolved, tar.parent, progress.update)
    log.info(
        "task %s: %s verified: %d bytes fetched, %d from the cache",
        task_id,
        ref,
        got.fetched_bytes,
        got.cached_bytes,
    )
    return await ctx.complete(
        task_id,
        Downloaded(
            docker_image_name=str(ref),
            image_id=got.plan.image_id,
            tar_path=str(got.plan_path),
            bytes=got.tar_bytes,
            seconds=round(loop.time() - started, 3),
            engine="registry",
            layout="blobs",
            manifest_digest=got.plan.manifest_digest,
            platform=got.plan.platform,
            fetched_bytes=got.fetched_bytes,
            cached_bytes=got.cached_bytes,
        ),
    )


async def _download_with_engine(
    ctx: StageContext, task_id: str, ref: ImageReference, tar: Path, started: float
) -> Event:
    """``download.engine: docker``: pull with the engine, export its tar."""
    engine = ctx.engine
    if engine is None:
        raise PermanentFailure("download.engine is docker but no Docker engine is configured")
    async with ctx.reporter(task_id, Stage.DOWNLOAD) as progress:
        log.info("task %s: pulling %s", task_id, ref)
        await engine.pull(ref, progress.update)
        limit = ctx.settings.workers.max_image_bytes
        if limit:
            size = await engine.image_size(ref.pinned)
            if size is not None and size > limit:
                raise PermanentFailure(
                    f"image {ref} is {size} bytes, over the limit of {limit} bytes"
                )
        exported = await engine.export(ref, tar, progress.update)
    return await ctx.complete(
        task_id,
        Downloaded(
            docker_image_name=str(ref),
            image_id=exported.image_id,
            tar_path=str(exported.path),
            bytes=exported.bytes,
            seconds=round(asyncio.get_running_loop().time() - started, 3),
        ),
    )


async def compress(ctx: StageContext, event: Event, attempt: int = 1) -> Event | None:
    """Write the task's archive; emits ``compressed``.

    From a registry download the archive is spliced: gzip layer blobs are copied verbatim
    and only headers (and non-gzip layers) are compressed. From an engine's tar the whole
    tar is gzipped. A reused download writes nothing. The task's work directory is removed
    once ``compressed`` is published. Returns None (doing nothing) when the compression
    already completed.
    """
    assert isinstance(event.payload, Downloaded)
    payload = event.payload
    task_id = _task_id(event)
    ref = _reference(payload.docker_image_name)
    if await ctx.already_done(task_id, EventType.COMPRESSED):
        return None
    if payload.layout == "reuse" and payload.reused_object:
        await ctx.announce(task_id, CompressStarted(worker=ctx.worker, attempt=attempt))
        found = await reuse.describe(ctx.store, payload.reused_object)
        if found is None:
            raise PermanentFailure(
                f"object {payload.reused_object} to reuse was removed meanwhile; start the "
                "task again to package the image afresh"
            )
        return await ctx.complete(
            task_id,
            Compressed(
                docker_image_name=str(ref),
                image_id=payload.image_id,
                gzip_file_name="",
                bytes_in=0,
                bytes_out=found.size,
                sha256=found.sha256,
                method="reuse",
                reused_object=payload.reused_object,
                manifest_digest=payload.manifest_digest,
                platform=payload.platform,
            ),
        )
    tar = ctx.work_tar(task_id)
    task_dir = tar.parent
    archive = ctx.archive(task_id, ref)
    from_blobs = payload.layout == "blobs"
    source = task_dir / naming.PLAN_FILE if from_blobs else tar
    if not source.exists():
        raise PermanentFailure(
            f"work file {source} is missing (removed, or not on a shared volume)"
        )
    await ctx.announce(task_id, CompressStarted(worker=ctx.worker, attempt=attempt))
    remove_stale_parts(Path(archive).parent)
    storage = ctx.settings.storage
    spliced: int | None = None
    async with ctx.reporter(task_id, Stage.COMPRESS) as progress:
        if from_blobs:
            plan = ImagePlan.read(source)
            config = await asyncio.to_thread(plan.config_path(task_dir).read_bytes)
            written = await asyncio.to_thread(
                functools.partial(
                    write_archive,
                    Path(archive),
                    config=config,
                    layers=plan.archive_layers(task_dir),
                    repo_tags=plan.repo_tags,
                    level=storage.compress_level,
                    threads=storage.compress_threads,
                    progress=progress.update,
                )
            )
            bytes_in, bytes_out = written.bytes_in, written.bytes_out
            sha256, seconds, spliced = written.sha256, written.seconds, written.spliced_bytes
        else:
            result = await asyncio.to_thread(
                compress_file,
                tar,
                Path(archive),
                level=storage.compress_level,
                threads=storage.compress_threads,
                progress=progress.update,
            )
            bytes_in, bytes_out = result.bytes_in, result.bytes_out
            sha256, seconds = result.sha256, result.seconds
    log.info(
        "task %s: %s %d -> %d bytes in %.1fs (%.0f MB/s)",
        task_id,
        "spliced" if from_blobs else "compressed",
        bytes_in,
        bytes_out,
        seconds,
        bytes_in / 1e6 / seconds if seconds > 0 else 0.0,
    )
    completed = await ctx.complete(
        task_id,
        Compressed(
            docker_image_name=str(ref),
            image_id=payload.image_id,
            gzip_file_name=archive,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            sha256=sha256,
            seconds=round(seconds, 3),
            method="splice" if from_blobs else "gzip",
            spliced_bytes=spliced,
            manifest_digest=payload.manifest_digest,
            platform=payload.platform,
        ),
    )
    # Only once ``compressed`` is stored: a redelivery before that point must still find
    # its input (a redelivery after it stops at ``already_done``; the cleanup's sweep of
    # abandoned work directories takes what such a crash leaves).
    _remove_work_dir(task_dir)
    return completed


async def upload(ctx: StageContext, event: Event, attempt: int = 1) -> Event | None:
    """Upload the archive with its image ID, sha256, manifest digest and platform as
    metadata (or copy the reused object server-side); emits ``uploaded``.

    Returns None (doing nothing) when the upload already completed for this task.
    """
    assert isinstance(event.payload, Compressed)
    payload = event.payload
    task_id = _task_id(event)
    ref = _reference(payload.docker_image_name)
    if await ctx.already_done(task_id, EventType.UPLOADED):
        return None
    name = naming.object_name(ctx.settings.minio.prefix, task_id, str(ref))
    metadata = {
        "dcu-task-id": task_id,
        "dcu-image-id": payload.image_id,
        "dcu-sha256": payload.sha256,
        "dcu-image": str(ref),
    }
    if payload.manifest_digest:
        metadata["dcu-manifest-digest"] = payload.manifest_digest
        metadata["dcu-reuse-key"] = reuse.key_for(payload.manifest_digest, ref)
    if payload.platform:
        metadata["dcu-platform"] = payload.platform
    loop = asyncio.get_running_loop()
    started = loop.time()
    if payload.method == "reuse" and payload.reused_object:
        await ctx.announce(task_id, UploadStarted(worker=ctx.worker, attempt=attempt))
        stored = await ctx.store.copy(payload.reused_object, name, metadata)
        log.info("task %s: copied %s to %s (reuse)", task_id, payload.reused_object, name)
        reused_from: str | None = payload.reused_object
    else:
        archive = Path(ctx.archive(task_id, ref))
        if not archive.exists():
            raise PermanentFailure(
                f"archive {archive} is missing (removed, or not on a shared volume)"
            )
        await ctx.announce(task_id, UploadStarted(worker=ctx.worker, attempt=attempt))
        aborted = await ctx.store.abort_incomplete(name)
        if aborted:
            log.info(
                "task %s: aborted %d unfinished upload(s) of an earlier attempt", task_id, aborted
            )
        async with ctx.reporter(task_id, Stage.UPLOAD) as progress:
            stored = await ctx.store.put_file(
                name, archive, metadata, progress.update, sha256=payload.sha256
            )
        log.info(
            "task %s: uploaded %s to %s (%d bytes)", task_id, name, ctx.store.location, stored.size
        )
        reused_from = None
        if payload.manifest_digest and ctx.settings.download.reuse:
            await reuse.remember(ctx.store, ctx.settings.minio.prefix, ref, name, payload)
    return await ctx.complete(
        task_id,
        Uploaded(
            bucket=ctx.settings.minio.bucket,
            minio_object_name=name,
            bytes=stored.size,
            sha256=payload.sha256,
            image_id=payload.image_id,
            seconds=round(loop.time() - started, 3),
            manifest_digest=payload.manifest_digest,
            platform=payload.platform,
            reused_from=reused_from,
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


def _remove_work_dir(task_dir: Path) -> None:
    """Drop a task's work directory once its archive is written (only that task's own:
    the path comes from the task id, never from an event)."""
    shutil.rmtree(task_dir, ignore_errors=True)


def remove_partial_files_for(settings: Settings, task_id: str) -> None:
    """Drop a failed task's work directory (only ever that task's own)."""
    with contextlib.suppress(naming.UnsafeName):
        work_dir = naming.work_tar_path(Path(settings.storage.work_path), task_id).parent
        shutil.rmtree(work_dir, ignore_errors=True)

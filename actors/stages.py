"""What each stage does with the event it consumes, independent of dramatiq.

Each stage announces itself (``*_started``), does its work through the edges it is given
(engine, gzip, object store), publishes its completion event and returns it. Paths are
always recomputed from the task id and the re-validated reference, never taken from an
event's payload, so a forged event cannot point a stage at another file.

A stage works only for a live task: before it starts, and again just before it publishes
its completion, it looks for a terminal event of the task (``failed``, ``uploaded``) in
the stream. A task the watchdog failed, or one a replay delivers again, is not
downloaded, compressed or uploaded behind the API's back: the stage removes what it
wrote for the task, publishes nothing and returns None.

Several runs of one stage for one task can overlap (a redelivery while the first run is
slow to keep its message alive, a replay): a run removes another's leftovers (``*.part``
files, unfinished multipart uploads) only when they are older than ``stale_after``, or
once its own completion is in the stream and the other run's work is moot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISREG

from actors import reuse
from actors.archive import write_archive
from actors.compression import compress_file
from actors.docker_engine import DockerEngine
from actors.object_store import ObjectStore
from actors.progress import ProgressReporter
from actors.registry_engine import ImagePlan, RegistryEngine
from events import naming
from events.formats import DEFAULT_FORMAT, ArchiveFormat
from events.platform import InvalidPlatform, parse_platform
from events.reference import ImageReference, InvalidReference, parse_reference, registry_refusal
from events.schema import (
    BundleImage,
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
from kernel.errors import PermanentFailure, StorageError
from kernel.settings import Settings

log = logging.getLogger(__name__)

Emit = Callable[[Event], Awaitable[None]]
Recorded = Callable[[str, EventType], Awaitable[bool]]
# Removes what a stage wrote for a task that ended (given the terminal event's type).
Discard = Callable[[EventType], Awaitable[None]]

TERMINAL_EVENTS = (EventType.FAILED, EventType.UPLOADED)
# A message is redelivered only after ``nats.ack_wait`` without a keep-alive, and a live
# run writes its part files and upload parts far more often than that: a leftover quiet
# for this many ack waits belongs to a dead run, a younger one may be a live duplicate's.
STALE_AFTER_ACK_WAITS = 3


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

    async def complete(self, task_id: str, payload: Payload, discard: Discard) -> Event | None:
        """Publish a stage's completion event, with its once-per-task id; unless the task
        ended while the stage ran: then ``discard`` removes what the stage wrote, nothing
        is published and the result is None. Raises BusError (retryable)."""
        if await self.stopped(task_id, f"not publishing {payload.type}", discard):
            return None
        event = Event(
            task_id=task_id, payload=payload, event_id=once_per_task_id(task_id, payload.type)
        )
        await self.emit(event)
        return event

    async def ended(self, task_id: str) -> EventType | None:
        """The terminal event (``failed`` or ``uploaded``) the stream holds for the task,
        None while the task is alive. Raises BusError when the lookup fails."""
        for terminal in TERMINAL_EVENTS:
            if await self.recorded(task_id, terminal):
                return terminal
        return None

    async def stopped(self, task_id: str, doing: str, discard: Discard) -> bool:
        """True when the task already ended (failed by the watchdog, or finished and
        delivered again): ``discard`` has removed what the stage wrote for it, and the
        stage must publish nothing. Raises BusError when the lookup fails, so the message
        is retried rather than run for a task that may be dead."""
        ended = await self.ended(task_id)
        if ended is None:
            return False
        await discard(ended)
        log.info(
            "task %s: %s, the stream holds its %s event; removed what the stage wrote for it",
            task_id,
            doing,
            ended,
        )
        return True

    @property
    def stale_after(self) -> float:
        """Seconds after which another run's leftovers are a dead run's (see module doc)."""
        return STALE_AFTER_ACK_WAITS * self.settings.nats.ack_wait

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

    def archive(self, task_id: str, name: str, fmt: ArchiveFormat) -> str:
        """The archive's path; ``name`` is the image reference or a bundle's name."""
        return naming.archive_path(self.settings.storage.gzip_path, task_id, name, fmt)

    def format_of(self, fmt: ArchiveFormat | None) -> ArchiveFormat:
        """An event's format, or the configured default for an event that names none."""
        return fmt or self.settings.storage.archive_format


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
    completed for this task, and when the task ended (its work directory removed).
    Raises PermanentFailure for a registry outside ``docker.allowed_registries``
    (checked here again: a ``requested`` event published straight to NATS skips the
    gateway) or a malformed platform.
    """
    assert isinstance(event.payload, Requested)
    task_id = _task_id(event)
    bundle = event.payload.images is not None
    refs = [_reference(text) for text in event.payload.images or [event.payload.docker_image_name]]
    for ref in refs:
        refusal = registry_refusal(ref, ctx.settings.docker.allowed_registries)
        if refusal is not None:
            raise PermanentFailure(refusal)
    try:
        wanted = parse_platform(event.payload.platform or ctx.settings.download.platform)
    except InvalidPlatform as exc:
        raise PermanentFailure(str(exc)) from exc
    fmt = ctx.format_of(event.payload.format)
    if ctx.registry is None and (bundle or fmt is ArchiveFormat.OCI):
        raise PermanentFailure(
            f"{'a bundle' if bundle else fmt.value} needs download.engine registry; this "
            "worker runs the docker engine"
        )
    if await ctx.already_done(task_id, EventType.DOWNLOADED):
        return None
    discard = _discard_work_dir(ctx, task_id)
    if await ctx.stopped(task_id, "not running the download stage", discard):
        return None
    await ctx.announce(task_id, DownloadStarted(worker=ctx.worker, attempt=attempt))
    loop = asyncio.get_running_loop()
    started = loop.time()
    tar = ctx.work_tar(task_id)
    remove_stale_parts(tar.parent, ctx.stale_after)
    if ctx.registry is None:
        return await _download_with_engine(ctx, task_id, refs[0], tar, fmt, started, discard)
    registry = ctx.registry
    explicit = event.payload.platform is not None
    async with ctx.reporter(task_id, Stage.DOWNLOAD) as progress:
        resolved = []
        for ref in refs:
            log.info("task %s: resolving %s for %s", task_id, ref, wanted)
            resolved.append((ref, await registry.resolve(ref, wanted, explicit=explicit)))
        if ctx.settings.download.reuse and not bundle:
            ref, image = resolved[0]
            found = await reuse.find(ctx.store, ctx.settings.minio.prefix, image, ref, fmt)
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
                        manifest_digest=image.manifest.digest,
                        platform=found.platform,
                        fetched_bytes=0,
                        cached_bytes=0,
                        reused_object=found.object,
                        format=fmt,
                    ),
                    discard,
                )
        for ref, image in resolved:
            log.info(
                "task %s: fetching %d layers of %s (%s, %s)",
                task_id,
                len(image.layers),
                ref,
                image.platform,
                image.manifest.digest,
            )
        got = await registry.download(resolved, tar.parent, progress.update)
    log.info(
        "task %s: %s verified: %d bytes fetched, %d from the cache",
        task_id,
        event.payload.docker_image_name,
        got.fetched_bytes,
        got.cached_bytes,
    )
    first = got.plan.images[0]
    return await ctx.complete(
        task_id,
        Downloaded(
            docker_image_name=event.payload.docker_image_name,
            image_id=first.image_id,
            tar_path=str(got.plan_path),
            bytes=got.tar_bytes,
            seconds=round(loop.time() - started, 3),
            engine="registry",
            layout="blobs",
            manifest_digest=None if bundle else first.manifest_digest,
            platform=event.payload.platform if bundle else first.platform,
            fetched_bytes=got.fetched_bytes,
            cached_bytes=got.cached_bytes,
            format=fmt,
            images=[
                BundleImage(
                    docker_image_name=image.reference,
                    image_id=image.image_id,
                    manifest_digest=image.manifest_digest,
                    platform=image.platform,
                )
                for image in got.plan.images
            ]
            if bundle
            else None,
        ),
        discard,
    )


async def _download_with_engine(
    ctx: StageContext,
    task_id: str,
    ref: ImageReference,
    tar: Path,
    fmt: ArchiveFormat,
    started: float,
    discard: Discard,
) -> Event | None:
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
            format=fmt,
        ),
        discard,
    )


async def compress(ctx: StageContext, event: Event, attempt: int = 1) -> Event | None:
    """Write the task's archive; emits ``compressed``.

    From a registry download the archive is spliced: gzip layer blobs are copied verbatim
    and only headers (and non-gzip layers) are compressed. From an engine's tar the whole
    tar is gzipped. A reused download writes nothing. The task's work directory is removed
    once ``compressed`` is published, with any ``.part`` file another run left beside the
    archive. Returns None (doing nothing) when the compression already completed, and
    when the task ended (then the work directory goes, and the task's archive directory
    too when it failed).
    """
    assert isinstance(event.payload, Downloaded)
    payload = event.payload
    task_id = _task_id(event)
    bundle = payload.images is not None
    name = payload.docker_image_name if bundle else str(_reference(payload.docker_image_name))
    fmt = ArchiveFormat(payload.format or DEFAULT_FORMAT)
    if await ctx.already_done(task_id, EventType.COMPRESSED):
        return None
    archive = ctx.archive(task_id, name, fmt)
    discard = _discard_compress(ctx, task_id, Path(archive).parent)
    if await ctx.stopped(task_id, "not running the compress stage", discard):
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
                docker_image_name=name,
                image_id=payload.image_id,
                gzip_file_name="",
                bytes_in=0,
                bytes_out=found.size,
                sha256=found.sha256,
                method="reuse",
                reused_object=payload.reused_object,
                manifest_digest=payload.manifest_digest,
                platform=payload.platform,
                format=fmt,
            ),
            discard,
        )
    tar = ctx.work_tar(task_id)
    task_dir = tar.parent
    from_blobs = payload.layout == "blobs"
    source = task_dir / naming.PLAN_FILE if from_blobs else tar
    if not source.exists():
        raise PermanentFailure(
            f"work file {source} is missing (removed, or not on a shared volume)"
        )
    await ctx.announce(task_id, CompressStarted(worker=ctx.worker, attempt=attempt))
    remove_stale_parts(Path(archive).parent, ctx.stale_after)
    storage = ctx.settings.storage
    spliced: int | None = None
    shared: int | None = None
    async with ctx.reporter(task_id, Stage.COMPRESS) as progress:
        if from_blobs:
            plan = ImagePlan.read(source)
            images = await asyncio.to_thread(plan.archive_images, task_dir)
            written = await asyncio.to_thread(
                functools.partial(
                    write_archive,
                    Path(archive),
                    images,
                    fmt=fmt,
                    level=storage.compress_level,
                    threads=storage.compress_threads,
                    progress=progress.update,
                )
            )
            bytes_in, bytes_out = written.bytes_in, written.bytes_out
            sha256, seconds, spliced = written.sha256, written.seconds, written.spliced_bytes
            shared = written.shared_bytes if bundle else None
        else:
            if not fmt.docker_layout:
                raise PermanentFailure(f"an engine's image tar cannot become an {fmt.value}")
            result = await asyncio.to_thread(
                compress_file,
                tar,
                Path(archive),
                level=storage.compress_level,
                threads=storage.compress_threads,
                progress=progress.update,
                gzip=fmt is ArchiveFormat.DOCKER_GZIP,
            )
            bytes_in, bytes_out = result.bytes_in, result.bytes_out
            sha256, seconds = result.sha256, result.seconds
    log.info(
        "task %s: %s %s %d -> %d bytes in %.1fs (%.0f MB/s)",
        task_id,
        fmt.value,
        "spliced" if from_blobs else "compressed",
        bytes_in,
        bytes_out,
        seconds,
        bytes_in / 1e6 / seconds if seconds > 0 else 0.0,
    )
    completed = await ctx.complete(
        task_id,
        Compressed(
            docker_image_name=name,
            image_id=payload.image_id,
            gzip_file_name=archive,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            sha256=sha256,
            seconds=round(seconds, 3),
            method=_method(fmt, from_blobs),
            spliced_bytes=spliced,
            manifest_digest=payload.manifest_digest,
            platform=payload.platform,
            format=fmt,
            bundle=bundle,
            shared_bytes=shared,
        ),
        discard,
    )
    if completed is None:
        return None
    # Only once ``compressed`` is stored: a redelivery before that point must still find
    # its input (a redelivery after it stops at ``already_done``; the cleanup's sweep of
    # abandoned work directories takes what such a crash leaves). Another run's part
    # files are moot from here on: that run stops at ``already_done`` when retried.
    _remove_work_dir(task_dir)
    remove_stale_parts(Path(archive).parent, older_than=None)
    return completed


async def upload(ctx: StageContext, event: Event, attempt: int = 1) -> Event | None:
    """Upload the archive with its image ID, sha256, manifest digest and platform as
    metadata (or copy the reused object server-side); emits ``uploaded``.

    Returns None (doing nothing) when the upload already completed for this task, and
    when the task failed (then its object and unfinished uploads are removed).
    """
    assert isinstance(event.payload, Compressed)
    payload = event.payload
    task_id = _task_id(event)
    ref = None if payload.bundle else _reference(payload.docker_image_name)
    subject = payload.docker_image_name if ref is None else str(ref)
    fmt = ArchiveFormat(payload.format or DEFAULT_FORMAT)
    if await ctx.already_done(task_id, EventType.UPLOADED):
        return None
    name = naming.object_name(ctx.settings.minio.prefix, task_id, subject, fmt)
    discard = _discard_upload(ctx, name)
    if await ctx.stopped(task_id, "not running the upload stage", discard):
        return None
    metadata = {
        "dcu-task-id": task_id,
        "dcu-image-id": payload.image_id,
        "dcu-sha256": payload.sha256,
        "dcu-image": subject,
        "dcu-format": fmt.value,
    }
    if payload.bundle:
        metadata["dcu-bundle"] = "true"
    if payload.manifest_digest and ref is not None:
        metadata["dcu-manifest-digest"] = payload.manifest_digest
        metadata["dcu-reuse-key"] = reuse.key_for(payload.manifest_digest, ref, fmt)
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
        archive = Path(ctx.archive(task_id, subject, fmt))
        if not archive.exists():
            raise PermanentFailure(
                f"archive {archive} is missing (removed, or not on a shared volume)"
            )
        await ctx.announce(task_id, UploadStarted(worker=ctx.worker, attempt=attempt))
        aborted = await ctx.store.abort_incomplete(name, older_than=ctx.stale_after)
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
        if payload.manifest_digest and ref is not None and ctx.settings.download.reuse:
            await reuse.remember(ctx.store, ctx.settings.minio.prefix, ref, name, payload, fmt)
    completed = await ctx.complete(
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
            format=fmt,
        ),
        discard,
    )
    if completed is not None:
        # Another run's unfinished upload of the name is moot now (retried, that run
        # stops at ``already_done``); a young one was left alone above.
        try:
            await ctx.store.abort_incomplete(name, older_than=None)
        except StorageError as exc:
            log.warning("task %s: unfinished uploads of %s left: %s", task_id, name, exc)
    return completed


def _method(fmt: ArchiveFormat, from_blobs: bool) -> str:
    """How the archive was written (``Compressed.method``): ``splice`` (gzip layers
    copied verbatim), ``gzip`` (an engine's tar compressed), ``tar`` (layers written
    uncompressed), ``oci`` (registry blobs copied as they are)."""
    if fmt is ArchiveFormat.OCI:
        return "oci"
    if fmt is ArchiveFormat.DOCKER:
        return "tar"
    return "splice" if from_blobs else "gzip"


def _discard_work_dir(ctx: StageContext, task_id: str) -> Discard:
    async def discard(ended: EventType) -> None:
        await asyncio.to_thread(remove_partial_files_for, ctx.settings, task_id)

    return discard


def _discard_compress(ctx: StageContext, task_id: str, archive_dir: Path) -> Discard:
    """The work directory always goes; the archive directory too when the task failed
    (nothing refers to its archive), only stray part files when it was uploaded."""

    async def discard(ended: EventType) -> None:
        await asyncio.to_thread(remove_partial_files_for, ctx.settings, task_id)
        if ended is EventType.FAILED:
            await asyncio.to_thread(shutil.rmtree, archive_dir, True)
        else:
            await asyncio.to_thread(remove_stale_parts, archive_dir, None)

    return discard


def _discard_upload(ctx: StageContext, name: str) -> Discard:
    """A failed task's object (no task refers to it) and unfinished uploads go; an
    uploaded task's object is the one its ``uploaded`` event names, and stays."""

    async def discard(ended: EventType) -> None:
        if ended is EventType.FAILED:
            await ctx.store.abort_incomplete(name, older_than=None)
            await ctx.store.remove(name)

    return discard


def remove_stale_parts(
    directory: Path, older_than: float | None, now: datetime | None = None
) -> None:
    """Drop ``*.part`` files in this task's own directory that nobody wrote to for
    ``older_than`` seconds before ``now`` (default: the clock): a killed run's. A younger
    one may be a live duplicate run's, which writes it continuously. ``older_than=None``
    drops them all (no other run's output matters any more)."""
    cutoff = None if older_than is None else (now or datetime.now(UTC)).timestamp() - older_than
    with contextlib.suppress(FileNotFoundError):
        for leftover in directory.glob("*.part"):
            try:
                st = leftover.lstat()
            except FileNotFoundError:
                continue
            if not S_ISREG(st.st_mode) or (cutoff is not None and st.st_mtime > cutoff):
                continue
            log.info("removing %s left by another attempt", leftover)
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

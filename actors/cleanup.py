"""The cleaners and the dramatiq actor that runs them on ``cleanup.*.requested`` events.

* ``clean_gzip`` removes expired archives under ``storage.gzip_path`` and abandoned work
  directories under ``storage.work_path``. It only ever touches what DCU writes there:
  regular archive files (``*.tar.gz``, ``*.tar``, ``*.oci.tar``, each also with ``.part``)
  directly inside a task directory (a
  directory named by a canonical task UUID directly inside ``gzip_path``), and
  ``image.tar`` / ``image.tar.part`` inside a task directory of ``work_path``. It never
  follows a symlink: every step works on directory file descriptors opened with
  ``O_NOFOLLOW`` and ``lstat``-style calls, so a link swapped in mid-run cannot redirect
  it. Symlinked task directories or archives are left alone and counted as kept.
  With it runs the blob cache's LRU eviction down to ``download.cache_max_bytes``.
* ``clean_objects`` removes expired ``<prefix><task_id>/<name><suffix>`` objects through
  the ``ObjectStore`` protocol (S3 or the local directory store alike).

Both take ``now`` explicitly (tests drive them with a clock) and return a
``CleanupResult``; a file or object that cannot be removed becomes one short string in
``errors`` and the run goes on. Task records are never modified: a task's history (and
its ``gzip_file_name`` / ``minio_object_name``) stays as it was.

The actor publishes one ``completed`` event per request, with an id derived from the
request's, so a redelivered request that runs twice reports once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dramatiq

from actors.blob_cache import BlobCache
from actors.object_store import ObjectStore
from actors.pipeline import Runtime
from dramatiq_jetstream import JetStreamBroker
from events import subjects
from events.cleanup import (
    CLEANUP_QUEUE,
    CleanupEvent,
    CleanupEventType,
    CleanupKind,
    CleanupRequested,
    CleanupResult,
    cutoff,
    is_dcu_object,
    is_task_id,
    object_prefix,
    select_expired,
)
from events.formats import ARCHIVE_SUFFIXES
from events.naming import PLAN_FILE, is_sha256_hex
from events.schema import DecodeError, utcnow
from kernel.errors import DcuError, PermanentFailure
from kernel.settings import Settings

log = logging.getLogger(__name__)

# Every format's archive, and the part file of one being written.
ARCHIVE_NAMES = (*ARCHIVE_SUFFIXES, *(f"{suffix}.part" for suffix in ARCHIVE_SUFFIXES))
WORK_FILES = frozenset({"image.tar", "image.tar.part", PLAN_FILE, f"{PLAN_FILE}.part"})
BLOBS_DIR = "blobs"  # the registry engine's hard links to the task's verified blobs

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW_DIR_FLAGS = _DIR_FLAGS | os.O_NOFOLLOW

Clock = Callable[[], datetime]


# -- local files ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    """A regular file inside a task directory, as seen by ``lstat``."""

    name: str
    size: int
    last_modified: datetime


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime, UTC)


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


Visit = Callable[[int, str, int], None]


def _each_task_dir(root: Path, what: str, result: CleanupResult, visit: Visit) -> None:
    """Call ``visit(root_fd, task_id, dir_fd)`` for every real task directory in ``root``.

    Names that are not canonical task ids are never looked into; a symlink with a task
    id's name is counted as kept (and, opened with ``O_NOFOLLOW``, a directory swapped
    for a link meanwhile is refused). A missing root is nothing to clean; any other
    ``OSError`` is reported in ``errors`` for the directory it happened in.
    """
    try:
        root_fd = os.open(root, _DIR_FLAGS)
    except FileNotFoundError:
        return
    except OSError as exc:
        result.error(f"{what} {root}: {_reason(exc)}")
        return
    try:
        with os.scandir(root_fd) as entries:
            names = sorted(
                (e.name, e.is_symlink(), e.is_dir(follow_symlinks=False))
                for e in entries
                if is_task_id(e.name)
            )
        for task_id, is_link, is_dir in names:
            if is_link:
                log.info("cleanup: %s dir %s is a symlink; left alone", what, task_id)
                result.kept += 1
                continue
            if not is_dir:
                continue
            try:
                dir_fd = os.open(task_id, _NOFOLLOW_DIR_FLAGS, dir_fd=root_fd)
            except FileNotFoundError:
                continue  # removed meanwhile (another cleaner on a shared volume)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped for a link
                    result.kept += 1
                else:
                    result.error(f"{what} {task_id}: {_reason(exc)}")
                continue
            try:
                visit(root_fd, task_id, dir_fd)
            except OSError as exc:
                result.error(f"{what} {task_id}: {_reason(exc)}")
            finally:
                os.close(dir_fd)
    except OSError as exc:
        result.error(f"{what} {root}: {_reason(exc)}")
    finally:
        os.close(root_fd)


def _files(dir_fd: int, owned: Callable[[str], bool], result: CleanupResult) -> list[_Entry]:
    """The regular files in ``dir_fd`` whose names ``owned`` accepts (lstat, no links
    followed). Owned names that are symlinks are counted as kept."""
    found: list[_Entry] = []
    with os.scandir(dir_fd) as entries:
        names = sorted(e.name for e in entries if owned(e.name))
    for name in names:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            result.kept += 1
            continue
        if stat.S_ISREG(st.st_mode):
            found.append(_Entry(name=name, size=st.st_size, last_modified=_mtime(st)))
    return found


def _unlink(dir_fd: int, task_id: str, entry: _Entry, result: CleanupResult) -> bool:
    try:
        os.unlink(entry.name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False  # removed meanwhile; not ours to count
    except OSError as exc:
        result.error(f"{task_id}/{entry.name}: {_reason(exc)}")
        return False
    result.removed(entry.size)
    log.debug("cleanup: task %s: removed %s (%d bytes)", task_id, entry.name, entry.size)
    return True


def _remove_dir_if_empty(root_fd: int, task_id: str, what: str, result: CleanupResult) -> None:
    try:
        os.rmdir(task_id, dir_fd=root_fd)  # never removes a symlink: that is ENOTDIR
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            result.error(f"{what} {task_id}: {_reason(exc)}")
        return
    log.info("cleanup: task %s: removed its %s directory", task_id, what)


def _is_archive(name: str) -> bool:
    return name.endswith(ARCHIVE_NAMES) and not name.startswith(".")


def _clean_archives(
    root: Path, now: datetime, retention_days: float, result: CleanupResult
) -> None:
    limit = cutoff(now, retention_days)

    def visit(root_fd: int, task_id: str, dir_fd: int) -> None:
        dir_expired = _mtime(os.fstat(dir_fd)) < limit  # as it was before we touched it
        files = _files(dir_fd, _is_archive, result)
        expired = select_expired(files, now, retention_days)
        result.kept += len(files) - len(expired)
        removed = sum(_unlink(dir_fd, task_id, entry, result) for entry in expired)
        if expired:
            log.info("cleanup: task %s: removed %d expired archive file(s)", task_id, removed)
        # An empty directory of a young task may be one the compress stage just created.
        if removed or dir_expired:
            _remove_dir_if_empty(root_fd, task_id, "gzip", result)

    _each_task_dir(root, "gzip", result, visit)


def _clean_blob_links(task_fd: int, task_id: str, result: CleanupResult) -> int:
    """Remove an abandoned task's ``blobs/<hex>`` links (the shared cache keeps its own
    names) and the directory; never follows a link."""
    try:
        blobs_fd = os.open(BLOBS_DIR, _NOFOLLOW_DIR_FLAGS, dir_fd=task_fd)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            result.kept += 1
        else:
            result.error(f"work {task_id}/{BLOBS_DIR}: {_reason(exc)}")
        return 0
    try:
        files = _files(blobs_fd, is_sha256_hex, result)
        removed = sum(_unlink(blobs_fd, task_id, entry, result) for entry in files)
    finally:
        os.close(blobs_fd)
    with contextlib.suppress(OSError):
        os.rmdir(BLOBS_DIR, dir_fd=task_fd)
    return removed


def _clean_work(root: Path, now: datetime, retention_days: float, result: CleanupResult) -> None:
    """A work directory is abandoned when neither it nor anything in it changed within
    the retention: its download or compress stage is long gone."""
    limit = cutoff(now, retention_days)

    def visit(root_fd: int, task_id: str, dir_fd: int) -> None:
        newest = _mtime(os.fstat(dir_fd))
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    newest = max(newest, _mtime(entry.stat(follow_symlinks=False)))
        files = _files(dir_fd, WORK_FILES.__contains__, result)
        if newest >= limit:
            result.kept += len(files)
            return
        removed = sum(_unlink(dir_fd, task_id, entry, result) for entry in files)
        removed += _clean_blob_links(dir_fd, task_id, result)
        if removed:
            log.info("cleanup: task %s: removed %d abandoned work file(s)", task_id, removed)
        _remove_dir_if_empty(root_fd, task_id, "work", result)

    _each_task_dir(root, "work", result, visit)


def clean_gzip(
    gzip_path: Path, work_path: Path, now: datetime, retention_days: float
) -> CleanupResult:
    """Remove archives under ``gzip_path`` last modified before ``now - retention_days``,
    task directories left empty by that, and work directories under ``work_path``
    untouched for as long. Blocking (run it in a thread).

    Never raises for a file it cannot remove or a directory it cannot read: those are
    reported in ``errors``. Raises ValueError for a naive ``now`` or negative retention.
    """
    started = time.monotonic()
    result = CleanupResult(kind=CleanupKind.GZIP)
    cutoff(now, retention_days)  # validate before touching anything
    _clean_archives(gzip_path, now, retention_days, result)
    _clean_work(work_path, now, retention_days, result)
    result.seconds = time.monotonic() - started
    return result


# -- objects --------------------------------------------------------------------------


async def clean_objects(
    store: ObjectStore, prefix: str, now: datetime, retention_days: float
) -> CleanupResult:
    """Remove ``<prefix><task_id>/<name>.tar.gz`` objects last modified before
    ``now - retention_days``. Other keys under the prefix are not touched or counted.

    Never raises for a store failure: a failed listing or removal is reported in
    ``errors``. Raises ValueError for a naive ``now`` or negative retention.
    """
    started = time.monotonic()
    result = CleanupResult(kind=CleanupKind.OBJECTS)
    cutoff(now, retention_days)
    base = object_prefix(prefix)
    try:
        listed = await store.list(base)
    except (DcuError, OSError) as exc:
        result.error(f"listing {store.location}/{base}: {exc}")
        result.seconds = time.monotonic() - started
        return result
    owned = [info for info in listed if is_dcu_object(info.name, prefix)]
    expired = select_expired(owned, now, retention_days)
    result.kept = len(owned) - len(expired)
    for info in expired:
        try:
            await store.remove(info.name)
        except (DcuError, OSError) as exc:
            result.error(f"removing {info.name}: {exc}")
            continue
        result.removed(info.size)
        log.debug("cleanup: removed object %s (%d bytes)", info.name, info.size)
    result.seconds = time.monotonic() - started
    return result


async def run_cleanup(
    kind: CleanupKind, settings: Settings, store: ObjectStore, now: datetime
) -> CleanupResult:
    """Run one cleanup of ``kind`` with the configured paths, prefix and retention."""
    storage = settings.storage
    if kind is CleanupKind.GZIP:
        result = await asyncio.to_thread(
            clean_gzip,
            Path(storage.gzip_path),
            Path(storage.work_path),
            now,
            storage.gzip_retention_days,
        )
        cache = BlobCache(Path(settings.download.cache_path), settings.download.cache_max_bytes)
        try:
            evicted = await asyncio.to_thread(cache.evict)
        except OSError as exc:
            result.error(f"blob cache {cache.root}: {_reason(exc)}")
        else:
            result.deleted += evicted.removed
            result.bytes_freed += evicted.freed_bytes
        return result
    return await clean_objects(store, settings.minio.prefix, now, storage.minio_retention_days)


# -- the actor ------------------------------------------------------------------------


def declare_cleanup(
    broker: JetStreamBroker, runtime: Runtime, *, clock: Clock = utcnow
) -> dramatiq.Actor[Any, Any]:
    """Declare the cleanup actor: queue ``cleanup`` bound to ``<prefix>.cleanup.*.requested``.

    Each request runs its cleaner and publishes ``<prefix>.cleanup.<kind>.completed``.
    An undecodable or non-request event fails at once (``PermanentFailure``); a failed
    publish (``BusError``) is retried by dramatiq, re-running the (idempotent) cleaner.
    """
    prefix = runtime.settings.nats.subject_prefix

    async def cleanup(event_data: dict[str, Any]) -> None:
        try:  # the broker parsed the JSON once; this validates it once, no second decode
            event = CleanupEvent.from_dict(event_data)
        except DecodeError as exc:
            raise PermanentFailure(f"undecodable cleanup event: {exc}") from exc
        if not isinstance(event.payload, CleanupRequested):
            raise PermanentFailure(f"cleanup got a {event.type} event, expected requested")
        log.info(
            "cleanup %s: request %s (%s by %s)",
            event.kind,
            event.event_id,
            event.payload.reason,
            event.payload.requested_by,
        )
        # Only the object store: the cleanup role opens no registry or Docker client.
        result = await run_cleanup(event.kind, runtime.settings, runtime.object_store(), clock())
        done = result.completed(event.event_id)
        await runtime.publish_raw(subjects.for_cleanup(done, prefix), done.encode(), done.msg_id)
        log.info(
            "cleanup %s: request %s done: %d deleted, %d bytes freed, %d kept, %d errors",
            event.kind,
            event.event_id,
            result.deleted,
            result.bytes_freed,
            result.kept,
            len(result.errors),
        )

    broker.bind_events(
        CLEANUP_QUEUE,
        CLEANUP_QUEUE,
        [subjects.every_cleanup_kind(CleanupEventType.REQUESTED, prefix)],
        stream=runtime.settings.nats.audit_stream,
    )
    decorate = dramatiq.actor(
        broker=broker,
        actor_name=CLEANUP_QUEUE,
        queue_name=CLEANUP_QUEUE,
        throws=(PermanentFailure,),
    )
    return decorate(cleanup)

"""``dcu replay``: rebuild the task database from the audit stream.

A rebuild is only trusted when the audit stream still starts at its first fact: the
stream's first sequence must be 1. Otherwise tasks whose ``requested`` fell off would be
dropped and their later facts logged as unknown, so the replay is refused unless the
caller accepts a partial database (``--allow-partial``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from actors.archiver import list_segments, read_segment
from actors.object_store import ObjectStore, open_store
from bus import Bus
from events import subjects
from events.audit_archive import ArchiveDamaged, Chain, Segment
from kernel.errors import DcuError
from kernel.settings import Settings
from persistence.database import Database
from persistence.repository import TaskRepository
from persistence.subscriber import Rebuild, ReplayCounts, rebuild_from_stream

log = logging.getLogger(__name__)


class ReplayRefused(DcuError):
    """The audit stream no longer holds every fact; a rebuild would be partial."""


@dataclass(frozen=True, slots=True)
class ReplayReport:
    counts: ReplayCounts
    first_seq: int  # the audit stream's first sequence when the replay started
    partial: bool  # facts were missing and the caller accepted it
    archived: int = 0  # the last sequence taken from the audit archive


async def replay(
    settings: Settings,
    target_url: str,
    *,
    allow_partial: bool = False,
    from_archive: bool = False,
) -> ReplayReport:
    """Apply every task fact to ``target_url``: from the audit stream, or (with
    ``from_archive``) from the audit archive's segments and then the stream after them.

    Meant for an empty database (an audit copy, or a lost one): the schema is migrated
    first. Applying is idempotent by event id, so replaying into a database that already
    holds some of the events only adds what is missing. Messages persistence refuses
    (not an event, an unknown type, unstorable text) are recorded as refused in the
    target and counted apart.
    Raises ReplayRefused when facts are missing (the stream's head is gone and the
    archive does not cover it, unless ``allow_partial``) or the archive has a gap or an
    edited segment; BusError, StorageError or DatabaseError when a part fails.
    """
    stream = settings.nats.audit_stream
    connection = await Bus.connect(settings.nats.url, settings.nats, "dcu-replay")
    try:
        first, last, messages = await connection.stream_state(stream)
        store = open_store(settings.minio) if from_archive else None
        try:
            archived = await _check_archive(settings, store) if store is not None else 0
            # the stream must go on where the archive ends (or start at 1 without one)
            head_lost = (first > archived + 1) or (messages == 0 and last > archived)
            if head_lost and not allow_partial:
                gone_to = first - 1 if messages else last
                covered = f"; the audit archive ends at {archived}" if from_archive else ""
                advice = (
                    "Pass --allow-partial to rebuild what is left"
                    if from_archive
                    else "Replay with --from-archive, or pass --allow-partial to rebuild "
                    "what is left"
                )
                raise ReplayRefused(
                    f"stream {stream} no longer starts at its first fact: facts "
                    f"{archived + 1}-{gone_to} are gone (its first sequence is {first}"
                    f"{covered}), so tasks that started before them cannot be rebuilt. {advice}"
                )
            database = await Database.open(target_url)
            try:
                rebuild = Rebuild(TaskRepository(database))
                if store is not None:
                    await _apply_archive(settings, store, rebuild)
                counts = await rebuild_from_stream(
                    connection,
                    rebuild.repository,
                    start_seq=archived + 1,
                    rebuild=rebuild,
                )
            finally:
                await database.close()
        finally:
            if store is not None:
                await store.close()
    finally:
        await connection.close()
    report = ReplayReport(counts=counts, first_seq=first, partial=head_lost, archived=archived)
    log.info(
        "replayed %s%s from sequence %d%s: tasks rebuilt %d, events applied %d, events refused %d",
        f"the audit archive (1-{archived}) and " if from_archive else "",
        stream,
        max(first, archived + 1),
        " (partial: facts are missing)" if head_lost else "",
        counts.tasks,
        counts.applied,
        counts.refused,
    )
    return report


async def _segments(settings: Settings, store: ObjectStore) -> AsyncIterator[Segment]:
    prefix, stream = settings.minio.prefix, settings.nats.audit_stream
    for name in await list_segments(store, prefix, stream):
        segment = await read_segment(store, name, settings.archive.max_segment_bytes)
        if segment is None:
            raise ReplayRefused(f"archive segment {name} disappeared while reading")
        yield segment


async def _check_archive(settings: Settings, store: ObjectStore) -> int:
    """Verify the whole archive before anything is applied; returns its last sequence.
    Raises ReplayRefused for a gap or an edited segment."""
    chain = Chain(settings.nats.audit_stream)
    try:
        async for segment in _segments(settings, store):
            chain.check(segment)
    except ArchiveDamaged as exc:
        raise ReplayRefused(f"the audit archive is damaged: {exc}") from exc
    return chain.last_seq


async def _apply_archive(settings: Settings, store: ObjectStore, rebuild: Rebuild) -> None:
    """Apply the archived task facts (cleanup facts are not the database's)."""
    chain = Chain(settings.nats.audit_stream)
    task_facts = subjects.every_task(prefix=settings.nats.subject_prefix).removesuffix(">")
    try:
        async for segment in _segments(settings, store):
            for message in chain.check(segment):
                if message.subject.startswith(task_facts):
                    await rebuild.apply(message)
    except ArchiveDamaged as exc:  # changed since it was checked
        raise ReplayRefused(f"the audit archive changed during the replay: {exc}") from exc

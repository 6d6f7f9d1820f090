"""The audit archiver: the audit stream, in order, written to the object store as
compressed JSON Lines segments (format in ``events.audit_archive``), so facts outlive the
stream's retention and ``dcu replay --from-archive`` can rebuild from the first one.

The archive itself is the archiver's only state: each pass lists the segments, continues
after the last sequence they cover, and writes at most ``archive.segment_max_events``
messages per segment, each chained to the one before by its sha256. A pass that dies
half-way loses nothing (the next pass starts again after the last segment written).
Run one archiver per deployment (``dcu serve`` runs it; ``dcu archiver`` alone): two
would write overlapping segments, which ``replay --from-archive`` refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from actors.object_store import ObjectStore
from bus import Bus
from events import audit_archive
from events.audit_archive import Segment, StoredMessage
from kernel.errors import DcuError
from kernel.settings import Settings

log = logging.getLogger(__name__)


async def list_segments(store: ObjectStore, object_prefix: str, stream: str) -> list[str]:
    """The segment names of ``stream``'s archive, by first sequence."""
    names = [
        info.name
        for info in await store.list(audit_archive.prefix(object_prefix, stream))
        if audit_archive.parse_name(info.name, object_prefix, stream) is not None
    ]
    return sorted(names)


async def read_segment(store: ObjectStore, name: str, max_bytes: int) -> Segment | None:
    """One segment with its metadata; None when it is gone. Raises StorageError."""
    info = await store.stat(name)
    body = await store.get_bytes(name, limit=max_bytes)
    if info is None or body is None:
        return None
    return Segment(name, body, dict(info.metadata))


class AuditArchiver:
    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        store: ObjectStore,
        *,
        segment_max_events: int | None = None,
    ) -> None:
        self._settings = settings
        self._bus = bus
        self._store = store
        self._stream = settings.nats.audit_stream
        self._prefix = settings.minio.prefix
        self._max_events = segment_max_events or settings.archive.segment_max_events

    async def archive_once(self) -> list[str]:
        """Write every fact the archive lacks as new segments; returns their names.

        Raises BusError when the stream cannot be read, StorageError when the store fails.
        """
        names = await list_segments(self._store, self._prefix, self._stream)
        last = audit_archive.last_seq(names, self._prefix, self._stream)
        previous = ""
        if names:
            info = await self._store.stat(names[-1])
            previous = "" if info is None else info.metadata.get("sha256", "")
        first, last_in_stream, _ = await self._bus.stream_state(self._stream)
        start = last + 1
        if last_in_stream < start:
            return []
        if first > start:
            log.error(
                "audit archive: facts %d-%d left stream %s before they were archived; the "
                "archive will have a gap there",
                start,
                first - 1,
                self._stream,
            )
            start = first
        written: list[str] = []
        batch: list[StoredMessage] = []
        for seq in range(start, last_in_stream + 1):
            message = await self._bus.message(self._stream, seq)  # None: never stored
            if message is not None:
                batch.append(message)
            if len(batch) >= self._max_events:
                previous = await self._write(batch, previous, written)
                batch = []
        if batch:
            await self._write(batch, previous, written)
        return written

    async def _write(self, batch: list[StoredMessage], previous: str, written: list[str]) -> str:
        segment = audit_archive.encode(
            batch, object_prefix=self._prefix, stream=self._stream, prev_sha256=previous
        )
        await self._store.put_bytes(segment.name, segment.body, segment.metadata)
        written.append(segment.name)
        log.info(
            "audit archive: wrote %s (%d facts, %d bytes)",
            segment.name,
            len(batch),
            len(segment.body),
        )
        return segment.metadata["sha256"]

    async def run(self, stop: asyncio.Event, interval: Callable[[], float] | None = None) -> None:
        """Archive every ``archive.interval`` seconds (and once at the start) until
        ``stop`` is set; failures are logged and tried again at the next pass."""
        wait = interval or (lambda: self._settings.archive.interval)
        while not stop.is_set():
            try:
                await self.archive_once()
            except DcuError as exc:
                log.warning("audit archive pass failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait())

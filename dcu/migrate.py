"""``dcu migrate-streams``: move an earlier version's single stream into the three streams.

Versions before the audit/progress/work split kept everything in one stream
(``nats.stream``, subjects ``<prefix>.>``). With the service stopped, this:

1. reads every message of that stream in order into a spool file (an ordered consumer,
   no state left on the server);
2. deletes the stream's consumers (the old stage and persistence durables) and moves the
   stream off ``<prefix>.>`` (its subjects become ``<prefix>-legacy.<stream>.>``; the
   stored messages keep theirs), so the new streams can take the subjects;
3. creates the audit, progress and work streams (``bus.ensure_streams``);
4. copies the facts (``<prefix>.task.*.<type>`` except progress, and
   ``<prefix>.cleanup.>``) into the audit stream in their original order, each with its
   ``Nats-Msg-Id``, and the dead letters into the work stream. Progress reports and
   queue messages are not copied: they were transient.
5. deletes the old stream only with ``--delete-old``, after the copy is complete;
   otherwise it stays as a backup (``nats stream rm`` removes it later).

A migration that stopped half-way can be run again: facts already in the audit stream
(counted from its start, in order) are skipped.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from bus import Bus
from events import subjects
from kernel.errors import BusError, DcuError
from kernel.settings import NatsSettings, Settings

log = logging.getLogger(__name__)


class NothingToMigrate(DcuError):
    """No stream of an earlier version is there."""


@dataclass(frozen=True, slots=True)
class MigrationReport:
    read: int  # messages in the old stream
    facts: int  # copied into the audit stream (or already there)
    dead_letters: int  # copied into the work stream
    skipped: int  # progress reports and queue messages, not copied
    old_stream_deleted: bool


def legacy_subjects(settings: NatsSettings) -> list[str]:
    return [f"{settings.subject_prefix}-legacy.{settings.stream}.>"]


def _kind(subject: str, prefix: str) -> str:
    """``fact``, ``dead`` or ``skip`` for a subject of the old stream."""
    parts = subject.split(".")
    if len(parts) < 2 or parts[0] != prefix:
        return "skip"
    if parts[1] == "task" and len(parts) == 4 and parts[3] != "progress":
        return "fact"
    if parts[1] == "cleanup":
        return "fact"
    if parts[1] == "dead":
        return "dead"
    return "skip"


def _write(spool: BinaryIO, *fields: bytes) -> None:
    for field in fields:
        spool.write(struct.pack(">I", len(field)))
        spool.write(field)


def _records(spool: BinaryIO) -> Iterator[tuple[str, str, bytes]]:
    spool.seek(0)
    while header := spool.read(4):
        values = []
        for index in range(3):
            size = struct.unpack(">I", header if index == 0 else spool.read(4))[0]
            values.append(spool.read(size))
        yield values[0].decode(), values[1].decode(), values[2]


async def _spool(bus: Bus, settings: NatsSettings, spool: BinaryIO) -> int:
    """Copy every message of the old stream, in order, into ``spool``; returns how many.

    An ordered consumer reads it while it still has its subjects; once moved off them
    (a migration run again) no consumer filter matches the stored subjects, so the
    messages are read one by one by sequence.
    """
    first, last, messages = await bus.stream_state(settings.stream)
    if not messages:
        return 0
    everything = subjects.all_events(settings.subject_prefix)
    count = 0
    if everything in (await bus.stream_subjects(settings.stream) or []):
        reader = bus.read(settings.stream, everything)
        async with contextlib.aclosing(reader):
            async for message in reader:
                _write(spool, message.subject.encode(), message.msg_id.encode(), message.data)
                count += 1
        return count
    for seq in range(first, last + 1):
        found = await bus.message(settings.stream, seq)
        if found is not None:
            _write(spool, found.subject.encode(), found.msg_id.encode(), found.data)
            count += 1
    return count


async def migrate_streams(settings: Settings, *, delete_old: bool = False) -> MigrationReport:
    """Run the migration described in the module docstring.

    Raises NothingToMigrate when the old stream is missing; BusError when NATS fails.
    """
    nats = settings.nats
    prefix = nats.subject_prefix
    bus = await Bus.connect(nats.url, nats, "dcu-migrate")
    try:
        old_subjects = await bus.stream_subjects(nats.stream)
        if old_subjects is None:
            raise NothingToMigrate(f"there is no stream {nats.stream} to migrate")
        with tempfile.TemporaryFile(prefix="dcu-migrate-") as spool:
            read = await _spool(bus, nats, spool)
            log.info("read %d messages from stream %s", read, nats.stream)
            if subjects.all_events(prefix) in old_subjects:
                await bus.retire_stream(nats.stream, legacy_subjects(nats))
                log.info("stream %s moved to %s", nats.stream, legacy_subjects(nats))
            await bus.ensure_streams()
            already = (await bus.stream_state(nats.audit_stream))[2]
            facts = dead = skipped = 0
            for index, (subject, msg_id, data) in enumerate(_records(spool)):
                kind = _kind(subject, prefix)
                if kind == "skip":
                    skipped += 1
                    continue
                copy_id = msg_id or f"migrated-{nats.stream}-{index}"
                if kind == "dead":
                    dead += 1
                    await bus.publish_raw(subject, data, copy_id)
                    continue
                facts += 1
                if facts > already:
                    await bus.publish_raw(subject, data, copy_id)
        copied = (await bus.stream_state(nats.audit_stream))[2]
        if copied < facts:
            raise BusError(
                f"the audit stream holds {copied} facts, the old stream had {facts}; "
                f"stream {nats.stream} is kept, run the migration again"
            )
        if delete_old:
            await bus.delete_stream(nats.stream)
            log.info("deleted stream %s", nats.stream)
        return MigrationReport(read, facts, dead, skipped, delete_old)
    finally:
        await bus.close()

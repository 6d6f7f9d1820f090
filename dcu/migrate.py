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

import logging
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO

from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from dcu import bus
from dcu.errors import BusError, DcuError
from dcu.settings import NatsSettings, Settings
from events import subjects

log = logging.getLogger(__name__)

_READ_TIMEOUT = 10.0  # seconds the old stream may stay silent before the spool is complete


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


async def _spool(js: JetStreamContext, settings: NatsSettings, spool: BinaryIO) -> int:
    """Copy every message of the old stream, in order, into ``spool``; returns how many.

    An ordered consumer reads it while it still has its subjects; once moved off them
    (a migration run again) no consumer filter matches the stored subjects, so the
    messages are read one by one by sequence.
    """
    info = await js.stream_info(settings.stream)
    if not info.state.messages:
        return 0
    if subjects.all_events(settings.subject_prefix) not in (info.config.subjects or []):
        count = 0
        for seq in range(int(info.state.first_seq), int(info.state.last_seq) + 1):
            try:
                raw = await js.get_msg(settings.stream, seq)
            except NotFoundError:
                continue
            msg_id = (raw.headers or {}).get("Nats-Msg-Id", "")
            _write(spool, str(raw.subject).encode(), msg_id.encode(), raw.data or b"")
            count += 1
        return count
    subscription = await js.subscribe(
        subjects.all_events(settings.subject_prefix),
        stream=settings.stream,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    count = 0
    try:
        while True:
            try:
                message = await subscription.next_msg(timeout=_READ_TIMEOUT)
            except NatsTimeoutError as exc:
                raise BusError(f"stream {settings.stream} went quiet after {count}") from exc
            msg_id = (message.headers or {}).get("Nats-Msg-Id", "")
            _write(spool, message.subject.encode(), msg_id.encode(), message.data)
            count += 1
            if not message.metadata.num_pending:
                return count
    finally:
        await subscription.unsubscribe()


async def migrate_streams(
    settings: Settings, nats_url: str, *, delete_old: bool = False
) -> MigrationReport:
    """Run the migration described in the module docstring.

    Raises NothingToMigrate when the old stream is missing or already moved off the
    subjects and nothing is left to copy; BusError when NATS fails.
    """
    nats = settings.nats
    prefix = nats.subject_prefix
    nc = await bus.connect(nats_url, nats, "dcu-migrate")
    try:
        js = nc.jetstream()
        try:
            old = (await js.stream_info(nats.stream)).config
        except NotFoundError:
            raise NothingToMigrate(f"there is no stream {nats.stream} to migrate") from None
        with tempfile.TemporaryFile(prefix="dcu-migrate-") as spool:
            read = await _spool(js, nats, spool)
            log.info("read %d messages from stream %s", read, nats.stream)
            if subjects.all_events(prefix) in (old.subjects or []):
                for consumer in await js.consumers_info(nats.stream):
                    await js.delete_consumer(nats.stream, str(consumer.name))
                await js.update_stream(replace(old, subjects=legacy_subjects(nats)))
                log.info("stream %s moved to %s", nats.stream, legacy_subjects(nats))
            await bus.ensure_streams(js, nats)
            already = int((await js.stream_info(nats.audit_stream)).state.messages or 0)
            facts = dead = skipped = 0
            for subject, msg_id, data in _records(spool):
                kind = _kind(subject, prefix)
                if kind == "skip":
                    skipped += 1
                    continue
                if kind == "dead":
                    dead += 1
                    await _copy(js, subject, msg_id, data)
                    continue
                facts += 1
                if facts > already:
                    await _copy(js, subject, msg_id, data)
        copied = int((await js.stream_info(nats.audit_stream)).state.messages or 0)
        if copied < facts:
            raise BusError(
                f"the audit stream holds {copied} facts, the old stream had {facts}; "
                f"stream {nats.stream} is kept, run the migration again"
            )
        deleted = False
        if delete_old:
            await js.delete_stream(nats.stream)
            deleted = True
            log.info("deleted stream %s", nats.stream)
        return MigrationReport(read, facts, dead, skipped, deleted)
    except (NatsError, TimeoutError) as exc:
        raise BusError(f"migrating stream {nats.stream} failed: {exc}") from exc
    finally:
        await nc.close()


async def _copy(js: JetStreamContext, subject: str, msg_id: str, data: bytes) -> None:
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    await js.publish(subject, data, headers=headers, timeout=10)

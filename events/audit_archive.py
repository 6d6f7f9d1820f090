"""The long-term audit archive's format: the audit stream, in order, as gzipped JSON Lines
segments in the object store.

One object per run of consecutive stream sequences::

    <minio.prefix>audit/<audit stream>/<first seq, 12 digits>-<last seq, 12 digits>.jsonl.gz

Each line is one stored message, exactly as the stream holds it::

    {"seq": 42, "subject": "dcu.task.<id>.uploaded", "time": "2026-…Z",
     "msg_id": "<Nats-Msg-Id>", "data": "<the message bytes as text>"}

(``data`` is the raw message decoded as UTF-8 with ``surrogateescape`` and written with
ASCII escapes, so any bytes survive the round trip.) The object's metadata holds
``first-seq``, ``last-seq``, ``count``, ``sha256`` (of the object's bytes) and
``prev-sha256`` (the previous segment's ``sha256``; empty for the first), so a missing
segment (a gap in the sequences) or an edited one (a digest that does not match, or a
chain that breaks) is found by :class:`Chain` before anything is replayed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from events.schema import format_time, parse_time

SUFFIX = ".jsonl.gz"
_NAME = re.compile(r"^(\d{12})-(\d{12})\.jsonl\.gz$")


class ArchiveDamaged(ValueError):
    """The archive has a gap, an edited segment or a segment that cannot be read."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message of the audit stream as archived (and as replayed)."""

    stream: str
    seq: int
    subject: str
    time: datetime
    msg_id: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Segment:
    """A segment's object: its bytes and the metadata that goes with them."""

    name: str
    body: bytes
    metadata: dict[str, str]


def prefix(object_prefix: str, stream: str) -> str:
    """Where ``stream``'s segments live under the store's object prefix (``dcu/``)."""
    return f"{object_prefix}audit/{stream}/"


def segment_name(object_prefix: str, stream: str, first: int, last: int) -> str:
    return f"{prefix(object_prefix, stream)}{first:012d}-{last:012d}{SUFFIX}"


def parse_name(name: str, object_prefix: str, stream: str) -> tuple[int, int] | None:
    """``(first, last)`` for a segment name of ``stream``; None for any other object."""
    base = prefix(object_prefix, stream)
    if not name.startswith(base):
        return None
    match = _NAME.match(name[len(base) :])
    if match is None:
        return None
    return int(match[1]), int(match[2])


def sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def encode(
    messages: Iterable[StoredMessage], *, object_prefix: str, stream: str, prev_sha256: str
) -> Segment:
    """The segment object for ``messages`` (in order, at least one)."""
    lines = []
    first = last = 0
    for message in messages:
        if not first:
            first = message.seq
        elif message.seq <= last:
            raise ValueError(f"messages out of order: {message.seq} after {last}")
        last = message.seq
        record = {
            "seq": message.seq,
            "subject": message.subject,
            "time": format_time(message.time),
            "msg_id": message.msg_id,
            "data": message.data.decode("utf-8", "surrogateescape"),
        }
        lines.append(json.dumps(record, ensure_ascii=True, separators=(",", ":")))
    if not lines:
        raise ValueError("a segment needs at least one message")
    body = gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=6, mtime=0)
    metadata = {
        "first-seq": str(first),
        "last-seq": str(last),
        "count": str(len(lines)),
        "sha256": sha256(body),
        "prev-sha256": prev_sha256,
    }
    return Segment(segment_name(object_prefix, stream, first, last), body, metadata)


def decode(segment: Segment, stream: str) -> list[StoredMessage]:
    """The messages of a segment; raises ArchiveDamaged when it cannot be read."""
    try:
        text = gzip.decompress(segment.body).decode()
        messages = []
        for line in text.splitlines():
            record = json.loads(line)
            messages.append(
                StoredMessage(
                    stream=stream,
                    seq=int(record["seq"]),
                    subject=str(record["subject"]),
                    time=parse_time(str(record["time"])),
                    msg_id=str(record["msg_id"]),
                    data=str(record["data"]).encode("utf-8", "surrogateescape"),
                )
            )
    except (OSError, EOFError, UnicodeError, ValueError, KeyError, TypeError) as exc:
        raise ArchiveDamaged(f"segment {segment.name} cannot be read: {exc}") from exc
    return messages


class Chain:
    """Checks segments one after the other (sorted by first sequence), keeping only the
    previous segment's digest, so an archive of any size is checked in constant memory."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.expected_first = 1
        self.previous = ""

    @property
    def last_seq(self) -> int:
        return self.expected_first - 1

    def check(self, segment: Segment) -> list[StoredMessage]:
        """The segment's messages; raises ArchiveDamaged when the archive does not start
        at sequence 1, the segment's bytes do not match its ``sha256``, the chain of
        ``prev-sha256`` breaks, or sequences are missing between or within segments."""
        meta = segment.metadata
        first, last = int(meta.get("first-seq", 0)), int(meta.get("last-seq", 0))
        if first != self.expected_first:
            missing = (
                f"sequences {self.expected_first}-{first - 1} are missing"
                if first > self.expected_first
                else f"it overlaps the one before (starts at {first})"
            )
            raise ArchiveDamaged(f"the archive has a gap before {segment.name}: {missing}")
        digest = sha256(segment.body)
        if meta.get("sha256") != digest:
            raise ArchiveDamaged(
                f"segment {segment.name} was edited: its bytes hash to {digest}, "
                f"its metadata says {meta.get('sha256')}"
            )
        if meta.get("prev-sha256", "") != self.previous:
            raise ArchiveDamaged(
                f"segment {segment.name} does not follow the one before it (prev-sha256 "
                f"{meta.get('prev-sha256')!r}, the previous segment hashes to "
                f"{self.previous!r})"
            )
        messages = decode(segment, self.stream)
        seqs = [m.seq for m in messages]
        if seqs != list(range(first, last + 1)) or int(meta.get("count", -1)) != len(seqs):
            raise ArchiveDamaged(f"segment {segment.name} does not hold {first}-{last} in order")
        self.expected_first = last + 1
        self.previous = digest
        return messages


def last_seq(names: Iterable[str], object_prefix: str, stream: str) -> int:
    """The last sequence the archive covers (0 when empty), from segment names."""
    ranges = [parse_name(n, object_prefix, stream) for n in names]
    return max((r[1] for r in ranges if r is not None), default=0)

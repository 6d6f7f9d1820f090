"""docker-save archives assembled from registry blobs, with gzip layers spliced in verbatim.

The registry engine downloads an image's config and layer blobs into files; this module
turns them into the ``.tar.gz`` that ``docker load -i`` (and podman, skopeo's
docker-archive) reads: the legacy ``docker save`` tar (``<v1id>/layer.tar``,
``<config hex>.json``, ``manifest.json``, ``repositories``) compressed as a *multi-member*
gzip (RFC 1952 section 2.2). Concatenated members decompress to the concatenation of
their contents, so a gzip layer blob that is itself a clean sequence of members is copied
byte for byte as the compressed form of its ``layer.tar``: no inflate, no deflate, only a
copy and a hash. Small members carry the tar headers, padding and JSON files around it.
Layers that cannot be spliced (zstd, uncompressed tar, gzip with trailing bytes) are
decompressed and recompressed with ISA-L as their own members, so every ``layer.tar``
holds the uncompressed layer whose sha256 is the config's diff_id.

Errors: LayerFormatError (a PermanentFailure) for content no retry can fix; StorageError
for reading blobs or writing the archive (``disk full`` on ENOSPC).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard
from isal import igzip_threaded, isal_zlib

from actors.compression import atomic_output
from kernel.errors import InvalidInput, PermanentFailure, StorageError

GZIP_LAYER_TYPES: frozenset[str] = frozenset(
    {
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.oci.image.layer.v1.tar+gzip",
    }
)
ZSTD_LAYER_TYPES: frozenset[str] = frozenset({"application/vnd.oci.image.layer.v1.tar+zstd"})
TAR_LAYER_TYPES: frozenset[str] = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.docker.image.rootfs.diff.tar",
    }
)
LAYER_TYPES: frozenset[str] = GZIP_LAYER_TYPES | ZSTD_LAYER_TYPES | TAR_LAYER_TYPES

_READ_CHUNK = 4 * 1024 * 1024
# Most decompressed bytes produced per step: a 4 MiB gzip chunk could inflate to 4 GiB.
_INFLATE_CHUNK = 4 * 1024 * 1024
_BLOCK = 512
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_WBITS = 31  # zlib's "gzip wrapper" window bits
_ISAL_LEVELS = range(0, 4)

_IsalError: type[Exception] = isal_zlib.error  # type: ignore[assignment]

ProgressCallback = Callable[[int, int | None], None]


class LayerFormatError(PermanentFailure):
    """A layer blob cannot become its ``layer.tar``: unknown media type, corrupt or
    truncated compressed data, a diff_id that does not match, or an image config that
    does not describe the layers given."""


@dataclass(frozen=True, slots=True)
class LayerInfo:
    diff_id: str  # "sha256:<hex>" of the uncompressed layer tar
    tar_size: int  # length of the uncompressed layer tar
    spliceable: bool  # a gzip blob of complete members and nothing else: copy it verbatim


@dataclass(frozen=True, slots=True)
class ArchiveLayer:
    blob: Path
    media_type: str
    info: LayerInfo


@dataclass(frozen=True, slots=True)
class ArchiveResult:
    bytes_in: int  # length of the uncompressed docker-save tar the archive holds
    bytes_out: int  # archive file size
    sha256: str  # hex digest of the archive file
    seconds: float
    spliced_bytes: int  # archive bytes copied verbatim from layer blobs

    @property
    def throughput(self) -> float:
        """Input megabytes (10^6) per second."""
        return self.bytes_in / 1e6 / self.seconds if self.seconds > 0 else 0.0


# --- reading layer blobs ----------------------------------------------------------------


class _GzipMembers:
    """Inflates a stream of concatenated gzip members, noting whether anything else follows.

    Trailing bytes that do not start a gzip member (zero padding, garbage) end the stream,
    as ``gzip -d`` treats them; the layer is still good once recompressed, but ``trailing``
    records that the blob must not be spliced: inside the archive those bytes would sit
    between members, where readers (Go's among them) fail.
    """

    def __init__(self) -> None:
        self.members = 0
        self.trailing = False
        self._inflater: isal_zlib.Decompress | None = None
        self._boundary = b""  # bytes after a member end, too few yet to check the magic

    def feed(self, data: bytes) -> Iterator[bytes]:
        while not self.trailing:
            if self._inflater is None:
                data = self._boundary + data
                self._boundary = b""
                if len(data) < len(_GZIP_MAGIC):
                    self._boundary = data
                    return
                if not data.startswith(_GZIP_MAGIC):
                    self.trailing = True
                    return
                self._inflater = isal_zlib.decompressobj(wbits=_GZIP_WBITS)
            out = self._inflater.decompress(data, _INFLATE_CHUNK)
            if out:
                yield out
            if self._inflater.eof:
                self.members += 1
                data = self._inflater.unused_data
                self._inflater = None
                continue
            data = self._inflater.unconsumed_tail
            if not data and len(out) < _INFLATE_CHUNK:
                return  # input used up and nothing left buffered inside the inflater

    def finish(self, name: str) -> None:
        """Raises LayerFormatError when the input ended inside a member or held none."""
        if self._inflater is not None:
            raise LayerFormatError(f"gzip layer {name} is truncated")
        if self._boundary:
            self.trailing = True
        if self.members == 0:
            raise LayerFormatError(f"layer {name} is not gzip data")


_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE_MASK = 0xFFFFFFF0
_ZSTD_SKIPPABLE_MAGIC = 0x184D2A50


class _ZstdFrames:
    """Walks the zstd frame and block headers (no decoding) to see the stream end cleanly.

    python-zstandard's streaming reader returns short output instead of an error when the
    input stops inside a frame; this walk is what tells a truncated blob from a whole one.
    """

    def __init__(self) -> None:
        self.frames = 0
        self._state = "magic"
        self._need = 4  # header bytes the current state waits for
        self._buf = bytearray()
        self._skip = 0  # block or skippable-frame content still to pass over
        self._checksum = False

    def feed(self, data: bytes, name: str) -> None:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self._skip:
                step = min(self._skip, len(view) - pos)
                self._skip -= step
                pos += step
                continue
            take = min(self._need - len(self._buf), len(view) - pos)
            self._buf += view[pos : pos + take]
            pos += take
            if len(self._buf) == self._need:
                field = int.from_bytes(self._buf, "little")
                self._buf.clear()
                self._advance(field, name)

    def _advance(self, field: int, name: str) -> None:
        if self._state == "magic":
            if field == _ZSTD_MAGIC:
                self._state, self._need = "descriptor", 1
            elif field & _ZSTD_SKIPPABLE_MASK == _ZSTD_SKIPPABLE_MAGIC:
                self._state, self._need = "skippable", 4
            else:
                raise LayerFormatError(f"zstd layer {name} has bytes that start no zstd frame")
        elif self._state == "skippable":
            self._state, self._need, self._skip = "magic", 4, field
        elif self._state == "descriptor":
            if field & 0x08:
                raise LayerFormatError(f"zstd layer {name} has a reserved frame header bit set")
            single_segment = bool(field & 0x20)
            self._checksum = bool(field & 0x04)
            dictionary = (0, 1, 2, 4)[field & 0x03]
            content_size = (1 if single_segment else 0, 2, 4, 8)[field >> 6]
            rest = (0 if single_segment else 1) + dictionary + content_size
            self._state, self._need = "block", 3
            if rest:
                self._state, self._need = "header", rest
        elif self._state == "header":
            self._state, self._need = "block", 3
        elif self._state == "block":
            last, kind, size = field & 1, (field >> 1) & 3, field >> 3
            if kind == 3:
                raise LayerFormatError(f"zstd layer {name} has a reserved block type")
            self._skip = 1 if kind == 1 else size
            self._state, self._need = "block", 3
            if last:
                self._end_frame()
        elif self._state == "checksum":
            self._state, self._need = "magic", 4
            self.frames += 1

    def _end_frame(self) -> None:
        if self._checksum:
            self._state, self._need = "checksum", 4
        else:
            self._state, self._need = "magic", 4
            self.frames += 1

    def finish(self, name: str) -> None:
        """Raises LayerFormatError unless the input ended right after a complete frame."""
        if self._state != "magic" or self._buf or self._skip:
            raise LayerFormatError(f"zstd layer {name} is truncated")
        if self.frames == 0:
            raise LayerFormatError(f"layer {name} holds no zstd frame")


class _TappedReader:
    """A source for the zstd reader that shows every compressed chunk to a callback."""

    def __init__(self, source: BinaryIO, tap: Callable[[bytes], None]) -> None:
        self._source = source
        self._tap = tap

    def read(self, size: int = -1) -> bytes:
        chunk = self._source.read(size)
        if chunk:
            self._tap(chunk)
        return chunk


def _layer_tar_chunks(
    source: BinaryIO,
    media_type: str,
    name: str,
    on_read: Callable[[int], None],
    members: _GzipMembers,
) -> Iterator[bytes]:
    """The uncompressed layer tar of ``source`` in bounded chunks; ``members`` reports
    whether a gzip blob is spliceable once the iteration ends.

    Raises LayerFormatError for an unknown media type or corrupt data; OSError passes.
    """
    try:
        if media_type in GZIP_LAYER_TYPES:
            while chunk := source.read(_READ_CHUNK):
                on_read(len(chunk))
                yield from members.feed(chunk)
            members.finish(name)
        elif media_type in ZSTD_LAYER_TYPES:
            frames = _ZstdFrames()

            def tap(chunk: bytes) -> None:
                frames.feed(chunk, name)
                on_read(len(chunk))

            tapped = _TappedReader(source, tap)
            reader = zstandard.ZstdDecompressor().stream_reader(
                tapped,  # type: ignore[arg-type]
                read_size=_READ_CHUNK,
                read_across_frames=True,
            )
            while chunk := reader.read(_INFLATE_CHUNK):
                yield chunk
            while tapped.read(_READ_CHUNK):
                pass  # whatever the decoder left unread must still be whole frames
            frames.finish(name)
        elif media_type in TAR_LAYER_TYPES:
            while chunk := source.read(_READ_CHUNK):
                on_read(len(chunk))
                yield chunk
        else:
            raise LayerFormatError(f"unsupported layer media type {media_type!r} for {name}")
    except _IsalError as exc:
        raise LayerFormatError(f"corrupt gzip data in layer {name}: {exc}") from exc
    except zstandard.ZstdError as exc:
        raise LayerFormatError(f"corrupt zstd data in layer {name}: {exc}") from exc


def inspect_layer(
    blob: Path, media_type: str, progress: Callable[[int], None] | None = None
) -> LayerInfo:
    """Decompress ``blob`` once, streaming, to learn its diff_id and tar size; blocking.

    ``progress`` receives the compressed bytes consumed so far. A gzip blob whose members
    are followed by other bytes (zero padding, garbage) is accepted but not spliceable.

    Raises LayerFormatError for an unknown media type or corrupt/truncated data, and
    StorageError when the blob cannot be read.
    """
    if media_type not in LAYER_TYPES:
        raise LayerFormatError(f"unsupported layer media type {media_type!r} for {blob}")
    digest = hashlib.sha256()
    size = 0
    consumed = 0

    def on_read(n: int) -> None:
        nonlocal consumed
        consumed += n
        if progress is not None:
            progress(consumed)

    members = _GzipMembers()
    try:
        with blob.open("rb") as source:
            for chunk in _layer_tar_chunks(source, media_type, str(blob), on_read, members):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise StorageError(f"cannot read layer blob {blob}: {exc}") from exc
    return LayerInfo(
        diff_id=f"sha256:{digest.hexdigest()}",
        tar_size=size,
        spliceable=media_type in GZIP_LAYER_TYPES and not members.trailing,
    )


def check_diff_id(info: LayerInfo, expected: str) -> None:
    """Raises LayerFormatError naming both digests when the layer is not the one the
    image config lists (docker load would refuse the archive)."""
    if info.diff_id != expected:
        raise LayerFormatError(
            f"layer diff_id mismatch: image config expects {expected}, blob holds {info.diff_id}"
        )


# --- planning the tar -------------------------------------------------------------------


def _padding(size: int) -> bytes:
    return bytes(-size % _BLOCK)


def _header(name: str, size: int = 0, *, directory: bool = False) -> bytes:
    """A tar header; PAX so a layer.tar over 8 GiB keeps its exact size."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o755 if directory else 0o644
    if directory:
        info.type = tarfile.DIRTYPE
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def _file(name: str, data: bytes) -> bytes:
    return _header(name, len(data)) + data + _padding(len(data))


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _config_diff_ids(config: bytes) -> list[str]:
    try:
        parsed = json.loads(config)
        diff_ids = parsed["rootfs"]["diff_ids"]
    except (ValueError, TypeError, KeyError) as exc:
        raise LayerFormatError(f"image config has no rootfs.diff_ids: {exc}") from exc
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise LayerFormatError("image config rootfs.diff_ids is not a list of digests")
    return diff_ids


def _split_repo_tag(repo_tag: str) -> tuple[str, str]:
    """``host:5000/ns/name:tag`` -> (``host:5000/ns/name``, ``tag``).

    Raises InvalidInput when there is no tag (docker load refuses untagged RepoTags) or
    when the reference carries a digest.
    """
    colon = repo_tag.rfind(":")
    if colon <= repo_tag.rfind("/") or "@" in repo_tag:
        raise InvalidInput(f"repo tag {repo_tag!r} is not of the form repo:tag")
    repo, tag = repo_tag[:colon], repo_tag[colon + 1 :]
    if not repo or not tag:
        raise InvalidInput(f"repo tag {repo_tag!r} is not of the form repo:tag")
    return repo, tag


Piece = bytes | ArchiveLayer


def _plan(config: bytes, layers: Sequence[ArchiveLayer], repo_tags: Sequence[str]) -> list[Piece]:
    """The archive as a sequence of plain bytes and layer bodies, in tar order.

    Layers follow the config's diff_ids; each distinct diff_id is written once, in the
    directory of its first position, and every position references it. A v1 id is the
    sha256 of "<previous position's v1 id> <diff_id>", so equal chains give equal ids.

    Raises LayerFormatError when ``layers`` and the config's diff_ids disagree or a media
    type is unsupported; InvalidInput for a malformed repo tag.
    """
    diff_ids = _config_diff_ids(config)
    by_diff_id: dict[str, ArchiveLayer] = {}
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise LayerFormatError(
                f"unsupported layer media type {layer.media_type!r} for {layer.blob}"
            )
        by_diff_id.setdefault(layer.info.diff_id, layer)
    missing = [d for d in diff_ids if d not in by_diff_id]
    if missing:
        raise LayerFormatError(f"no layer blob given for diff_id(s) {', '.join(missing)}")
    extra = sorted(set(by_diff_id) - set(diff_ids))
    if extra:
        raise LayerFormatError(f"layer(s) {', '.join(extra)} are not in the image config")
    tags = [_split_repo_tag(t) for t in repo_tags]

    pieces: list[Piece] = []
    directories: dict[str, str] = {}
    layer_paths: list[str] = []
    parent = ""
    for diff_id in diff_ids:
        v1id = directories.get(diff_id)
        if v1id is None:
            v1id = hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()
            directories[diff_id] = v1id
            legacy: dict[str, str] = {"id": v1id}
            if parent:
                legacy["parent"] = parent
            layer = by_diff_id[diff_id]
            pieces.append(
                _header(v1id, directory=True)
                + _file(f"{v1id}/VERSION", b"1.0")
                + _file(f"{v1id}/json", _json(legacy))
                + _header(f"{v1id}/layer.tar", layer.info.tar_size)
            )
            pieces.append(layer)
            pieces.append(_padding(layer.info.tar_size))
        layer_paths.append(f"{v1id}/layer.tar")
        parent = v1id

    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    manifest = [
        {
            "Config": config_name,
            "RepoTags": list(repo_tags) or None,
            "Layers": layer_paths,
        }
    ]
    tail = _file(config_name, config) + _file("manifest.json", _json(manifest))
    if tags and parent:
        repositories: dict[str, dict[str, str]] = {}
        for repo, tag in tags:
            repositories.setdefault(repo, {})[tag] = parent
        tail += _file("repositories", _json(repositories))
    pieces.append(tail + bytes(2 * _BLOCK))
    return pieces


# --- writing ----------------------------------------------------------------------------


class _HashingSink:
    """The archive file: hashes and counts the compressed stream on its way to disk."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.digest.update(data)
        self.size += memoryview(data).nbytes
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()


class _ArchiveWriter:
    """Writes the planned pieces as gzip members: small members for plain bytes, blobs
    copied verbatim, recompressed members for layers that cannot be spliced."""

    def __init__(
        self,
        sink: _HashingSink,
        *,
        level: int,
        threads: int,
        total: int,
        progress: ProgressCallback | None,
    ) -> None:
        self._sink = sink
        self._level = level
        self._threads = threads
        self._total = total
        self._progress = progress
        self._pending = bytearray()
        self.done = 0
        self.spliced = 0

    def _report(self, done: int) -> None:
        if self._progress is not None:
            self._progress(done, self._total)

    def add(self, data: bytes) -> None:
        self._pending += data
        self.done += len(data)

    def end_member(self) -> None:
        if self._pending:
            self._sink.write(isal_zlib.compress(self._pending, self._level, wbits=_GZIP_WBITS))
            self._pending.clear()
            self._report(self.done)

    def layer(self, layer: ArchiveLayer) -> None:
        self.end_member()
        if layer.media_type in GZIP_LAYER_TYPES and layer.info.spliceable:
            self._splice(layer)
        else:
            self._recompress(layer)
        self._report(self.done)

    def _splice(self, layer: ArchiveLayer) -> None:
        """Copy the blob as it is; its bytes are already the gzip members of layer.tar.

        The blob must be the one inspected: a changed blob would not match the tar
        header's size, and only docker load's diff_id check would notice.
        """
        start, tar_size = self.done, layer.info.tar_size
        buffer = bytearray(_READ_CHUNK)
        view = memoryview(buffer)
        copied = 0
        with layer.blob.open("rb", buffering=0) as source:
            blob_size = os.fstat(source.fileno()).st_size
            while n := source.readinto(buffer):
                self._sink.write(view[:n])
                copied += n
                self._report(start + tar_size * copied // max(blob_size, 1))
        self.spliced += copied
        self.done = start + tar_size

    def _recompress(self, layer: ArchiveLayer) -> None:
        """Decompress the blob and deflate it with ISA-L as one member of its own.

        Raises LayerFormatError when the blob no longer decompresses to ``tar_size``
        bytes (it changed since it was inspected).
        """
        expected = layer.info.tar_size
        written = 0
        gz_open = igzip_threaded.open  # untyped in python-isal
        with (
            layer.blob.open("rb") as source,
            gz_open(  # type: ignore[no-untyped-call]
                self._sink, "wb", compresslevel=self._level, threads=self._threads
            ) as gz,
        ):
            chunks = _layer_tar_chunks(
                source, layer.media_type, str(layer.blob), _ignore, _GzipMembers()
            )
            for chunk in chunks:
                written += len(chunk)
                if written > expected:
                    break
                gz.write(chunk)
                self.done += len(chunk)
                self._report(self.done)
        if written != expected:
            found = "more" if written > expected else str(written)
            raise LayerFormatError(
                f"layer {layer.blob} changed since it was inspected: "
                f"expected {expected} uncompressed bytes, found {found}"
            )


def _ignore(_: int) -> None:
    pass


def write_archive(
    dest: Path,
    *,
    config: bytes,
    layers: Sequence[ArchiveLayer],
    repo_tags: Sequence[str],
    level: int = 1,
    threads: int = 2,
    progress: ProgressCallback | None = None,
) -> ArchiveResult:
    """Write the docker-loadable ``.tar.gz`` of an image to ``dest`` atomically; blocking.

    ``layers`` supplies one blob per distinct diff_id of the config (more entries with the
    same diff_id are allowed and ignored); ``layer.tar`` entries follow the config's
    ``rootfs.diff_ids``. ``level`` is an ISA-L level (0-3), ``threads`` the deflate threads
    for recompressed layers (at least 1 is used). ``progress(done, total)`` counts
    uncompressed archive bytes. The output is a function of the inputs, level and
    threads: headers carry mtime 0 and gzip members no timestamp.

    Raises LayerFormatError when the layers do not match the config or a blob is corrupt,
    InvalidInput for a repo tag that is not ``repo:tag``, ValueError for a level outside
    0-3, and StorageError when reading a blob or writing fails (``disk full`` on
    ENOSPC). On failure the ``.part`` file is removed and ``dest`` is left as it was.
    """
    if level not in _ISAL_LEVELS:
        raise ValueError(f"ISA-L compression level must be 0-3, not {level}")
    started = time.monotonic()
    pieces = _plan(config, layers, repo_tags)
    total = sum(len(p) if isinstance(p, bytes) else p.info.tar_size for p in pieces)
    with atomic_output(dest, "cannot write image archive") as raw:
        sink = _HashingSink(raw)
        writer = _ArchiveWriter(
            sink, level=level, threads=max(1, threads), total=total, progress=progress
        )
        for piece in pieces:
            if isinstance(piece, bytes):
                writer.add(piece)
            else:
                writer.layer(piece)
        writer.end_member()
    return ArchiveResult(
        bytes_in=writer.done,
        bytes_out=sink.size,
        sha256=sink.digest.hexdigest(),
        seconds=time.monotonic() - started,
        spliced_bytes=writer.spliced,
    )

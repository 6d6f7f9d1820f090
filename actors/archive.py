"""Image archives assembled from registry blobs, in each format of ``events.formats``.

The registry engine downloads images' config and layer blobs into files; this module
turns one or more images into one archive, writing a layer that several images share
once:

* ``docker-archive``: the legacy ``docker save`` tar (``<v1id>/layer.tar``,
  ``<config hex>.json``, ``manifest.json``, ``repositories``), layers uncompressed.
* ``oci-archive``: an OCI image layout in a tar (``oci-layout``, ``index.json`` naming
  each image by ``org.opencontainers.image.ref.name`` and ``io.containerd.image.name``,
  ``blobs/sha256/<hex>``) holding the registry's manifest, config and layer blobs byte
  for byte: nothing is decompressed or recompressed.
* ``docker-archive+gzip`` (the seed's ``.tar.gz``): the docker tar compressed as a
  *multi-member* gzip (RFC 1952 section 2.2). Concatenated members decompress to the
  concatenation of their contents, so a gzip layer blob that is itself a clean sequence of
  members is copied byte for byte as the compressed form of its ``layer.tar``: no
  inflate, no deflate, only a copy and a hash. Small members carry the tar headers,
  padding and JSON files around it. Layers that cannot be spliced (zstd, uncompressed
  tar, gzip with trailing bytes) are decompressed and recompressed with ISA-L as their
  own members.

In the docker layouts every ``layer.tar`` holds the uncompressed layer whose sha256 is
the config's diff_id.

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
from typing import Any, BinaryIO

import zstandard
from isal import igzip_threaded, isal_zlib

from actors.compression import atomic_output
from events.formats import ArchiveFormat
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
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"  # what skopeo and podman name an image by
CONTAINERD_NAME = "io.containerd.image.name"  # what ``ctr import`` names an image by

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
    digest: str = ""  # the blob's ``sha256:<hex>`` (an OCI layout names blobs by it)
    size: int = 0  # the blob's length


@dataclass(frozen=True, slots=True)
class ArchiveImage:
    """One image to put in an archive.

    ``layers`` are in manifest order; ``repo_tags`` (``repo:tag``) name it in a docker
    layout, ``ref_name`` in an OCI layout, where ``manifest`` (the registry's image
    manifest, verbatim) and its ``manifest_media_type`` are needed too.
    """

    config: bytes
    layers: Sequence[ArchiveLayer]
    repo_tags: Sequence[str] = ()
    ref_name: str = ""
    manifest: bytes = b""
    manifest_media_type: str = ""


@dataclass(frozen=True, slots=True)
class ArchiveResult:
    bytes_in: int  # length of the uncompressed docker-save tar the archive holds
    bytes_out: int  # archive file size
    sha256: str  # hex digest of the archive file
    seconds: float
    spliced_bytes: int  # archive bytes copied verbatim from layer blobs
    shared_bytes: int = 0  # layer bytes written once for several images (see _docker_plan)

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


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


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


@dataclass(frozen=True, slots=True)
class LayerPiece:
    """A layer's body in the tar: the uncompressed layer tar (docker layout), or the
    blob exactly as the registry serves it (``verbatim``: OCI layout)."""

    layer: ArchiveLayer
    verbatim: bool = False

    @property
    def size(self) -> int:
        return self.layer.size if self.verbatim else self.layer.info.tar_size


Piece = bytes | LayerPiece


@dataclass(frozen=True, slots=True)
class _Plan:
    pieces: list[Piece]
    shared_bytes: int  # layer bytes not written again because an earlier image had them


def _layers_by_diff_id(image: ArchiveImage) -> tuple[list[str], dict[str, ArchiveLayer]]:
    """The config's diff_ids and one given layer for each.

    Raises LayerFormatError when the layers and the config's diff_ids disagree or a
    media type is unsupported.
    """
    diff_ids = _config_diff_ids(image.config)
    by_diff_id: dict[str, ArchiveLayer] = {}
    for layer in image.layers:
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
    return diff_ids, by_diff_id


def _docker_plan(images: Sequence[ArchiveImage], fmt: ArchiveFormat) -> _Plan:
    """The ``docker save`` tar of ``images`` as plain bytes and layer bodies, in tar order.

    Layers follow each config's diff_ids; each distinct diff_id is written once, in the
    directory of its first position in the archive, and every position of every image
    references it. A v1 id is the sha256 of "<previous position's v1 id> <diff_id>", so
    equal chains give equal ids. Images with one config share one ``manifest.json``
    entry, their tags merged.

    Raises LayerFormatError when an image's layers and config disagree or a media type is
    unsupported; InvalidInput for a malformed repo tag.
    """
    pieces: list[Piece] = []
    directories: dict[str, str] = {}
    entries: dict[str, dict[str, Any]] = {}  # config file name -> manifest.json entry
    configs: list[bytes] = []
    repositories: dict[str, dict[str, str]] = {}
    shared = 0
    for image in images:
        diff_ids, by_diff_id = _layers_by_diff_id(image)
        tags = [_split_repo_tag(t) for t in image.repo_tags]
        layer_paths: list[str] = []
        parent = ""
        for diff_id in diff_ids:
            layer = by_diff_id[diff_id]
            v1id = directories.get(diff_id)
            if v1id is not None:
                shared += layer.info.tar_size if fmt is ArchiveFormat.DOCKER else layer.size
            else:
                v1id = hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()
                directories[diff_id] = v1id
                legacy: dict[str, str] = {"id": v1id}
                if parent:
                    legacy["parent"] = parent
                pieces.append(
                    _header(v1id, directory=True)
                    + _file(f"{v1id}/VERSION", b"1.0")
                    + _file(f"{v1id}/json", _json(legacy))
                    + _header(f"{v1id}/layer.tar", layer.info.tar_size)
                )
                pieces.append(LayerPiece(layer))
                pieces.append(_padding(layer.info.tar_size))
            layer_paths.append(f"{v1id}/layer.tar")
            parent = v1id
        config_name = f"{hashlib.sha256(image.config).hexdigest()}.json"
        entry = entries.get(config_name)
        if entry is None:
            configs.append(image.config)
            entry = entries[config_name] = {"Config": config_name, "RepoTags": None,
                                            "Layers": layer_paths}  # fmt: skip
        for repo_tag in image.repo_tags:
            if repo_tag not in (entry["RepoTags"] or []):
                entry["RepoTags"] = [*(entry["RepoTags"] or []), repo_tag]
        if parent:
            for repo, tag in tags:
                repositories.setdefault(repo, {})[tag] = parent
    tail = b"".join(_file(f"{hashlib.sha256(c).hexdigest()}.json", c) for c in configs)
    tail += _file("manifest.json", _json(list(entries.values())))
    if repositories:
        tail += _file("repositories", _json(repositories))
    pieces.append(tail + bytes(2 * _BLOCK))
    return _Plan(pieces, shared)


# Docker schema 2 media types and their OCI equivalents (same bytes, another name).
_OCI_TYPES = {
    DOCKER_MANIFEST: OCI_MANIFEST,
    "application/vnd.docker.container.image.v1+json": OCI_CONFIG,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": (
        "application/vnd.oci.image.layer.v1.tar+gzip"
    ),
    "application/vnd.docker.image.rootfs.diff.tar": "application/vnd.oci.image.layer.v1.tar",
}


def _oci_manifest(image: ArchiveImage) -> bytes:
    """The image's manifest as an OCI layout holds it: an OCI manifest as the registry
    served it, byte for byte; a Docker schema 2 manifest with its media types renamed to
    their OCI equivalents (the config and layer blobs are the same bytes, so the image ID
    stays; the manifest digest changes). containers/image (podman, skopeo) finds no image
    behind a Docker-typed entry of ``index.json``.

    Raises LayerFormatError when there is no manifest or it lists no config and layers.
    """
    if not image.manifest:
        raise LayerFormatError("an oci-archive needs the image's manifest from its registry")
    try:
        document = json.loads(image.manifest)
        media_type = document.get("mediaType") or image.manifest_media_type
        if media_type != DOCKER_MANIFEST:
            return image.manifest
        document["mediaType"] = OCI_MANIFEST
        for descriptor in [document["config"], *document["layers"]]:
            descriptor["mediaType"] = _OCI_TYPES.get(
                descriptor["mediaType"], descriptor["mediaType"]
            )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise LayerFormatError(f"image manifest lists no config and layers: {exc}") from exc
    return _json(document)


def _manifest_blobs(manifest: bytes, image: ArchiveImage) -> list[str]:
    """The blob digests ``manifest`` names (config first), checked against the config
    and layers given. Raises LayerFormatError when they disagree."""
    try:
        document = json.loads(manifest)
        config = document["config"]["digest"]
        layers = [layer["digest"] for layer in document["layers"]]
    except (ValueError, TypeError, KeyError) as exc:
        raise LayerFormatError(f"image manifest lists no config and layers: {exc}") from exc
    if config != _sha256(image.config):
        raise LayerFormatError(f"image manifest names config {config}, not the one given")
    given = [layer.digest for layer in image.layers]
    if layers != given:
        raise LayerFormatError(
            f"image manifest lists layers {', '.join(map(str, layers)) or '(none)'}, "
            f"not the ones given ({', '.join(given) or '(none)'})"
        )
    return [config, *layers]


def _oci_plan(images: Sequence[ArchiveImage]) -> _Plan:
    """The OCI image layout of ``images`` in tar order: ``oci-layout``, ``index.json``
    (one entry per image, named by its ``ref_name``), then every blob once under
    ``blobs/sha256/``: manifests, configs, and layer blobs verbatim.

    Raises LayerFormatError when an image's manifest, config and layers disagree.
    """
    index_entries: list[dict[str, Any]] = []
    blobs: list[Piece] = []
    written: set[str] = set()
    shared = 0
    for image in images:
        _layers_by_diff_id(image)
        manifest = _oci_manifest(image)
        _manifest_blobs(manifest, image)
        manifest_digest = _sha256(manifest)
        entry: dict[str, Any] = {
            "mediaType": OCI_MANIFEST,
            "digest": manifest_digest,
            "size": len(manifest),
        }
        if image.ref_name:
            name = image.ref_name
            if "@" in name and manifest != image.manifest:
                # pinned to the registry's digest, which the renamed manifest no longer
                # has: pinned to the one it has here (podman refuses a name that lies)
                name = f"{name.partition('@')[0]}@{manifest_digest}"
            entry["annotations"] = {REF_NAME: name, CONTAINERD_NAME: name}
        index_entries.append(entry)
        for digest, data in (
            (manifest_digest, manifest),
            (_sha256(image.config), image.config),
        ):
            if digest not in written:
                written.add(digest)
                blobs.append(_file(f"blobs/sha256/{digest.partition(':')[2]}", data))
        for layer in image.layers:
            if layer.digest in written:
                shared += layer.size
                continue
            written.add(layer.digest)
            blobs.append(_header(f"blobs/sha256/{layer.digest.partition(':')[2]}", layer.size))
            blobs.append(LayerPiece(layer, verbatim=True))
            blobs.append(_padding(layer.size))
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index_entries}
    head = (
        _file("oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
        + _file("index.json", _json(index))
        + _header("blobs", directory=True)
        + _header("blobs/sha256", directory=True)
    )
    return _Plan([head, *blobs, bytes(2 * _BLOCK)], shared)


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


class _Writer:
    """Writes the planned pieces to the sink as a plain tar: layer bodies decompressed
    (docker layout) or copied as they are (OCI layout). Counts uncompressed tar bytes."""

    def __init__(
        self, sink: _HashingSink, *, total: int, progress: ProgressCallback | None
    ) -> None:
        self._sink = sink
        self._total = total
        self._progress = progress
        self.done = 0
        self.spliced = 0

    def _report(self, done: int) -> None:
        if self._progress is not None:
            self._progress(done, self._total)

    def add(self, data: bytes) -> None:
        self._sink.write(data)
        self.done += len(data)
        self._report(self.done)

    def end(self) -> None:
        pass

    def layer(self, piece: LayerPiece) -> None:
        if piece.verbatim or piece.layer.media_type in TAR_LAYER_TYPES:
            self._copy(piece.layer.blob, piece.size, exact=True)
        else:
            for chunk in _checked_tar_chunks(piece.layer):
                self._sink.write(chunk)
                self.done += len(chunk)
                self._report(self.done)

    def _copy(self, blob: Path, body: int, *, exact: bool) -> None:
        """Copy ``blob`` as it is, as ``body`` bytes of the tar: its own length when
        ``exact`` (a verbatim or uncompressed layer; another length would corrupt the
        tar, so that is an error), the inflated length of a spliced gzip blob otherwise
        (there a changed blob would only be caught by docker load's diff_id check)."""
        start = self.done
        buffer = bytearray(_READ_CHUNK)
        view = memoryview(buffer)
        copied = 0
        with blob.open("rb", buffering=0) as source:
            blob_size = os.fstat(source.fileno()).st_size
            if exact and blob_size != body:
                raise LayerFormatError(
                    f"layer {blob} changed since it was inspected: "
                    f"expected {body} bytes, found {blob_size}"
                )
            while n := source.readinto(buffer):
                copied += n
                if exact and copied > body:
                    break
                self._sink.write(view[:n])
                self._report(start + body * copied // max(blob_size, 1))
        if exact and copied != body:
            raise LayerFormatError(
                f"layer {blob} changed since it was inspected: "
                f"expected {body} bytes, found {'more' if copied > body else copied}"
            )
        self.spliced += copied
        self.done = start + body


class _GzipWriter(_Writer):
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
        super().__init__(sink, total=total, progress=progress)
        self._level = level
        self._threads = threads
        self._pending = bytearray()

    def add(self, data: bytes) -> None:
        self._pending += data
        self.done += len(data)

    def end(self) -> None:
        if self._pending:
            self._sink.write(isal_zlib.compress(self._pending, self._level, wbits=_GZIP_WBITS))
            self._pending.clear()
            self._report(self.done)

    def layer(self, piece: LayerPiece) -> None:
        self.end()
        layer = piece.layer
        if layer.media_type in GZIP_LAYER_TYPES and layer.info.spliceable:
            # its bytes are already the gzip members of layer.tar
            self._copy(layer.blob, layer.info.tar_size, exact=False)
        else:
            self._recompress(layer)
        self._report(self.done)

    def _recompress(self, layer: ArchiveLayer) -> None:
        """Decompress the blob and deflate it with ISA-L as one member of its own."""
        gz_open = igzip_threaded.open  # untyped in python-isal
        with gz_open(  # type: ignore[no-untyped-call]
            self._sink, "wb", compresslevel=self._level, threads=self._threads
        ) as gz:
            for chunk in _checked_tar_chunks(layer):
                gz.write(chunk)
                self.done += len(chunk)
                self._report(self.done)


def _checked_tar_chunks(layer: ArchiveLayer) -> Iterator[bytes]:
    """The blob's uncompressed layer tar, in bounded chunks.

    Raises LayerFormatError when the blob no longer decompresses to ``tar_size`` bytes
    (it changed since it was inspected) or is corrupt.
    """
    expected = layer.info.tar_size
    written = 0
    with layer.blob.open("rb") as source:
        chunks = _layer_tar_chunks(
            source, layer.media_type, str(layer.blob), _ignore, _GzipMembers()
        )
        for chunk in chunks:
            written += len(chunk)
            if written > expected:
                break
            yield chunk
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
    images: Sequence[ArchiveImage],
    *,
    fmt: ArchiveFormat = ArchiveFormat.DOCKER_GZIP,
    level: int = 1,
    threads: int = 2,
    progress: ProgressCallback | None = None,
) -> ArchiveResult:
    """Write the archive of ``images`` in format ``fmt`` to ``dest`` atomically; blocking.

    Each image supplies one blob per distinct diff_id of its config (more entries with
    the same diff_id are allowed and ignored); ``layer.tar`` entries follow the config's
    ``rootfs.diff_ids``. A layer several images share is written once. ``oci-archive``
    needs each image's registry manifest (``manifest``), whose blobs it stores verbatim.
    ``level`` is an ISA-L level (0-3) and ``threads`` the deflate threads (at least 1)
    for recompressed layers (``docker-archive+gzip`` only). ``progress(done, total)``
    counts uncompressed archive bytes. The output is a function of the inputs, format,
    level and threads: headers carry mtime 0 and gzip members no timestamp.

    Raises LayerFormatError when the layers do not match a config (or manifest) or a
    blob is corrupt, InvalidInput for a repo tag that is not ``repo:tag``, ValueError for
    no images or a level outside 0-3, and StorageError when reading a blob or writing
    fails (``disk full`` on ENOSPC). On failure the ``.part`` file is removed and
    ``dest`` is left as it was.
    """
    if level not in _ISAL_LEVELS:
        raise ValueError(f"ISA-L compression level must be 0-3, not {level}")
    if not images:
        raise ValueError("an archive needs at least one image")
    started = time.monotonic()
    plan = _docker_plan(images, fmt) if fmt.docker_layout else _oci_plan(images)
    total = sum(len(p) if isinstance(p, bytes) else p.size for p in plan.pieces)
    with atomic_output(dest, "cannot write image archive") as raw:
        sink = _HashingSink(raw)
        writer = (
            _GzipWriter(sink, level=level, threads=max(1, threads), total=total, progress=progress)
            if fmt is ArchiveFormat.DOCKER_GZIP
            else _Writer(sink, total=total, progress=progress)
        )
        for piece in plan.pieces:
            if isinstance(piece, bytes):
                writer.add(piece)
            else:
                writer.layer(piece)
        writer.end()
    return ArchiveResult(
        bytes_in=writer.done,
        bytes_out=sink.size,
        sha256=sink.digest.hexdigest(),
        seconds=time.monotonic() - started,
        spliced_bytes=writer.spliced,
        shared_bytes=plan.shared_bytes,
    )

"""Build images in Python and push them over the registry HTTP API (no ``docker build``).

``tests.servers.images`` builds through the real engine, which can only make Docker
v2 schema 2 manifests with gzip layers. The helpers here write the bytes themselves, so
tests get every shape a registry can hold: OCI or Docker media types, gzip, zstd or
uncompressed layers, multi-platform indexes and manifest lists, and arbitrary manifest
bodies (``put_raw_manifest``).

Layer tars are deterministic: sorted entries, parent directories included, fixed
mtime, owner ``0:0`` and modes, PAX format. A file's content is literal ``bytes``, an
``int`` (that many bytes of the same *mixed* data ``images.write_mixed`` writes, seeded
by the path inside the layer), a ``Path`` of a real file to copy, or any ``Generated``
object (a size and a chunk iterator). Big layers stream: ``write_layer_tar`` and
``write_layer_blob`` never hold a layer in memory, and ``push_blob`` uploads a file in
``PATCH`` chunks.

The config digest is the image ID ``docker pull``/``docker load`` report. Gzip is
zlib level 6 (what ``docker push`` writes, near enough: Go's ``compress/gzip`` default)
with a zero mtime, so the same layer always gives the same blob.

Registries with auth: ``auth_headers`` does the token dance by hand (``GET /v2/``, the
``WWW-Authenticate`` challenge, the token realm) and returns headers to pass as
``headers=`` to every push and fetch. Errors: ``RegistryError`` for an unexpected HTTP
status, ``ValueError`` for a bad argument.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import random
import re
import tarfile
import tempfile
import urllib.parse
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol, runtime_checkable

import zstandard

MIB = 1 << 20
MIXED_CHUNK = MIB
"""``images.write_mixed`` generates its content in 1 MiB chunks; so must ``mixed_chunks``."""
UPLOAD_CHUNK = 32 * MIB
MTIME = 946_684_800
"""2000-01-01T00:00:00Z: every entry of every layer tar, and the config's ``created``."""
CREATED = "2000-01-01T00:00:00Z"
GZIP_LEVEL = 6
ZSTD_LEVEL = 3

Media = Literal["docker", "oci"]
Compression = Literal["gzip", "zstd", "none"]
Platform = tuple[str, ...]
"""``(os, architecture)`` or ``(os, architecture, variant)``."""

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
"""An ``Accept`` header value that takes every manifest kind these helpers push."""

LAYER_MEDIA_TYPES: Mapping[tuple[str, str], str] = {
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    # Not in the Docker spec, but containerd and the engine know it.
    ("docker", "none"): "application/vnd.docker.image.rootfs.diff.tar",
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("oci", "none"): "application/vnd.oci.image.layer.v1.tar",
}


class RegistryError(RuntimeError):
    """The registry answered an unexpected HTTP status; keeps the status and body."""

    def __init__(self, method: str, url: str, status: int, body: bytes) -> None:
        super().__init__(f"{method} {url}: HTTP {status}: {body[:2000].decode(errors='replace')}")
        self.method = method
        self.url = url
        self.status = status
        self.body = body


@runtime_checkable
class Generated(Protocol):
    """File content produced on demand: exactly ``size`` bytes from ``chunks()``."""

    @property
    def size(self) -> int: ...

    def chunks(self) -> Iterator[bytes]: ...


FileContent = bytes | int | Path | Generated
LayerFiles = Mapping[str, FileContent]
"""Path inside the layer -> content (see the module docstring)."""


# --- layer tars -----------------------------------------------------------------------


def mixed_chunks(size: int, name: str) -> Iterator[bytes]:
    """The bytes ``images.write_mixed(path, size, name=name)`` writes, 1 MiB at a time:
    each chunk half repetitive text lines, half seeded random bytes."""
    seed = zlib.crc32(f"{name}:{size}".encode())
    rng = random.Random(seed)
    line_count = MIXED_CHUNK // 2 // 64 + 1
    text = "".join(
        f"{n:08d} INFO dcu.fixture seed={seed:010d} the quick brown fox jumps\n"
        for n in range(line_count)
    ).encode()
    remaining = size
    while remaining > 0:
        length = min(MIXED_CHUNK, remaining)
        half = length // 2
        yield text[:half] + rng.randbytes(length - half)
        remaining -= length


def mixed_bytes(size: int, name: str) -> bytes:
    return b"".join(mixed_chunks(size, name))


def _checked_path(relative: str) -> PurePosixPath:
    path = PurePosixPath(relative)
    if path.is_absolute() or not path.parts or ".." in path.parts:
        raise ValueError(f"layer paths must be relative and stay inside the layer: {relative!r}")
    return path


def _content_size(content: FileContent) -> int:
    if isinstance(content, bytes):
        return len(content)
    if isinstance(content, int):
        if content < 0:
            raise ValueError(f"negative file size {content}")
        return content
    if isinstance(content, Path):
        return content.stat().st_size
    return int(content.size)


def _content_chunks(content: FileContent, name: str) -> Iterator[bytes]:
    if isinstance(content, bytes):
        yield content
    elif isinstance(content, int):
        yield from mixed_chunks(content, name)
    elif isinstance(content, Path):
        with content.open("rb") as handle:
            while chunk := handle.read(4 * MIB):
                yield chunk
    else:
        yield from content.chunks()


def _tar_header(name: str, *, directory: bool, size: int = 0) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.size = size
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def tar_chunks(files: LayerFiles) -> Iterator[bytes]:
    """The layer tar of ``files``, streamed: parents first, entries sorted by path.

    Raises ValueError for a path that is absolute, contains ``..``, or appears twice,
    and when a ``Path`` or ``Generated`` content yields a different size than it claims.
    """
    entries: dict[tuple[str, ...], FileContent | None] = {}
    for relative, content in files.items():
        path = _checked_path(relative)
        if path.parts in entries:
            raise ValueError(f"{relative!r} appears twice in the layer")
        for depth in range(1, len(path.parts)):
            parent = path.parts[:depth]
            if entries.get(parent, None) is not None:
                raise ValueError(f"{'/'.join(parent)!r} is both a file and a directory")
            entries[parent] = None
        entries[path.parts] = content
    offset = 0
    for parts in sorted(entries):
        name = "/".join(parts)
        entry = entries[parts]
        if entry is None:
            header = _tar_header(name, directory=True)
            offset += len(header)
            yield header
            continue
        size = _content_size(entry)
        header = _tar_header(name, directory=False, size=size)
        offset += len(header)
        yield header
        written = 0
        for chunk in _content_chunks(entry, name):
            written += len(chunk)
            yield chunk
        if written != size:
            raise ValueError(f"{name}: content gave {written} bytes, expected {size}")
        padding = -size % tarfile.BLOCKSIZE
        offset += size + padding
        yield tarfile.NUL * padding
    # End of archive as tarfile writes it: two zero blocks, padded to a full record.
    offset += 2 * tarfile.BLOCKSIZE
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE + -offset % tarfile.RECORDSIZE)


def layer_tar(files: LayerFiles) -> bytes:
    """The deterministic layer tar of ``files``, in memory (keep layers small)."""
    return b"".join(tar_chunks(files))


def write_layer_tar(dest: Path, files: LayerFiles) -> str:
    """Stream the layer tar of ``files`` to ``dest``; returns its digest (the diff ID)."""
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        for chunk in tar_chunks(files):
            digest.update(chunk)
            out.write(chunk)
    return f"sha256:{digest.hexdigest()}"


# --- layer blobs ----------------------------------------------------------------------


class _Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes, /) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


def _compressor(compression: str, gzip_level: int) -> _Compressor:
    if compression == "gzip":
        # wbits 31: a gzip member with mtime 0 and no name, so output is reproducible.
        return zlib.compressobj(gzip_level, zlib.DEFLATED, 31)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    if compression == "none":
        return _Identity()
    raise ValueError(f"unknown compression {compression!r}: gzip, zstd or none")


@dataclass(frozen=True)
class LayerBlob:
    """A compressed (or not) layer, in memory (``data``) or in a file (``path``)."""

    compression: str
    diff_id: str
    """``sha256:`` of the uncompressed tar: what the config's ``rootfs.diff_ids`` lists."""
    digest: str
    """``sha256:`` of the blob as stored in the registry."""
    size: int
    data: bytes | None = field(default=None, repr=False)
    path: Path | None = None

    def media_type(self, media: Media) -> str:
        return layer_media_type(media, self.compression)


def layer_media_type(media: Media, compression: str) -> str:
    try:
        return LAYER_MEDIA_TYPES[(media, compression)]
    except KeyError:
        raise ValueError(f"no {media} layer media type for {compression!r} layers") from None


def _tar_source(tar: bytes | Path | Iterable[bytes] | LayerFiles) -> Iterable[bytes]:
    if isinstance(tar, bytes):
        return (tar,)
    if isinstance(tar, Path):
        return _content_chunks(tar, str(tar))
    if isinstance(tar, Mapping):
        return tar_chunks(tar)
    return tar


def _encode(
    source: Iterable[bytes], compression: str, gzip_level: int, out: Any
) -> tuple[str, str, int]:
    compressor = _compressor(compression, gzip_level)
    diff_id = hashlib.sha256()
    digest = hashlib.sha256()
    size = 0
    for chunk in source:
        diff_id.update(chunk)
        piece = compressor.compress(chunk)
        if piece:
            digest.update(piece)
            out.write(piece)
            size += len(piece)
    tail = compressor.flush()
    digest.update(tail)
    out.write(tail)
    size += len(tail)
    return f"sha256:{diff_id.hexdigest()}", f"sha256:{digest.hexdigest()}", size


def layer_blob(
    tar: bytes | Iterable[bytes] | LayerFiles,
    compression: str = "gzip",
    *,
    gzip_level: int = GZIP_LEVEL,
) -> LayerBlob:
    """Compress an uncompressed layer tar (or the files of one) in memory."""
    buffer = io.BytesIO()
    diff_id, digest, size = _encode(_tar_source(tar), compression, gzip_level, buffer)
    return LayerBlob(compression, diff_id, digest, size, data=buffer.getvalue())


def write_layer_blob(
    dest: Path,
    tar: Path | Iterable[bytes] | LayerFiles,
    compression: str = "gzip",
    *,
    gzip_level: int = GZIP_LEVEL,
) -> LayerBlob:
    """Stream a layer tar (a file, chunks, or the files of one) compressed into ``dest``.

    Nothing is held in memory beyond a few MiB, so layers of any size work; the zlib and
    zstd compressors release the GIL, so several layers compress in parallel threads.
    """
    with dest.open("wb") as out:
        diff_id, digest, size = _encode(_tar_source(tar), compression, gzip_level, out)
    return LayerBlob(compression, diff_id, digest, size, path=dest)


# --- registry HTTP --------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryResponse:
    status: int
    headers: Mapping[str, str]
    """Header names lower-cased."""
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> RegistryResponse:
    """One HTTP request on a fresh connection (no proxy: test servers are on loopback)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(parts.hostname, parts.port, timeout=timeout)
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    try:
        sent = dict(headers or {})
        if body is not None or method in {"PUT", "POST", "PATCH"}:
            sent.setdefault("Content-Length", str(len(body or b"")))
        connection.request(method, target, body=body, headers=sent)
        response = connection.getresponse()
        data = response.read()
        received = {name.lower(): value for name, value in response.getheaders()}
        return RegistryResponse(response.status, received, data)
    finally:
        connection.close()


def _expect(
    response: RegistryResponse, method: str, url: str, statuses: Iterable[int]
) -> RegistryResponse:
    if response.status not in set(statuses):
        raise RegistryError(method, url, response.status, response.body)
    return response


def _location(registry_url: str, response: RegistryResponse) -> str:
    location = response.headers.get("location")
    if not location:
        raise RegistryError("POST", registry_url, response.status, b"upload without Location")
    return urllib.parse.urljoin(registry_url + "/", location)


def _with_query(url: str, **params: str) -> str:
    separator = "&" if urllib.parse.urlsplit(url).query else "?"
    return url + separator + urllib.parse.urlencode(params)


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="..."`` -> ``("bearer", {"realm": ..., ...})``."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM.findall(rest))


def auth_headers(
    registry_url: str,
    repo: str | None = None,
    actions: Sequence[str] = ("pull",),
    *,
    username: str | None = None,
    password: str | None = None,
    scope: str | None = None,
) -> dict[str, str]:
    """Headers that authorise requests for ``repo`` (the token dance, done by hand).

    ``GET /v2/`` answering 200 means no auth: ``{}``. A ``Basic`` challenge gives a Basic
    header (credentials required). A ``Bearer`` challenge: ``GET <realm>?service=...&
    scope=repository:<repo>:<actions>`` (Basic credentials if given) and the returned
    token. ``scope`` overrides the repository scope (e.g. ``registry:catalog:*``).
    Raises RegistryError when the token server refuses, ValueError for an unknown scheme.
    """
    probe = request("GET", f"{registry_url}/v2/")
    if probe.status == 200:
        return {}
    _expect(probe, "GET", f"{registry_url}/v2/", [401])
    scheme, params = parse_challenge(probe.headers.get("www-authenticate", ""))
    basic = None
    if username is not None:
        basic = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
    if scheme == "basic":
        if basic is None:
            raise ValueError(f"{registry_url} wants Basic credentials")
        return {"Authorization": f"Basic {basic}"}
    if scheme != "bearer" or "realm" not in params:
        raise ValueError(f"unsupported challenge from {registry_url}: {probe.headers}")
    query: dict[str, str] = {}
    if "service" in params:
        query["service"] = params["service"]
    if scope is None and repo is not None:
        scope = f"repository:{repo}:{','.join(actions)}"
    if scope is not None:
        query["scope"] = scope
    token_url = _with_query(params["realm"], **query)
    answer = _expect(
        request("GET", token_url, headers={"Authorization": f"Basic {basic}"} if basic else None),
        "GET",
        token_url,
        [200],
    ).json()
    token = answer.get("token") or answer.get("access_token")
    if not token:
        raise RegistryError("GET", token_url, 200, b"no token in the answer")
    return {"Authorization": f"Bearer {token}"}


def blob_exists(
    registry_url: str, repo: str, digest: str, headers: Mapping[str, str] | None = None
) -> bool:
    url = f"{registry_url}/v2/{repo}/blobs/{digest}"
    return _expect(request("HEAD", url, headers=headers), "HEAD", url, [200, 404]).status == 200


def push_blob(
    registry_url: str,
    repo: str,
    data: bytes | Path | LayerBlob,
    headers: Mapping[str, str] | None = None,
    *,
    digest: str | None = None,
    chunk_size: int = UPLOAD_CHUNK,
) -> str:
    """Upload a blob unless the repository has it; returns its digest.

    ``bytes``: one monolithic ``PUT``. A file: ``PATCH`` chunks of ``chunk_size``,
    hashed on the way, then ``PUT ?digest=``. Raises RegistryError on any refusal
    (including a digest the registry computes differently).
    """
    if isinstance(data, LayerBlob):
        digest = data.digest
        payload: bytes | Path = data.data if data.data is not None else _blob_path(data)
    else:
        payload = data
    if isinstance(payload, bytes) and digest is None:
        digest = f"sha256:{hashlib.sha256(payload).hexdigest()}"
    if digest is not None and blob_exists(registry_url, repo, digest, headers):
        return digest
    start_url = f"{registry_url}/v2/{repo}/blobs/uploads/"
    started = _expect(request("POST", start_url, headers=headers), "POST", start_url, [202])
    location = _location(registry_url, started)
    if isinstance(payload, bytes):
        assert digest is not None
        put_url = _with_query(location, digest=digest)
        sent = {**(headers or {}), "Content-Type": "application/octet-stream"}
        _expect(request("PUT", put_url, body=payload, headers=sent), "PUT", put_url, [201])
        return digest
    hasher = hashlib.sha256()
    offset = 0
    with payload.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            hasher.update(chunk)
            sent = {
                **(headers or {}),
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
            }
            patched = request("PATCH", location, body=chunk, headers=sent)
            location = _location(registry_url, _expect(patched, "PATCH", location, [202]))
            offset += len(chunk)
    computed = f"sha256:{hasher.hexdigest()}"
    if digest is not None and digest != computed:
        raise ValueError(f"{payload} has digest {computed}, not {digest}")
    put_url = _with_query(location, digest=computed)
    _expect(request("PUT", put_url, headers=headers), "PUT", put_url, [201])
    return computed


def _blob_path(blob: LayerBlob) -> Path:
    if blob.path is None:
        raise ValueError("a LayerBlob needs data or a path")
    return blob.path


def put_raw_manifest(
    registry_url: str,
    repo: str,
    reference: str,
    body: bytes,
    media_type: str,
    headers: Mapping[str, str] | None = None,
) -> RegistryResponse:
    """``PUT`` any manifest body with any media type; returns the answer, never raises
    for a refusal (tests assert on what the registry accepts)."""
    url = f"{registry_url}/v2/{repo}/manifests/{reference}"
    return request("PUT", url, body=body, headers={**(headers or {}), "Content-Type": media_type})


def push_manifest(
    registry_url: str,
    repo: str,
    reference: str,
    body: bytes,
    media_type: str,
    headers: Mapping[str, str] | None = None,
) -> str:
    """``PUT`` a manifest at a tag or digest; returns its digest. Raises RegistryError
    when refused or when the registry reports a digest other than sha256 of ``body``."""
    digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
    response = put_raw_manifest(registry_url, repo, reference, body, media_type, headers)
    url = f"{registry_url}/v2/{repo}/manifests/{reference}"
    _expect(response, "PUT", url, [201])
    reported = response.headers.get("docker-content-digest", digest)
    if reported != digest:
        raise RegistryError("PUT", url, response.status, f"digest {reported}".encode())
    return digest


def fetch_manifest(
    registry_url: str,
    repo: str,
    reference: str,
    headers: Mapping[str, str] | None = None,
    *,
    accept: Sequence[str] = MANIFEST_MEDIA_TYPES,
) -> RegistryResponse:
    """``GET`` a manifest; returns the answer whatever its status."""
    url = f"{registry_url}/v2/{repo}/manifests/{reference}"
    return request("GET", url, headers={**(headers or {}), "Accept": ", ".join(accept)})


def fetch_blob(
    registry_url: str, repo: str, digest: str, headers: Mapping[str, str] | None = None
) -> bytes:
    """A (small) blob's bytes; raises RegistryError unless 200 (redirects not followed)."""
    url = f"{registry_url}/v2/{repo}/blobs/{digest}"
    return _expect(request("GET", url, headers=headers), "GET", url, [200]).body


# --- images and indexes ---------------------------------------------------------------


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def platform_object(platform: Platform) -> dict[str, str]:
    if len(platform) not in {2, 3} or not all(platform[:2]):
        raise ValueError(f"a platform is (os, architecture[, variant]), not {platform!r}")
    found = {"os": platform[0], "architecture": platform[1]}
    if len(platform) == 3 and platform[2]:
        found["variant"] = platform[2]
    return found


def image_config(diff_ids: Sequence[str], platform: Platform) -> bytes:
    """The canonical config JSON: its sha256 is the image ID."""
    document: dict[str, Any] = {
        **platform_object(platform),
        "created": CREATED,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [
            {"created": CREATED, "created_by": f"dcu tests: layer {index}"}
            for index in range(len(diff_ids))
        ],
    }
    return _canonical(document)


@dataclass(frozen=True)
class PushedOciImage:
    """An image pushed by ``push_image``: everything a test can check a pull against."""

    registry: str
    """``127.0.0.1:PORT``"""
    repo: str
    tag: str | None
    media: Media
    platform: Platform
    manifest_digest: str
    manifest_media_type: str
    manifest: bytes
    config: bytes
    image_id: str
    """``sha256:`` of ``config``: what ``docker pull``/``docker load`` report as the ID."""
    diff_ids: tuple[str, ...]
    layer_digests: tuple[str, ...]
    layer_sizes: tuple[int, ...]
    layer_media_types: tuple[str, ...]

    @property
    def reference(self) -> str:
        """``127.0.0.1:PORT/repo:tag`` (the digest reference when pushed without a tag)."""
        if self.tag is None:
            return self.digest_reference
        return f"{self.registry}/{self.repo}:{self.tag}"

    @property
    def digest_reference(self) -> str:
        return f"{self.registry}/{self.repo}@{self.manifest_digest}"

    @property
    def manifest_size(self) -> int:
        return len(self.manifest)

    @property
    def blob_bytes(self) -> int:
        """Bytes of all layer blobs (what a pull transfers, besides config and manifest)."""
        return sum(self.layer_sizes)


def _address(registry_url: str) -> str:
    return urllib.parse.urlsplit(registry_url).netloc


def push_image(
    registry_url: str,
    repo: str,
    tag: str | None,
    layers: Sequence[bytes | Path | LayerBlob],
    *,
    compression: str | Sequence[str] = "gzip",
    media: Media = "docker",
    platform: Platform = ("linux", "amd64"),
    headers: Mapping[str, str] | None = None,
    gzip_level: int = GZIP_LEVEL,
) -> PushedOciImage:
    """Push an image of ``layers`` (uncompressed tar bytes or tar files, or prepared
    ``LayerBlob``s) and tag it; ``tag=None`` pushes it by digest only.

    ``compression`` is one value for every layer or one per layer; it is ignored for
    ``LayerBlob`` layers (already compressed). Tar files are compressed into a
    temporary directory that is deleted after the push. Raises RegistryError,
    ValueError (e.g. zstd with Docker media types).
    """
    if not layers:
        raise ValueError("an image needs at least one layer")
    if media not in {"docker", "oci"}:
        raise ValueError(f"media is 'docker' or 'oci', not {media!r}")
    per_layer = [compression] * len(layers) if isinstance(compression, str) else list(compression)
    if len(per_layer) != len(layers):
        raise ValueError(f"{len(per_layer)} compressions for {len(layers)} layers")
    with tempfile.TemporaryDirectory(prefix="dcu-oci-") as scratch:
        blobs: list[LayerBlob] = []
        for index, (layer, method) in enumerate(zip(layers, per_layer, strict=True)):
            if isinstance(layer, LayerBlob):
                blobs.append(layer)
            elif isinstance(layer, bytes):
                blobs.append(layer_blob(layer, method, gzip_level=gzip_level))
            else:
                dest = Path(scratch) / f"layer{index}.blob"
                blobs.append(write_layer_blob(dest, layer, method, gzip_level=gzip_level))
        media_types = [blob.media_type(media) for blob in blobs]
        for blob in blobs:
            push_blob(registry_url, repo, blob, headers)
        config = image_config([blob.diff_id for blob in blobs], platform)
        config_digest = push_blob(registry_url, repo, config, headers)
        manifest_type = DOCKER_MANIFEST if media == "docker" else OCI_MANIFEST
        document = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {
                "mediaType": DOCKER_CONFIG if media == "docker" else OCI_CONFIG,
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {"mediaType": media_type, "digest": blob.digest, "size": blob.size}
                for blob, media_type in zip(blobs, media_types, strict=True)
            ],
        }
        manifest = json.dumps(document, indent=3).encode()
        reference = tag if tag is not None else f"sha256:{hashlib.sha256(manifest).hexdigest()}"
        digest = push_manifest(registry_url, repo, reference, manifest, manifest_type, headers)
    return PushedOciImage(
        registry=_address(registry_url),
        repo=repo,
        tag=tag,
        media=media,
        platform=tuple(platform),
        manifest_digest=digest,
        manifest_media_type=manifest_type,
        manifest=manifest,
        config=config,
        image_id=config_digest,
        diff_ids=tuple(blob.diff_id for blob in blobs),
        layer_digests=tuple(blob.digest for blob in blobs),
        layer_sizes=tuple(blob.size for blob in blobs),
        layer_media_types=tuple(media_types),
    )


def index_body(
    entries: Sequence[tuple[PushedOciImage, Platform]], media: Media = "oci"
) -> tuple[bytes, str]:
    """The bytes and media type of an OCI index / Docker manifest list over ``entries``."""
    media_type = OCI_INDEX if media == "oci" else DOCKER_MANIFEST_LIST
    document = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            {
                "mediaType": image.manifest_media_type,
                "digest": image.manifest_digest,
                "size": image.manifest_size,
                "platform": platform_object(platform),
            }
            for image, platform in entries
        ],
    }
    return json.dumps(document, indent=3).encode(), media_type


def push_index(
    registry_url: str,
    repo: str,
    tag: str,
    entries: Sequence[tuple[PushedOciImage, Platform]],
    *,
    media: Media = "oci",
    headers: Mapping[str, str] | None = None,
) -> str:
    """Push a multi-platform index (``oci``) or manifest list (``docker``) over images
    already pushed to ``repo``; returns its digest. Raises RegistryError."""
    if not entries:
        raise ValueError("an index needs at least one entry")
    for image, _ in entries:
        if image.repo != repo:
            raise ValueError(f"{image.digest_reference} is not in repository {repo}")
    body, media_type = index_body(entries, media)
    return push_manifest(registry_url, repo, tag, body, media_type, headers)

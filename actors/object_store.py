"""Object storage edge: the S3 API through miniopy-async, or a local directory.

Both stores keep to the plain S3 object model (bucket, key, size, mtime, user metadata), so
MinIO, Ceph RGW, AWS S3 and moto all work, and the local store is a drop-in for running
DCU without an S3 server. Every failure becomes ``StorageError`` naming the endpoint
(never the keys). With ``minio.use_ssl`` the server's certificate is checked against the
system's trust store, or against ``minio.ca_file`` alone when that is set.

Uploads to S3 are multipart uploads driven here rather than by miniopy's ``fput_object``,
which reads every part of a file into memory before its uploads (bounded only in number
of connections) drain them: a reader hands parts one at a time to ``minio.parallel_parts``
uploaders, so an upload holds at most ``parallel_parts + 2`` parts (those being sent, one
waiting, one being read) whatever the file's size.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from stat import S_ISREG
from typing import Any, BinaryIO, Protocol

import aiohttp
from miniopy_async.api import Minio
from miniopy_async.commonconfig import REPLACE, CopySource
from miniopy_async.datatypes import Object, Part
from miniopy_async.error import MinioException, S3Error
from miniopy_async.helpers import DictType, genheaders

from events.naming import inside
from kernel.errors import StorageError
from kernel.settings import MinioSettings

log = logging.getLogger(__name__)

# Aborting a failed multipart upload: attempts, and seconds between them (times the attempt).
ABORT_ATTEMPTS = 3
ABORT_BACKOFF = 0.5

ProgressCallback = Callable[[int, int | None], None]


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    name: str
    size: int
    last_modified: datetime
    metadata: dict[str, str] = field(default_factory=dict)


class ObjectStore(Protocol):
    @property
    def location(self) -> str:
        """Where objects go, for messages (``s3://host:port/bucket``); no secrets."""
        ...

    async def ensure_bucket(self) -> None: ...

    async def put_file(
        self,
        name: str,
        path: Path,
        metadata: dict[str, str],
        progress: ProgressCallback | None = None,
        *,
        sha256: str | None = None,
    ) -> ObjectInfo:
        """Upload ``path`` as ``name``; verifies the stored size before returning.

        With ``sha256`` (hex), the bytes read must hash to it, else nothing is stored
        (the file changed since it was hashed). Raises StorageError.
        """
        ...

    async def copy(self, source: str, dest: str, metadata: dict[str, str]) -> ObjectInfo:
        """Copy ``source`` to ``dest`` inside the store, its user metadata replaced by
        ``metadata``. Raises StorageError, also when ``source`` does not exist."""
        ...

    async def put_bytes(self, name: str, data: bytes, metadata: dict[str, str]) -> ObjectInfo:
        """Store a small object (a JSON pointer) in one request; raises StorageError."""
        ...

    async def get_bytes(self, name: str, limit: int = 1 << 20) -> bytes | None:
        """A small object's bytes, or None when it does not exist. Raises StorageError
        when it is larger than ``limit`` bytes."""
        ...

    async def stat(self, name: str) -> ObjectInfo | None: ...

    async def abort_incomplete(
        self, name: str, *, older_than: float | None, now: datetime | None = None
    ) -> int:
        """Drop what uploads of ``name`` that died half-way left behind (never a complete
        object), but only leftovers that showed no life (started, or had a part written)
        for ``older_than`` seconds before ``now`` (default: the clock): a younger one may
        belong to a duplicate run that is still uploading. ``older_than=None`` drops every
        leftover, whatever its age (no other run of ``name`` matters any more). Returns
        how many leftovers were removed; raises StorageError."""
        ...

    async def list(self, prefix: str) -> list[ObjectInfo]: ...

    async def remove(self, name: str) -> None: ...

    async def fetch(self, name: str, dest: Path) -> None: ...

    async def locate(self, name: str, expires: timedelta) -> str | Path:
        """Where a client reads ``name`` itself: a URL presigned for ``expires`` (S3), or
        the local file (the directory store). Raises StorageError."""
        ...

    async def close(self) -> None: ...


class _Progress:
    """Bytes stored so far out of ``total``, forwarded to a plain callback."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self._callback = callback
        self._total = total
        self._done = 0

    def add(self, size: int) -> None:
        self._done += size
        if self._callback is not None:
            self._callback(self._done, self._total)


@dataclass(slots=True)
class _Parts:
    """What the reader of one upload saw, and what the server acknowledged."""

    size: int = 0
    count: int = 0  # parts 1..count; an empty file still makes one (empty) part
    md5s: dict[int, bytes] = field(default_factory=dict)
    etags: dict[int, str] = field(default_factory=dict)
    sha256: Any = None  # of the whole file, when the caller has a hash to check


_TRANSPORT_ERRORS = (MinioException, aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError)
_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchObject", "NotFound"})
# A multipart upload's ETag as S3, MinIO and moto compute it: md5(part digests)-count.
_MULTIPART_ETAG = re.compile(r"[0-9a-f]{32}-[0-9]+")
_MAX_PARTS = 10_000  # per multipart upload, S3's limit
_MIB = 1024 * 1024
# The last sign of life of an unfinished upload the server dates with nothing.
_LONG_AGO = datetime.min.replace(tzinfo=UTC)


def _md5(data: bytes | memoryview) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


def _digest(part: io.BytesIO) -> tuple[int, bytes]:
    """Size and MD5 of a part, without copying it."""
    with part.getbuffer() as view:
        return len(view), _md5(view)


class S3ObjectStore:
    """A bucket on an S3-compatible server."""

    def __init__(self, settings: MinioSettings) -> None:
        self._settings = settings
        self._client: Minio | None = None
        self._bucket_ready = False

    @property
    def location(self) -> str:
        scheme = "https" if self._settings.use_ssl else "http"
        return f"{scheme}://{self._settings.endpoint}/{self._settings.bucket}"

    def _tls(self) -> ssl.SSLContext | bool:
        """The connector's TLS verification: True (system trust store) or ca_file's CAs.

        Raises StorageError when ``minio.ca_file`` cannot be loaded.
        """
        ca_file = self._settings.ca_file
        if not ca_file:
            return True
        try:
            return ssl.create_default_context(cafile=ca_file)
        except OSError as exc:  # ssl.SSLError included: not a PEM bundle
            detail = exc.strerror or str(exc)
            raise StorageError(f"cannot load minio.ca_file {ca_file}: {detail}") from None

    @property
    def client(self) -> Minio:
        """The S3 client, created on first use; raises StorageError for a bad ca_file."""
        if self._client is None:
            self._client = Minio(
                self._settings.endpoint,
                access_key=self._settings.access_key.get_secret_value(),
                secret_key=self._settings.secret_key.get_secret_value(),
                secure=self._settings.use_ssl,
                region=self._settings.region or None,
                # Bounded waits: a stalled S3 fails the attempt and dramatiq retries it,
                # instead of miniopy's default five-minute waits. Waiting for a pooled
                # connection counts against ``connect``, so the pool leaves room for a
                # few uploads at full parallelism.
                session=aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(
                        limit=max(10, 4 * self._settings.parallel_parts), ssl=self._tls()
                    ),
                    timeout=aiohttp.ClientTimeout(
                        connect=self._settings.connect_timeout,
                        sock_connect=self._settings.connect_timeout,
                        sock_read=self._settings.read_timeout,
                    ),
                ),
            )
        return self._client

    def _error(self, what: str, exc: BaseException) -> StorageError:
        if isinstance(exc, S3Error):
            detail = f"{exc.code}: {exc.message}"
        elif isinstance(exc, asyncio.TimeoutError):
            detail = "timed out"
        else:
            detail = str(exc) or type(exc).__name__
        return StorageError(f"S3 at {self.location}: {what} failed: {detail}")

    async def ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        bucket = self._settings.bucket
        try:
            if not await self.client.bucket_exists(bucket):
                with contextlib.suppress(S3Error):  # created meanwhile by another worker
                    await self.client.make_bucket(bucket)
                    log.info("created bucket %s at %s", bucket, self.location)
        except _TRANSPORT_ERRORS as exc:
            raise self._error("bucket check", exc) from exc
        self._bucket_ready = True

    def _part_size(self, size: int) -> int:
        """``minio.part_size``, grown to whole MiB when ``size`` would need more parts
        than S3 allows in one upload."""
        part_size = self._settings.part_size
        if size > part_size * _MAX_PARTS:
            part_size = -(-size // (_MAX_PARTS * _MIB)) * _MIB
        return part_size

    async def put_file(
        self,
        name: str,
        path: Path,
        metadata: dict[str, str],
        progress: ProgressCallback | None = None,
        *,
        sha256: str | None = None,
    ) -> ObjectInfo:
        """Upload ``path`` as ``name`` in a multipart upload, ``minio.parallel_parts``
        parts at a time, in memory bounded by the part size, not the file's size.

        Each part goes with its Content-MD5 (the server refuses a part damaged on the
        way); once complete, the stored size and, in S3's multipart form, the ETag are
        checked against what was read. Raises StorageError when the upload fails (the
        multipart upload is aborted), when the file's size or the ``sha256`` given
        (hex) do not match the bytes read (nothing is stored), or when the stored object
        disagrees (it is removed). A cancelled upload is aborted and stays cancelled.
        """
        await self.ensure_bucket()
        bucket = self._settings.bucket
        what = f"upload of {name}"
        upload_id: str | None = None
        parts = _Parts(sha256=None if sha256 is None else hashlib.sha256())
        try:
            expected = path.stat().st_size
            user: DictType = dict(metadata)
            headers = genheaders(user, None, None, None, False)
            headers["Content-Type"] = "application/gzip"
            upload_id = await self.client._create_multipart_upload(bucket, name, headers)
            await self._send_parts(
                name,
                path,
                upload_id,
                self._part_size(expected),
                parts,
                _Progress(progress, expected),
            )
            if parts.size != expected:
                raise StorageError(
                    f"S3 at {self.location}: {what} refused: {path} changed while it was "
                    f"read ({parts.size} bytes read, {expected} expected)"
                )
            if sha256 is not None and parts.sha256.hexdigest() != sha256.lower():
                raise StorageError(
                    f"S3 at {self.location}: {what} refused: the bytes read from {path} "
                    "do not match its sha256 (it changed since it was hashed)"
                )
            await self.client._complete_multipart_upload(
                bucket,
                name,
                upload_id,
                [Part(number, parts.etags[number]) for number in range(1, parts.count + 1)],
            )
        except BaseException as exc:
            if upload_id is not None:
                await self._abort_upload(name, upload_id)
            if isinstance(exc, _TRANSPORT_ERRORS):
                raise self._error(what, exc) from exc
            raise
        stored = await self._stat_object(name, f"stat of {name}")
        problem = self._stored_problem(name, stored, expected, parts)
        if problem is not None:
            if stored is not None:
                with contextlib.suppress(StorageError):
                    await self.remove(name)
            raise StorageError(f"S3 at {self.location}: {name} {problem}")
        assert stored is not None
        log.debug("uploaded %s (%d bytes, %d parts)", name, expected, parts.count)
        return self._info(name, stored)

    async def _send_parts(
        self,
        name: str,
        path: Path,
        upload_id: str,
        part_size: int,
        parts: _Parts,
        progress: _Progress,
    ) -> None:
        """Read ``path`` part by part into a bounded queue that ``parallel_parts``
        uploaders drain; the first failure cancels the rest and is raised."""
        bucket = self._settings.bucket
        uploaders = self._settings.parallel_parts
        # One part waiting: the reader stays just ahead of the uploaders, never further.
        queue: asyncio.Queue[tuple[int, io.BytesIO] | None] = asyncio.Queue(1)

        def read(file: BinaryIO) -> io.BytesIO:
            # A BytesIO rather than bytes: aiohttp sends it in small chunks, where a
            # bytes body is copied whole into the 3.11 transport's buffer when the
            # socket does not take it at once (the part would be held twice).
            part = io.BytesIO()
            while (missing := part_size - part.tell()) and (chunk := file.read(min(missing, _MIB))):
                if parts.sha256 is not None:
                    parts.sha256.update(chunk)
                part.write(chunk)
            return part

        async def reader(file: BinaryIO) -> None:
            while True:
                part = await asyncio.to_thread(read, file)
                size = part.tell()
                if not size and parts.count:
                    break
                parts.count += 1
                parts.size += size
                part.seek(0)
                await queue.put((parts.count, part))
                del part
                if size < part_size:
                    break
            for _ in range(uploaders):
                await queue.put(None)

        async def uploader() -> None:
            while True:
                item = await queue.get()
                if item is None:
                    return
                number, part = item
                del item  # hold a part only while it is being sent
                # MD5 here rather than in the reader: parts hash on several cores.
                size, md5 = await asyncio.to_thread(_digest, part)
                parts.md5s[number] = md5
                checksum: DictType = {"Content-MD5": base64.b64encode(md5).decode()}
                parts.etags[number] = await self.client._upload_part(
                    bucket, name, part, checksum, upload_id, number
                )
                del part
                progress.add(size)

        with path.open("rb") as file:
            tasks = [asyncio.create_task(reader(file))]
            tasks += [asyncio.create_task(uploader()) for _ in range(uploaders)]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    if (exc := task.exception()) is not None:
                        raise exc
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _abort_upload(self, name: str, upload_id: str) -> None:
        """Best effort: a failed upload's parts hold storage until aborted. S3 may refuse
        an abort while a cancelled part upload is still being processed (moto answers
        500), so it is tried ABORT_ATTEMPTS times. A last failure is logged, never raised
        over the upload's own error; ``abort_incomplete`` catches what is left on the next
        attempt."""
        for attempt in range(1, ABORT_ATTEMPTS + 1):
            try:
                async with asyncio.timeout(self._settings.connect_timeout):
                    await self.client._abort_multipart_upload(
                        self._settings.bucket, name, upload_id
                    )
                return
            except _TRANSPORT_ERRORS as exc:
                if attempt == ABORT_ATTEMPTS:
                    log.warning("%s", self._error(f"aborting the failed upload of {name}", exc))
                    return
                await asyncio.sleep(ABORT_BACKOFF * attempt)

    def _stored_problem(
        self, name: str, stored: Object | None, expected: int, parts: _Parts
    ) -> str | None:
        """What is wrong with the object a completed upload left, or None."""
        if stored is None:
            return "is missing after its upload completed"
        if stored.size != expected:
            return f"stored {stored.size} bytes, expected {expected} bytes"
        etag = (stored.etag or "").strip('"').lower()
        if not _MULTIPART_ETAG.fullmatch(etag):
            log.debug(
                "%s: ETag %r of %s is not S3's multipart form, not checked",
                self.location,
                etag,
                name,
            )
            return None
        if any(
            parts.etags[number].strip('"').lower() != md5.hex()
            for number, md5 in parts.md5s.items()
        ):
            # An encrypting server's part ETags are not the parts' MD5s, nor is its
            # object ETag derived from them; Content-MD5 already vouched for each part.
            log.debug("%s: part ETags of %s are not MD5s, ETag not checked", self.location, name)
            return None
        combined = b"".join(parts.md5s[number] for number in range(1, parts.count + 1))
        want = f"{_md5(combined).hex()}-{parts.count}"
        if etag != want:
            return f"has ETag {etag}, expected {want} from the parts sent"
        return None

    async def copy(self, source: str, dest: str, metadata: dict[str, str]) -> ObjectInfo:
        """Server-side copy (the bytes never pass through DCU); the content type is kept,
        the user metadata is ``metadata`` alone. Raises StorageError, naming ``source``
        when it does not exist."""
        await self.ensure_bucket()
        bucket = self._settings.bucket
        what = f"copy of {source} to {dest}"
        missing = StorageError(f"S3 at {self.location}: {what} failed: {source} does not exist")
        original = await self._stat_object(source, what)
        if original is None:
            raise missing
        headers: DictType = dict(metadata)
        headers["Content-Type"] = original.content_type or "application/octet-stream"
        try:
            await self.client.copy_object(
                bucket,
                dest,
                CopySource(bucket, source),
                metadata=headers,
                metadata_directive=REPLACE,
            )
        except S3Error as exc:
            if exc.code in _NOT_FOUND:  # removed since the stat
                raise missing from exc
            raise self._error(what, exc) from exc
        except _TRANSPORT_ERRORS as exc:
            raise self._error(what, exc) from exc
        copied = await self._stat_object(dest, what)
        if copied is None or copied.size != original.size:
            got = "nothing" if copied is None else f"{copied.size} bytes"
            raise StorageError(
                f"S3 at {self.location}: {what} stored {got}, expected {original.size} bytes"
            )
        return self._info(dest, copied)

    async def put_bytes(self, name: str, data: bytes, metadata: dict[str, str]) -> ObjectInfo:
        await self.ensure_bucket()
        what = f"upload of {name}"
        try:
            await self.client.put_object(
                self._settings.bucket,
                name,
                io.BytesIO(data),
                len(data),
                metadata=dict(metadata),
            )
        except _TRANSPORT_ERRORS as exc:
            raise self._error(what, exc) from exc
        stored = await self._stat_object(name, what)
        if stored is None or stored.size != len(data):
            got = "nothing" if stored is None else f"{stored.size} bytes"
            raise StorageError(
                f"S3 at {self.location}: {name} stored {got}, expected {len(data)} bytes"
            )
        return self._info(name, stored)

    async def get_bytes(self, name: str, limit: int = 1 << 20) -> bytes | None:
        """Reads no more than ``limit`` + 1 bytes, whatever the object's size."""
        what = f"download of {name}"
        too_large = StorageError(
            f"S3 at {self.location}: {what} refused: larger than {limit} bytes"
        )
        try:
            response = await self.client.get_object(self._settings.bucket, name)
        except S3Error as exc:
            if exc.code in _NOT_FOUND:
                return None
            raise self._error(what, exc) from exc
        except _TRANSPORT_ERRORS as exc:
            raise self._error(what, exc) from exc
        try:
            if response.content_length is not None and response.content_length > limit:
                raise too_large
            data = bytearray()
            async for chunk in response.content.iter_any():
                data += chunk
                if len(data) > limit:
                    raise too_large
            return bytes(data)
        except _TRANSPORT_ERRORS as exc:
            raise self._error(what, exc) from exc
        finally:
            response.close()  # drops the connection only when the body was not read

    async def abort_incomplete(
        self, name: str, *, older_than: float | None, now: datetime | None = None
    ) -> int:
        """An upload's last sign of life is the newest of its start (``Initiated``) and
        its parts' ``LastModified``: a live upload stores a part every few seconds
        however long it has been running. Those times are the server's, compared with
        ``now`` here, so the clocks must agree to well within ``older_than``."""
        # A multipart upload whose worker died is not an object, but its parts hold
        # storage until aborted. miniopy-async exposes the S3 calls (ListMultipart-
        # Uploads, ListParts, AbortMultipartUpload) only as private methods.
        await self.ensure_bucket()
        bucket = self._settings.bucket
        cutoff = None
        if older_than is not None:
            cutoff = (now or datetime.now(UTC)) - timedelta(seconds=older_than)
        aborted = 0
        try:
            result = await self.client._list_multipart_uploads(bucket, prefix=name)
            for upload in result.uploads:
                if upload.object_name != name or not upload.upload_id:
                    continue
                if cutoff is None:
                    aborted += await self._abort_leftover(name, upload.upload_id)
                    continue
                newest_part = await self._newest_part(name, upload.upload_id)
                if newest_part is None:
                    continue  # finished or aborted meanwhile
                latest = max(newest_part, upload.initiated_time or _LONG_AGO)
                if latest > cutoff:
                    log.info(
                        "keeping the unfinished upload %s of %s: active at %s, it may be "
                        "a duplicate run's that is still going",
                        upload.upload_id,
                        name,
                        latest.isoformat(),
                    )
                    continue
                aborted += await self._abort_leftover(name, upload.upload_id)
        except _TRANSPORT_ERRORS as exc:
            raise self._error(f"aborting unfinished uploads of {name}", exc) from exc
        return aborted

    async def _newest_part(self, name: str, upload_id: str) -> datetime | None:
        """When the newest part of an unfinished upload was stored (``_LONG_AGO`` when it
        has none), None when the upload is gone. Raises what the client raises."""
        bucket = self._settings.bucket
        newest = _LONG_AGO
        marker: str | None = None
        while True:
            try:
                page = await self.client._list_parts(
                    bucket, name, upload_id, part_number_marker=marker
                )
            except S3Error as exc:
                if exc.code == "NoSuchUpload":
                    return None
                raise
            for part in page.parts:
                if part.last_modified is not None and part.last_modified > newest:
                    newest = part.last_modified
            if not page.is_truncated or page.next_part_number_marker is None:
                return newest
            marker = str(page.next_part_number_marker)

    async def _abort_leftover(self, name: str, upload_id: str) -> int:
        """Abort one unfinished upload: 1, or 0 when it was gone already."""
        try:
            await self.client._abort_multipart_upload(self._settings.bucket, name, upload_id)
        except S3Error as exc:
            if exc.code == "NoSuchUpload":
                return 0
            raise
        log.debug("aborted the unfinished upload %s of %s", upload_id, name)
        return 1

    async def _stat_object(self, name: str, what: str) -> Object | None:
        """The server's stat of ``name``, None when it does not exist."""
        try:
            return await self.client.stat_object(self._settings.bucket, name)
        except S3Error as exc:
            if exc.code in _NOT_FOUND:
                return None
            raise self._error(what, exc) from exc
        except _TRANSPORT_ERRORS as exc:
            raise self._error(what, exc) from exc

    @staticmethod
    def _info(name: str, obj: Object) -> ObjectInfo:
        headers = dict(obj.metadata or {})
        meta = {
            str(k).lower().removeprefix("x-amz-meta-"): str(v)
            for k, v in headers.items()
            if str(k).lower().startswith("x-amz-meta-")
        }
        return ObjectInfo(
            name=name,
            size=int(obj.size or 0),
            last_modified=obj.last_modified or datetime.now(UTC),
            metadata=meta,
        )

    async def stat(self, name: str) -> ObjectInfo | None:
        obj = await self._stat_object(name, f"stat of {name}")
        return None if obj is None else self._info(name, obj)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        await self.ensure_bucket()
        found: list[ObjectInfo] = []
        try:
            async for obj in self.client.list_objects(
                self._settings.bucket, prefix=prefix, recursive=True
            ):
                if obj.object_name is None or obj.is_dir:
                    continue
                found.append(
                    ObjectInfo(
                        name=obj.object_name,
                        size=int(obj.size or 0),
                        last_modified=obj.last_modified or datetime.now(UTC),
                    )
                )
        except _TRANSPORT_ERRORS as exc:
            raise self._error(f"listing {prefix}", exc) from exc
        return found

    async def remove(self, name: str) -> None:
        try:
            await self.client.remove_object(self._settings.bucket, name)
        except _TRANSPORT_ERRORS as exc:
            raise self._error(f"removing {name}", exc) from exc

    async def fetch(self, name: str, dest: Path) -> None:
        try:
            await self.client.fget_object(self._settings.bucket, name, str(dest))
        except _TRANSPORT_ERRORS as exc:
            raise self._error(f"download of {name}", exc) from exc

    async def locate(self, name: str, expires: timedelta) -> str | Path:
        try:
            url: str = await self.client.presigned_get_object(
                self._settings.bucket, name, expires=expires
            )
        except _TRANSPORT_ERRORS as exc:
            raise self._error(f"presigning {name}", exc) from exc
        return url

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close_session()  # type: ignore[no-untyped-call]
            self._client = None


def _copy_hashing(source: Path, dest: Path) -> str:
    """Copy ``source`` to ``dest``; the sha256 (hex) of the bytes copied."""
    digest = hashlib.sha256()
    with source.open("rb") as src, dest.open("wb") as dst:
        while chunk := src.read(_MIB):
            digest.update(chunk)
            dst.write(chunk)
    return digest.hexdigest()


class LocalObjectStore:
    """Objects as files under ``<local_path>/<bucket>/``, metadata in a JSON sidecar.

    For running DCU without an S3 server; same contract as S3ObjectStore.
    """

    _META_SUFFIX = ".dcu-meta.json"

    def __init__(self, settings: MinioSettings) -> None:
        self._root = Path(settings.local_path) / settings.bucket

    @property
    def location(self) -> str:
        return f"file://{self._root.resolve()}"

    def _path(self, name: str) -> Path:
        candidate = self._root / name
        if name.startswith("/") or ".." in Path(name).parts or not inside(self._root, candidate):
            raise StorageError(f"object name {name!r} would leave {self.location}")
        return candidate

    def _place(self, target: Path, part: Path, metadata: dict[str, str]) -> None:
        """Move a finished ``part`` file in as ``target``, with its metadata sidecar."""
        os.replace(part, target)
        target.with_name(target.name + self._META_SUFFIX).write_text(json.dumps(metadata))

    async def ensure_bucket(self) -> None:
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.location}: {exc}") from exc

    async def put_file(
        self,
        name: str,
        path: Path,
        metadata: dict[str, str],
        progress: ProgressCallback | None = None,
        *,
        sha256: str | None = None,
    ) -> ObjectInfo:
        await self.ensure_bucket()
        target = self._path(name)
        part = target.with_name(target.name + ".part")

        def copy() -> bool:
            target.parent.mkdir(parents=True, exist_ok=True)
            if sha256 is None:
                shutil.copyfile(path, part)
            elif _copy_hashing(path, part) != sha256.lower():
                part.unlink()
                return False
            self._place(target, part, metadata)
            return True

        try:
            expected = path.stat().st_size
            matched = await asyncio.to_thread(copy)
        except OSError as exc:
            with contextlib.suppress(OSError):
                part.unlink()
            raise StorageError(f"{self.location}: storing {name} failed: {exc}") from exc
        if not matched:
            raise StorageError(
                f"{self.location}: storing {name} refused: the bytes read from {path} do not "
                "match its sha256 (it changed since it was hashed)"
            )
        if progress is not None:
            progress(expected, expected)
        info = await self.stat(name)
        if info is None or info.size != expected:
            raise StorageError(f"{self.location}: {name} stored with the wrong size")
        return info

    async def copy(self, source: str, dest: str, metadata: dict[str, str]) -> ObjectInfo:
        original = self._path(source)
        target = self._path(dest)
        part = target.with_name(target.name + ".part")
        what = f"copy of {source} to {dest}"
        if not original.is_file() or original.is_symlink():
            raise StorageError(f"{self.location}: {what} failed: {source} does not exist")

        def copy() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(original, part)
            self._place(target, part, metadata)

        try:
            await asyncio.to_thread(copy)
        except OSError as exc:
            with contextlib.suppress(OSError):
                part.unlink()
            if isinstance(exc, FileNotFoundError) and not original.exists():
                raise StorageError(
                    f"{self.location}: {what} failed: {source} does not exist"
                ) from exc
            raise StorageError(f"{self.location}: {what} failed: {exc}") from exc
        info = await self.stat(dest)
        if info is None:
            raise StorageError(f"{self.location}: {what} stored nothing")
        return info

    async def put_bytes(self, name: str, data: bytes, metadata: dict[str, str]) -> ObjectInfo:
        await self.ensure_bucket()
        target = self._path(name)
        part = target.with_name(target.name + ".part")

        def write() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            part.write_bytes(data)
            self._place(target, part, metadata)

        try:
            await asyncio.to_thread(write)
        except OSError as exc:
            with contextlib.suppress(OSError):
                part.unlink()
            raise StorageError(f"{self.location}: storing {name} failed: {exc}") from exc
        info = await self.stat(name)
        if info is None or info.size != len(data):
            raise StorageError(f"{self.location}: {name} stored with the wrong size")
        return info

    async def get_bytes(self, name: str, limit: int = 1 << 20) -> bytes | None:
        target = self._path(name)
        try:
            with target.open("rb") as file:
                data = file.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"{self.location}: reading {name} failed: {exc}") from exc
        if len(data) > limit:
            raise StorageError(
                f"{self.location}: reading {name} refused: larger than {limit} bytes"
            )
        return data

    async def abort_incomplete(
        self, name: str, *, older_than: float | None, now: datetime | None = None
    ) -> int:
        """A part file's last sign of life is its mtime: a live copy keeps writing it."""
        target = self._path(name)
        cutoff = None if older_than is None else (now or datetime.now(UTC)).timestamp() - older_than
        removed = 0
        for part in target.parent.glob(f"{target.name}*.part") if target.parent.exists() else []:
            try:
                st = part.lstat()
            except FileNotFoundError:
                continue
            if not S_ISREG(st.st_mode) or (cutoff is not None and st.st_mtime > cutoff):
                continue
            part.unlink(missing_ok=True)
            removed += 1
        return removed

    async def stat(self, name: str) -> ObjectInfo | None:
        target = self._path(name)
        try:
            st = target.stat()
        except FileNotFoundError:
            return None
        meta_file = target.with_name(target.name + self._META_SUFFIX)
        metadata: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            metadata = json.loads(meta_file.read_text())
        return ObjectInfo(
            name=name,
            size=st.st_size,
            last_modified=datetime.fromtimestamp(st.st_mtime, UTC),
            metadata={str(k).lower(): str(v) for k, v in metadata.items()},
        )

    async def list(self, prefix: str) -> list[ObjectInfo]:
        found: list[ObjectInfo] = []
        if not self._root.exists():
            return found
        for path in sorted(self._root.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            if path.name.endswith((self._META_SUFFIX, ".part")):
                continue
            name = path.relative_to(self._root).as_posix()
            if name.startswith(prefix):
                info = await self.stat(name)
                if info is not None:
                    found.append(info)
        return found

    async def remove(self, name: str) -> None:
        target = self._path(name)
        for path in (target, target.with_name(target.name + self._META_SUFFIX)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def fetch(self, name: str, dest: Path) -> None:
        await asyncio.to_thread(shutil.copyfile, self._path(name), dest)

    async def locate(self, name: str, expires: timedelta) -> str | Path:
        return self._path(name)

    async def close(self) -> None:
        return None


def open_store(settings: MinioSettings) -> ObjectStore:
    if settings.endpoint:
        return S3ObjectStore(settings)
    return LocalObjectStore(settings)

"""Object storage edge: the S3 API through miniopy-async, or a local directory.

Both stores keep to the plain S3 object model (bucket, key, size, mtime, user metadata), so
MinIO, Ceph RGW, AWS S3 and moto all work, and the local store is a drop-in for running
DCU without an S3 server. Every failure becomes ``StorageError`` naming the endpoint
(never the keys). With ``minio.use_ssl`` the server's certificate is checked against the
system's trust store, or against ``minio.ca_file`` alone when that is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from miniopy_async.api import Minio
from miniopy_async.error import MinioException, S3Error

from dcu.errors import StorageError
from dcu.settings import MinioSettings
from events.naming import inside

log = logging.getLogger(__name__)

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
    ) -> ObjectInfo:
        """Upload ``path`` as ``name``; verifies the stored size before returning."""
        ...

    async def stat(self, name: str) -> ObjectInfo | None: ...

    async def abort_incomplete(self, name: str) -> int:
        """Drop what an upload of ``name`` that died half-way left behind (never a
        complete object); returns how many leftovers were removed."""
        ...

    async def list(self, prefix: str) -> list[ObjectInfo]: ...

    async def remove(self, name: str) -> None: ...

    async def fetch(self, name: str, dest: Path) -> None: ...

    async def close(self) -> None: ...


class _Progress:
    """miniopy-async's progress protocol, forwarded to a plain callback."""

    def __init__(self, callback: ProgressCallback) -> None:
        self._callback = callback
        self._total: int | None = None
        self._done = 0

    async def set_meta(self, object_name: str, total_length: int) -> None:
        self._total = total_length

    async def update(self, size: int) -> None:
        self._done += size
        self._callback(self._done, self._total)


_TRANSPORT_ERRORS = (MinioException, aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError)


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
                # instead of miniopy's default five-minute waits.
                session=aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=10, ssl=self._tls()),
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

    async def put_file(
        self,
        name: str,
        path: Path,
        metadata: dict[str, str],
        progress: ProgressCallback | None = None,
    ) -> ObjectInfo:
        await self.ensure_bucket()
        expected = path.stat().st_size
        try:
            await self.client.fput_object(
                self._settings.bucket,
                name,
                str(path),
                content_type="application/gzip",
                metadata=dict(metadata),
                part_size=self._settings.part_size,
                progress=_Progress(progress) if progress is not None else None,
            )
        except _TRANSPORT_ERRORS as exc:
            raise self._error(f"upload of {name}", exc) from exc
        info = await self.stat(name)
        if info is None or info.size != expected:
            got = "nothing" if info is None else f"{info.size} bytes"
            raise StorageError(
                f"S3 at {self.location}: {name} stored {got}, expected {expected} bytes"
            )
        return info

    async def abort_incomplete(self, name: str) -> int:
        # A multipart upload whose worker died is not an object, but its parts hold
        # storage until aborted. miniopy-async exposes the two S3 calls (ListMultipart-
        # Uploads, AbortMultipartUpload) only as private methods.
        await self.ensure_bucket()
        bucket = self._settings.bucket
        aborted = 0
        try:
            result = await self.client._list_multipart_uploads(bucket, prefix=name)
            for upload in result.uploads:
                if upload.object_name == name and upload.upload_id:
                    await self.client._abort_multipart_upload(bucket, name, upload.upload_id)
                    aborted += 1
        except _TRANSPORT_ERRORS as exc:
            raise self._error(f"aborting unfinished uploads of {name}", exc) from exc
        return aborted

    async def stat(self, name: str) -> ObjectInfo | None:
        try:
            obj = await self.client.stat_object(self._settings.bucket, name)
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchObject", "NotFound"}:
                return None
            raise self._error(f"stat of {name}", exc) from exc
        except _TRANSPORT_ERRORS as exc:
            raise self._error(f"stat of {name}", exc) from exc
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

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close_session()  # type: ignore[no-untyped-call]
            self._client = None


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
    ) -> ObjectInfo:
        await self.ensure_bucket()
        target = self._path(name)
        part = target.with_name(target.name + ".part")
        expected = path.stat().st_size

        def copy() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, part)
            os.replace(part, target)
            target.with_name(target.name + self._META_SUFFIX).write_text(json.dumps(metadata))

        try:
            await asyncio.to_thread(copy)
        except OSError as exc:
            with contextlib.suppress(OSError):
                part.unlink()
            raise StorageError(f"{self.location}: storing {name} failed: {exc}") from exc
        if progress is not None:
            progress(expected, expected)
        info = await self.stat(name)
        if info is None or info.size != expected:
            raise StorageError(f"{self.location}: {name} stored with the wrong size")
        return info

    async def abort_incomplete(self, name: str) -> int:
        target = self._path(name)
        removed = 0
        for part in target.parent.glob(f"{target.name}*.part") if target.parent.exists() else []:
            if part.is_file() and not part.is_symlink():
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

    async def close(self) -> None:
        return None


def open_store(settings: MinioSettings) -> ObjectStore:
    if settings.endpoint:
        return S3ObjectStore(settings)
    return LocalObjectStore(settings)

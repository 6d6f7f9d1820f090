"""The Docker engine edge (aiodocker): pull an image and stream its export to a file.

Errors are translated here: a missing image or refused pull becomes ``ImageNotFound``
(a permanent failure, not retried), a dead socket or 5xx ``EngineError``, a stalled call
``UpstreamTimeout``. Nothing else escapes.

Registry credentials (``actors.registry_auth``) go to the engine in ``X-Registry-Auth``
only; any of them the engine's error text repeats is masked before it becomes a message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError

from actors.registry_auth import DockerConfigError, RegistryAuth
from events.reference import ImageReference
from kernel.errors import EngineError, ImageNotFound, StorageError, UpstreamTimeout
from kernel.settings import DockerSettings

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int | None], None]

_WRITE_CHUNK = 4 * 1024 * 1024
_NOT_FOUND_HINTS = (
    "not found",
    "manifest unknown",
    "does not exist",
    "repository does not exist",
    "pull access denied",
    "no such image",
)


@dataclass(frozen=True, slots=True)
class ExportedImage:
    image_id: str
    path: Path
    bytes: int


REDACTED = "***"
_REDACT_MIN = 3  # shorter values would mask ordinary words


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret (longest first) masked."""
    for secret in sorted({s for s in secrets if len(s) >= _REDACT_MIN}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def _translate(exc: BaseException, what: str, secrets: Iterable[str] = ()) -> Exception:
    if isinstance(exc, DockerError) and exc.status == 900:  # aiodocker: no connection
        detail = redact(str(exc.message), secrets)
        return EngineError(f"{what}: cannot reach the Docker engine: {detail}")
    if isinstance(exc, DockerError):
        message = f"{what}: {redact(str(exc.message), secrets)}"
        lowered = str(exc.message).lower()
        if exc.status == 404 or any(hint in lowered for hint in _NOT_FOUND_HINTS):
            return ImageNotFound(message)
        return EngineError(message)
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamTimeout(f"{what}: the Docker engine did not answer in time")
    return EngineError(f"{what}: cannot reach the Docker engine: {redact(str(exc), secrets)}")


class DockerEngine:
    """One aiodocker client, opened and closed with the worker's event loop."""

    def __init__(self, settings: DockerSettings) -> None:
        self._settings = settings
        self._docker: aiodocker.Docker | None = None
        self._registry_auth = RegistryAuth(settings)

    @property
    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            self._docker = aiodocker.Docker(url=self._settings.host)
        return self._docker

    async def close(self) -> None:
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    def _auth_for(self, ref: ImageReference) -> dict[str, str] | None:
        """The ``X-Registry-Auth`` content for ``ref``'s registry, or None.

        Raises EngineError (retried) when the Docker config file cannot be read.
        """
        try:
            creds = self._registry_auth.credentials(ref.registry_host)
        except DockerConfigError as exc:
            raise EngineError(str(exc)) from None
        if creds is None:
            return None
        return {
            "username": creds.username,
            "password": creds.password.get_secret_value(),
            "serveraddress": ref.registry_host,
        }

    async def pull(self, ref: ImageReference, progress: ProgressCallback | None = None) -> str:
        """Pull ``ref``; returns its image ID.

        Raises ImageNotFound, EngineError or UpstreamTimeout.
        """
        auth = self._auth_for(ref)
        headers = {}
        secrets: list[str] = []
        if auth is not None:
            encoded = base64.urlsafe_b64encode(json.dumps(auth).encode()).decode()
            headers["X-Registry-Auth"] = encoded
            secrets = [auth["username"], auth["password"], encoded]
        params = {"fromImage": ref.name, "tag": ref.pull_tag}
        layers: dict[str, tuple[int, int]] = {}
        try:
            async with asyncio.timeout(self._settings.pull_timeout):
                # aiodocker's pull() insists on a registry host in the name when auth is
                # given; the API call underneath is the same, so it is made directly.
                async with self.docker._query(
                    "images/create", "POST", params=params, headers=headers, timeout=None
                ) as response:
                    async for line in response.content:
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        if "error" in item:
                            raise DockerError(500, str(item.get("error")))
                        detail = item.get("progressDetail") or {}
                        if item.get("id") and detail.get("total"):
                            layers[item["id"]] = (int(detail["current"]), int(detail["total"]))
                            if progress is not None:
                                done = sum(c for c, _ in layers.values())
                                total = sum(t for _, t in layers.values())
                                progress(done, total)
            return await self.image_id(ref.pinned)
        except (TimeoutError, DockerError, aiohttp.ClientError, OSError) as exc:
            # Not chained when credentials were sent: the engine's own text (unmasked) would
            # reach every traceback logged for the failure.
            raise _translate(exc, f"pull {ref}", secrets) from (None if secrets else exc)

    async def image_id(self, name: str) -> str:
        try:
            info = await self.docker.images.inspect(name)
        except (TimeoutError, DockerError, aiohttp.ClientError, OSError) as exc:
            raise _translate(exc, f"inspect {name}") from exc
        return str(info["Id"])

    async def image_size(self, name: str) -> int | None:
        try:
            info = await self.docker.images.inspect(name)
        except (TimeoutError, DockerError, aiohttp.ClientError, OSError) as exc:
            raise _translate(exc, f"inspect {name}") from exc
        size = info.get("Size")
        return int(size) if isinstance(size, int) else None

    async def export(
        self,
        ref: ImageReference,
        dest: Path,
        progress: ProgressCallback | None = None,
    ) -> ExportedImage:
        """Stream ``docker save`` of ``ref`` into ``dest`` (never held in memory).

        Writes ``dest`` atomically (a ``.part`` file renamed at the end) and removes the
        partial file on any failure. Raises StorageError when the disk cannot hold it.
        """
        name = ref.pinned
        image_id = await self.image_id(name)
        expected = await self.image_size(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if expected is not None:
            free = shutil.disk_usage(dest.parent).free
            if free < expected:
                raise StorageError(
                    f"not enough disk for the image tar in {dest.parent}: "
                    f"{expected} bytes needed, {free} free"
                )
        # A part name of its own: a duplicate delivery running beside this one never
        # writes into the same file; the rename at the end is atomic either way.
        part = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:12]}.part")
        written = 0
        try:
            with part.open("wb") as out:
                async with self.docker.images.export_image(name) as stream:
                    buffer = bytearray()
                    async for chunk in stream.iter_chunked(1024 * 1024):
                        buffer += chunk
                        if len(buffer) >= _WRITE_CHUNK:
                            await asyncio.to_thread(out.write, bytes(buffer))
                            written += len(buffer)
                            buffer.clear()
                            if progress is not None:
                                progress(written, expected)
                    if buffer:
                        await asyncio.to_thread(out.write, bytes(buffer))
                        written += len(buffer)
            os.replace(part, dest)
        except OSError as exc:
            with contextlib.suppress(OSError):
                part.unlink()
            if exc.errno == errno.ENOSPC:
                raise StorageError(f"disk full while writing {dest}: {exc.strerror}") from exc
            if isinstance(exc, aiohttp.ClientError | ConnectionError):
                raise _translate(exc, f"export {ref}") from exc
            raise StorageError(f"cannot write {dest}: {exc}") from exc
        except (TimeoutError, DockerError, aiohttp.ClientError) as exc:
            with contextlib.suppress(OSError):
                part.unlink()
            raise _translate(exc, f"export {ref}") from exc
        except BaseException:
            with contextlib.suppress(OSError):
                part.unlink()
            raise
        if progress is not None:
            progress(written, written)
        log.info("exported %s (%s) to %s: %d bytes", ref, image_id, dest, written)
        return ExportedImage(image_id=image_id, path=dest, bytes=written)

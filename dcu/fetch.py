"""``dcu fetch TASK_ID -o FILE``: a completed task's archive, checked against its sha256.

It asks the gateway (``--server``, else ``$DCU_SERVER``, else ``http://127.0.0.1:8090``)
for ``GET /api/dcu/download/{task_id}``, with ``--token`` (else ``$DCU_TOKEN``) as a
bearer token when given. The gateway either streams the file (local store) or answers
with a redirect to a presigned S3 URL, which is fetched without the token (the URL
carries its own signature, and the token is not S3's business). The bytes go to
``FILE.part``, are hashed on the way, and the file is renamed into place only when the
sha256 matches the one the gateway names (``X-Checksum-Sha256``).

Exit codes: 0 the file is there and checked; 1 the gateway refused (its message on
stderr), the transfer failed or the checksum did not match (nothing left behind).

The gateway's address, the token, the bearer header and the reading of a refusal's
envelope are shared with ``dcu submit`` (``dcu.submit``), which imports them from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
from pathlib import Path

import aiohttp
import yarl

DEFAULT_SERVER = "http://127.0.0.1:8090"
CHECKSUM_HEADER = "X-Checksum-Sha256"  # as gateway.download sends it
_CHUNK = 1 << 20
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
API = "/api/dcu"


class FetchFailed(Exception):
    """Why the archive was not fetched, worded for the terminal."""


def server_url(given: str | None) -> str:
    return (given or os.environ.get("DCU_SERVER") or DEFAULT_SERVER).rstrip("/")


def token_of(given: str | None) -> str | None:
    return given or os.environ.get("DCU_TOKEN") or None


def auth_headers(token: str | None) -> dict[str, str]:
    """The bearer header for ``token``; none without one."""
    return {"Authorization": f"Bearer {token}"} if token else {}


async def gateway_message(response: aiohttp.ClientResponse) -> str:
    """The ``message`` of the envelope a refusal carries, else the HTTP reason."""
    try:
        body = await response.json(content_type=None)
        message = body["message"]
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        message = None
    if not isinstance(message, str) or not message:
        return response.reason or "no message"
    return message


async def _refusal(response: aiohttp.ClientResponse) -> FetchFailed:
    return FetchFailed(f"the gateway answered {response.status}: {await gateway_message(response)}")


async def fetch(server: str, token: str | None, task_id: str, dest: Path) -> str:
    """Fetch the archive of ``task_id`` into ``dest``; returns its sha256 (hex).

    Raises FetchFailed.
    """
    headers = auth_headers(token)
    url = download_url(server, task_id)
    part = dest.with_name(dest.name + ".part")
    try:
        async with aiohttp.ClientSession(timeout=_TIMEOUT) as session:
            async with session.get(url, headers=headers, allow_redirects=False) as first:
                expected = first.headers.get(CHECKSUM_HEADER)
                if first.status in (301, 302, 303, 307, 308) and "Location" in first.headers:
                    # as signed: requoting would change the URL the signature covers
                    location = yarl.URL(first.headers["Location"], encoded=True)
                    async with session.get(location) as second:
                        if second.status != 200:
                            raise FetchFailed(f"the object store answered {second.status}")
                        digest = await _save(second, part)
                elif first.status == 200:
                    digest = await _save(first, part)
                else:
                    raise await _refusal(first)
    except aiohttp.ClientError as exc:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise FetchFailed(f"cannot fetch from {server}: {exc}") from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise
    if expected and digest != expected:
        part.unlink()
        raise FetchFailed(f"sha256 mismatch: got {digest}, the task recorded {expected}")
    part.replace(dest)
    return digest


def download_url(server: str, task_id: str) -> str:
    """Where the gateway serves (or redirects to) a completed task's archive."""
    return f"{server}{API}/download/{task_id}"


async def _save(response: aiohttp.ClientResponse, part: Path) -> str:
    digest = hashlib.sha256()
    with part.open("wb") as out:
        async for chunk in response.content.iter_chunked(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def run(server: str | None, token: str | None, task_id: str, dest: Path) -> int:
    """The command: prints the checked file and its sha256, or why it failed."""
    try:
        digest = asyncio.run(fetch(server_url(server), token_of(token), task_id, dest))
    except FetchFailed as exc:
        print(f"dcu fetch: {exc}", file=sys.stderr)
        return 1
    print(f"{dest} sha256:{digest}")
    return 0

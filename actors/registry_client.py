"""The OCI distribution API over aiohttp: manifests and blobs, auth, redirects, SSRF guard.

Why not a library: the Python registry clients on the package index either run a
synchronous ``requests`` session (no streaming into an event loop, no control over where
credentials go on redirects) or wrap the ``skopeo``/``crane`` binaries. What DCU needs is a
few HTTP calls whose security rules are the point: so they are written here, after
distribution's own client (``registry/client``) and go-containerregistry's ``transport``.

Rules this module enforces (``docs/security.md``, "Registry engine"):

* **Targets.** Registries, token realms and redirect targets are refused when they are
  link-local (169.254.0.0/16, fe80::/10: cloud metadata), checked on the literal address
  and again on every address DNS gives (the connector's resolver), so a name cannot be
  rebound between the check and the connect.
* **Credentials** go to the registry host itself, and to a token realm only when the realm
  is on that host (any port), Docker Hub's ``auth.docker.io`` for ``docker.io``, or a host listed in
  ``download.token_realms``. With ``docker.allowed_registries`` set, a realm must pass the
  same list (or ``download.token_realms``). A redirect to another host never carries the
  ``Authorization`` header (registries send blob GETs to storage or a CDN).
* **Plain HTTP** only for loopback registries and ``download.insecure_registries``.

Errors are translated here into the DCU hierarchy: a missing manifest or blob is
``ImageNotFound``; a refusal (401/403 after authenticating, a forbidden target, a bad
answer) is ``RegistryRefused`` (permanent); transport failures, 5xx and 429 that outlast
the retries are ``RegistryUnavailable`` (retried by the stage's actor). Secrets never
appear in a message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import ipaddress
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from actors.registry_auth import DockerConfigError, RegistryAuth
from events.reference import DEFAULT_REGISTRY
from kernel.docker_config import RegistryCredentials
from kernel.errors import ImageNotFound, PermanentFailure, StorageError, UpstreamError
from kernel.settings import DockerSettings, DownloadSettings

log = logging.getLogger(__name__)

DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_REALM = "auth.docker.io"
MAX_REDIRECTS = 5
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # distribution refuses larger manifests too
_CHUNK = 1024 * 1024
_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 8.0

ProgressCallback = Callable[[int], None]


class RegistryRefused(PermanentFailure):
    """The registry (or its realm) refused us, or answered something no retry will fix."""


class RegistryUnavailable(UpstreamError):
    """A transport failure, 5xx or 429 that outlasted the retries (the stage retries)."""


class ForbiddenTarget(RegistryRefused):
    """A registry, realm or redirect target DCU must not contact (link-local)."""


def _forbidden_address(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_link_local


def check_target(url: str, what: str) -> None:
    """Refuse ``url`` when its host is a link-local literal or its scheme is not HTTP(S).

    Raises ForbiddenTarget. Names are checked again after resolution by GuardedResolver.
    """
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"}:
        raise ForbiddenTarget(f"{what} {_safe_url(url)} is not an http(s) URL")
    host = parts.hostname or ""
    if not host:
        raise ForbiddenTarget(f"{what} {_safe_url(url)} names no host")
    if _forbidden_address(host):
        raise ForbiddenTarget(
            f"{what} {_safe_url(url)} is a link-local address (cloud metadata range); refused"
        )


class GuardedResolver(AbstractResolver):
    """DNS through aiohttp's default resolver, refusing link-local answers: the check
    happens on the addresses actually connected to, after resolution."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        bad = [r["host"] for r in results if _forbidden_address(r["host"])]
        if bad:
            raise ForbiddenTarget(
                f"{host} resolves to link-local {', '.join(sorted(set(bad)))} "
                "(cloud metadata range); refused"
            )
        return results

    async def close(self) -> None:
        await self._inner.close()


def _safe_url(url: str) -> str:
    """``url`` without user info or query (a presigned redirect's query is a credential)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


_CHALLENGE_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "bearer" or "basic", lower-cased
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """``Bearer realm="https://auth.docker.io/token",service="registry.docker.io"`` ->
    Challenge; None for a header that names no scheme."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {
        key.lower(): (quoted if quoted is not None and quoted != "" else bare or "").replace(
            '\\"', '"'
        )
        for key, quoted, bare in _CHALLENGE_PARAM.findall(rest)
    }
    return Challenge(scheme=scheme.lower(), params=params)


def is_loopback_host(host: str) -> bool:
    name = host.lower().strip("[]")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_of(hostport: str) -> str:
    """``127.0.0.1:5000`` -> ``127.0.0.1``; ``[::1]:5000`` -> ``::1``."""
    return urlsplit(f"//{hostport}").hostname or hostport


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One registry to talk to: ``host`` as configured (``docker.io``, ``h:5000``)."""

    host: str
    base_url: str  # scheme://api-host[:port]

    @property
    def netloc(self) -> str:
        return urlsplit(self.base_url).netloc


@dataclass(frozen=True, slots=True)
class Manifest:
    body: bytes
    media_type: str
    digest: str  # sha256 of body


@dataclass(frozen=True, slots=True)
class FetchedBlob:
    digest: str
    size: int
    transferred: int  # bytes received over the network (resumes counted once)
    resumed: int  # how many times a broken transfer resumed with Range


class RegistryClient:
    """One aiohttp session for a worker's registry traffic; tokens cached per scope."""

    def __init__(self, download: DownloadSettings, docker: DockerSettings) -> None:
        self._download = download
        self._allowed = [h.lower() for h in docker.allowed_registries]
        self._auth = RegistryAuth(docker)
        self._session: aiohttp.ClientSession | None = None
        # (registry host, scope) -> (token, expiry): a token only ever goes back to the
        # registry whose challenge it answered.
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._basic: set[str] = set()  # endpoints that asked for basic auth

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=32, resolver=GuardedResolver()),
                timeout=aiohttp.ClientTimeout(
                    sock_connect=self._download.connect_timeout,
                    sock_read=self._download.read_timeout,
                ),
                auto_decompress=False,
                # A proxy would hide the real target from the link-local check.
                trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- endpoints ---------------------------------------------------------------------

    def endpoint(self, host: str) -> Endpoint:
        """The endpoint of registry ``host`` (a reference's ``registry_host`` or a mirror)."""
        host = host.lower()
        api = DOCKER_HUB_API if host == DEFAULT_REGISTRY else host
        insecure = is_loopback_host(_host_of(host)) or host in self._download.insecure_registries
        return Endpoint(host=host, base_url=f"{'http' if insecure else 'https'}://{api}")

    def endpoints(self, host: str) -> list[Endpoint]:
        """Mirrors of ``host`` first (``download.mirrors``), then ``host`` itself."""
        mirrors = self._download.mirrors.get(host.lower(), [])
        return [self.endpoint(m) for m in mirrors] + [self.endpoint(host)]

    def _credentials(self, host: str) -> RegistryCredentials | None:
        try:
            return self._auth.credentials(host)
        except DockerConfigError as exc:
            raise RegistryUnavailable(str(exc)) from None

    def _realm_allowed(self, endpoint: Endpoint, realm_url: str) -> tuple[bool, bool]:
        """(may call the realm, may send credentials to it)."""
        parts = urlsplit(realm_url)
        realm_host = (parts.netloc or "").lower()
        realm_name = (parts.hostname or "").lower()
        # The registry's own host name, on any port: its operator runs both.
        same = realm_name == (urlsplit(endpoint.base_url).hostname or "").lower() or (
            realm_name == _host_of(endpoint.host).lower()
        )
        hub = endpoint.host == DEFAULT_REGISTRY and realm_name == DOCKER_HUB_REALM
        listed = realm_host in self._download.token_realms or realm_name in (
            self._download.token_realms
        )
        trusted = same or hub or listed
        if not self._allowed:
            return True, trusted
        if trusted or realm_host in self._allowed:
            return True, trusted
        return False, False

    # --- auth --------------------------------------------------------------------------

    async def _token(self, endpoint: Endpoint, challenge: Challenge, scope: str) -> str:
        realm = challenge.params.get("realm", "")
        if not realm:
            raise RegistryRefused(f"registry {endpoint.host} sent a Bearer challenge without realm")
        check_target(realm, f"token realm of {endpoint.host}")
        may_call, may_send = self._realm_allowed(endpoint, realm)
        if not may_call:
            raise ForbiddenTarget(
                f"registry {endpoint.host} names token realm {_safe_url(realm)}, whose host is "
                "not allowed (docker.allowed_registries, download.token_realms)"
            )
        if urlsplit(realm).scheme != "https" and not (
            is_loopback_host(urlsplit(realm).hostname or "")
            or (urlsplit(realm).netloc.lower() in self._download.insecure_registries)
        ):
            may_send = False  # never credentials over plain HTTP to a remote host
        key = (endpoint.host, scope)
        cached = self._tokens.get(key)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        query = {"scope": scope}
        if challenge.params.get("service"):
            query["service"] = challenge.params["service"]
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        headers = {}
        creds = self._credentials(endpoint.host)
        if creds is not None and may_send:
            headers["Authorization"] = _basic(creds)
        elif creds is not None:
            log.warning(
                "not sending %s credentials to token realm %s (not the registry's host; "
                "list it in download.token_realms to allow)",
                endpoint.host,
                _safe_url(realm),
            )
        try:
            async with self.session.get(url, headers=headers, allow_redirects=False) as response:
                if response.status in {401, 403}:
                    raise RegistryRefused(
                        f"token realm {_safe_url(realm)} refused "
                        f"{'the credentials' if 'Authorization' in headers else 'anonymous access'}"
                        f" for {scope} (HTTP {response.status})"
                    )
                if response.status >= 500 or response.status == 429:
                    raise _Transient(f"token realm {_safe_url(realm)} answered {response.status}")
                if response.status != 200:
                    raise RegistryRefused(
                        f"token realm {_safe_url(realm)} answered HTTP {response.status}"
                    )
                document = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise _Transient(f"token realm {_safe_url(realm)}: {_describe(exc)}") from None
        token = (
            document.get("token") or document.get("access_token")
            if isinstance(document, dict)
            else None
        )
        if not isinstance(token, str) or not token:
            raise RegistryRefused(f"token realm {_safe_url(realm)} returned no token")
        expires = document.get("expires_in", 60)
        lifetime = float(expires) if isinstance(expires, int | float) and expires > 0 else 60.0
        self._tokens[key] = (token, time.monotonic() + max(lifetime - 10, 5))
        return token

    async def _authorization(self, endpoint: Endpoint, scope: str) -> str | None:
        if endpoint.host in self._basic:
            creds = self._credentials(endpoint.host)
            return _basic(creds) if creds is not None else None
        cached = self._tokens.get((endpoint.host, scope))
        if cached is not None and cached[1] > time.monotonic():
            return f"Bearer {cached[0]}"
        return None

    async def _answer_challenge(self, endpoint: Endpoint, header: str, scope: str) -> str | None:
        """The Authorization value that answers a 401's challenge, or None when the
        registry wants credentials DCU does not have."""
        challenge = parse_challenge(header)
        if challenge is None:
            return None
        if challenge.scheme == "bearer":
            return f"Bearer {await self._token(endpoint, challenge, scope)}"
        if challenge.scheme == "basic":
            creds = self._credentials(endpoint.host)
            if creds is None:
                return None
            if endpoint.base_url.startswith("http://") and not is_loopback_host(
                _host_of(endpoint.host)
            ):
                log.warning("sending basic credentials to %s over plain HTTP", endpoint.host)
            self._basic.add(endpoint.host)
            return _basic(creds)
        return None

    # --- requests ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _open(
        self,
        endpoint: Endpoint,
        path: str,
        scope: str,
        headers: Mapping[str, str],
        what: str,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET ``path`` on ``endpoint``, authenticating and following redirects; yields the
        final response (any status: the caller judges it). Raises ForbiddenTarget,
        RegistryRefused, or _Transient for failures worth another attempt."""
        url = endpoint.base_url + path
        check_target(url, f"registry {endpoint.host}")
        authorization = await self._authorization(endpoint, scope)
        answered = False
        hops = 0
        while True:
            send = dict(headers)
            same_host = urlsplit(url).netloc.lower() == endpoint.netloc.lower()
            if authorization and same_host:
                send["Authorization"] = authorization
            try:
                response = await self.session.get(url, headers=send, allow_redirects=False)
            # (GuardedResolver's ForbiddenTarget comes through aiohttp as it is)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise _Transient(f"{what}: {_describe(exc)}") from None
            try:
                if response.status in {301, 302, 303, 307, 308}:
                    location = response.headers.get("Location", "")
                    hops += 1
                    if not location or hops > MAX_REDIRECTS:
                        raise RegistryRefused(f"{what}: too many or empty redirects")
                    url = urljoin(url, location)
                    check_target(url, f"redirect of {what}")
                    continue
                if response.status == 401 and same_host and not answered:
                    answered = True
                    header = response.headers.get("WWW-Authenticate", "")
                    authorization = await self._answer_challenge(endpoint, header, scope)
                    if authorization is None:
                        raise RegistryRefused(
                            f"{what}: registry {endpoint.host} requires authentication and no "
                            "credentials are configured for it (docker.registries, "
                            "docker.config_file)"
                        )
                    continue
                if response.status in {401, 403}:
                    advice = (
                        f"check the credentials for {endpoint.host}"
                        if self._credentials(endpoint.host) is not None
                        else f"no credentials are configured for {endpoint.host} "
                        "(docker.registries, docker.config_file)"
                    )
                    raise RegistryRefused(
                        f"{what}: registry {endpoint.host} refused access (HTTP "
                        f"{response.status}); {advice}"
                    )
                if response.status == 429 or response.status >= 500:
                    raise _Transient(f"{what}: registry answered HTTP {response.status}")
                yield response
                return
            finally:
                response.release()

    async def _attempts(self, what: str) -> AsyncIterator[int]:
        """Yields attempt numbers with backoff between them (``download.request_attempts``)."""
        attempts = self._download.request_attempts
        for attempt in range(1, attempts + 1):
            yield attempt
            if attempt < attempts:
                delay = min(_BACKOFF_FIRST * 2 ** (attempt - 1), _BACKOFF_MAX)
                await asyncio.sleep(delay)

    async def get_manifest(
        self, endpoint: Endpoint, repository: str, reference: str, accept: str
    ) -> Manifest:
        """The manifest of ``repository`` at a tag or digest, verified against the digest
        when ``reference`` is one. Raises ImageNotFound, RegistryRefused,
        RegistryUnavailable."""
        separator = "@" if ":" in reference else ":"
        what = f"manifest {endpoint.host}/{repository}{separator}{reference}"
        if ":" in reference and not reference.startswith("sha256:"):
            raise RegistryRefused(f"{what}: only sha256 digests are supported")
        path = f"/v2/{repository}/manifests/{reference}"
        scope = f"repository:{repository}:pull"
        last = ""
        async for _attempt in self._attempts(what):
            try:
                async with self._open(endpoint, path, scope, {"Accept": accept}, what) as response:
                    if response.status == 404:
                        raise ImageNotFound(f"{what}: not found (manifest unknown)")
                    if response.status != 200:
                        raise RegistryRefused(f"{what}: registry answered HTTP {response.status}")
                    declared = response.content_length
                    if declared is not None and declared > MAX_MANIFEST_BYTES:
                        raise RegistryRefused(f"{what}: manifest of {declared} bytes is too large")
                    body = await _read_limited(response, MAX_MANIFEST_BYTES, what)
                    media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            except _Transient as exc:
                last = str(exc)
                log.info("%s: %s; retrying", what, last)
                continue
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            if reference.startswith("sha256:") and digest != reference:
                raise RegistryRefused(f"{what}: content does not match its digest ({digest})")
            return Manifest(body=body, media_type=media_type, digest=digest)
        raise RegistryUnavailable(
            f"{what}: failed after {self._download.request_attempts} attempts: {last}"
        )

    async def fetch_blob(
        self,
        endpoint: Endpoint,
        repository: str,
        digest: str,
        size: int,
        dest: Path,
        progress: ProgressCallback | None = None,
    ) -> FetchedBlob:
        """Stream blob ``digest`` into ``dest`` (created or truncated), verifying its size
        and sha256. A transfer that breaks resumes with ``Range`` from the bytes already
        written (a server that ignores Range restarts it from zero).

        Raises ImageNotFound (404), RegistryRefused (digest or size mismatch, refusal),
        RegistryUnavailable (transport failures past the retries), StorageError (disk).
        """
        algorithm, _, expected_hex = digest.partition(":")
        if algorithm != "sha256" or len(expected_hex) != 64:
            raise RegistryRefused(f"blob {digest}: only sha256 digests are supported")
        what = f"blob {digest[:19]} of {endpoint.host}/{repository}"
        path = f"/v2/{repository}/blobs/{digest}"
        scope = f"repository:{repository}:pull"
        hasher = hashlib.sha256()
        written = 0
        transferred = 0
        resumed = 0
        last = ""
        try:
            out = dest.open("wb")
        except OSError as exc:
            raise StorageError(f"cannot write {dest}: {exc.strerror}") from exc
        with out:
            async for _attempt in self._attempts(what):
                headers = {}
                if written:
                    headers["Range"] = f"bytes={written}-"
                try:
                    async with self._open(endpoint, path, scope, headers, what) as response:
                        if response.status == 404:
                            raise ImageNotFound(f"{what}: not found (blob unknown)")
                        if response.status == 416 and written == size:
                            pass  # everything was there already
                        elif response.status == 206 and written:
                            if not response.headers.get("Content-Range", "").startswith(
                                f"bytes {written}-"
                            ):
                                raise RegistryRefused(
                                    f"{what}: asked for bytes from {written}, got "
                                    f"{response.headers.get('Content-Range', 'no range')}"
                                )
                            resumed += 1
                        elif response.status == 200:
                            if written:
                                log.info("%s: server ignored Range, restarting", what)
                                out.seek(0)
                                out.truncate()
                                hasher = hashlib.sha256()
                                written = 0
                        else:
                            raise RegistryRefused(
                                f"{what}: registry answered HTTP {response.status}"
                            )
                        if response.status != 416:
                            async for chunk in response.content.iter_chunked(_CHUNK):
                                if written + len(chunk) > size:
                                    raise RegistryRefused(
                                        f"{what}: more than the {size} bytes the manifest says"
                                    )
                                await asyncio.to_thread(out.write, chunk)
                                hasher.update(chunk)
                                written += len(chunk)
                                transferred += len(chunk)
                                if progress is not None:
                                    progress(len(chunk))
                except _Transient as exc:
                    last = str(exc)
                    log.info("%s: %s after %d bytes; resuming", what, last, written)
                    continue
                except (aiohttp.ClientError, TimeoutError) as exc:
                    last = _describe(exc)
                    log.info("%s: broken after %d bytes (%s); resuming", what, written, last)
                    continue
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        raise StorageError(f"disk full while writing {dest}") from exc
                    raise StorageError(f"cannot write {dest}: {exc.strerror or exc}") from exc
                if written < size:
                    last = f"ended after {written} of {size} bytes"
                    log.info("%s: %s; resuming", what, last)
                    continue
                break
            else:
                raise RegistryUnavailable(
                    f"{what}: failed after {self._download.request_attempts} attempts: {last}"
                )
            out.flush()
        if written != size:
            raise RegistryRefused(f"{what}: got {written} bytes, the manifest says {size}")
        if hasher.hexdigest() != expected_hex:
            raise RegistryRefused(
                f"{what}: content does not match its digest (got sha256:{hasher.hexdigest()})"
            )
        return FetchedBlob(digest=digest, size=size, transferred=transferred, resumed=resumed)


class _Transient(Exception):
    """A failure worth another attempt (transport, 5xx, 429); internal to this module."""


def _basic(creds: RegistryCredentials) -> str:
    pair = f"{creds.username}:{creds.password.get_secret_value()}".encode()
    return "Basic " + base64.b64encode(pair).decode()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "the registry did not answer in time"
    text = str(exc) or type(exc).__name__
    return text.split("?", 1)[0] if "://" in text else text  # no presigned queries


async def _read_limited(response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise RegistryRefused(f"{what}: more than {limit} bytes")
    return bytes(body)


def parse_json_document(body: bytes, what: str) -> dict[str, Any]:
    """``body`` as a JSON object; raises RegistryRefused."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryRefused(f"{what} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise RegistryRefused(f"{what} is not a JSON object")
    return document

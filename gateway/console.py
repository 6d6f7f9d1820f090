"""The web console: a page at ``/`` that drives the API from a browser.

The console is static files (``gateway/static/console``: HTML, CSS and JavaScript
modules, no build step) plus two small routes:

* ``/console/messages.json``: the console's labels (``console.*`` and ``state.*`` of the
  catalogue in ``events.messages``) in the language ``Accept-Language`` asks for, else
  ``server.language``;
* ``/console/download/{task_id}``: ``GET /download/{task_id}`` for a page. A ``fetch``
  cannot read the ``Location`` of a ``307`` without following it, and following it
  cross-origin to S3 needs CORS on the bucket; here the presigned link comes back as a
  ``200`` envelope the page reads, then opens (no credentials needed). With the local
  store the file itself comes back, as from ``/download``.

The page, its files and its labels load without a token (``auth.CONSOLE_OPEN``): the
token is typed into the page, kept in ``sessionStorage`` and sent as a bearer header on
every API call, so ``auth.protect_reads`` guards the data, not the console's code. The
download route is an API read and needs the token as ``/download`` does.

The files are read once at start-up, served from memory with an ETag and
``Cache-Control: no-cache`` (a browser revalidates, so a new release is picked up at
once), and only names found in the directory are served: a request cannot name a path.
Every console answer carries a Content-Security-Policy that allows scripts and styles
from the gateway itself only (the page has no inline script or style), and ``nosniff``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import hdrs, web

from events import messages
from gateway import download, envelope
from gateway import language as gateway_language
from gateway.http import respond
from kernel.errors import NotFound

STATIC = Path(__file__).with_name("static") / "console"
PAGE = "/"
MESSAGES = "/console/messages.json"
FILES = "/console/{name}"
DOWNLOAD = "/console/download/{task_id}"
OPEN_PATHS = frozenset({PAGE, MESSAGES, FILES})
"""The console's routes that answer without a token (``auth.CONSOLE_OPEN`` names them)."""

CONTENT_TYPES: Mapping[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
REVALIDATE = "no-cache"  # keep, but ask the gateway (ETag) before each use


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


class ConsoleFiles(Mapping[str, StaticFile]):
    """The console's files by name, read once from ``directory`` (no subdirectories)."""

    def __init__(self, directory: Path) -> None:
        self._files: dict[str, StaticFile] = {}
        for path in sorted(directory.iterdir()):
            content_type = CONTENT_TYPES.get(path.suffix)
            if content_type is None or not path.is_file():
                continue
            body = path.read_bytes()
            etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
            self._files[path.name] = StaticFile(body, content_type, etag)
        if "index.html" not in self._files:
            raise FileNotFoundError(f"the console's index.html is missing from {directory}")

    def __getitem__(self, name: str) -> StaticFile:
        return self._files[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


CONSOLE_FILES = web.AppKey("console_files", ConsoleFiles)


def secured(response: web.StreamResponse) -> web.StreamResponse:
    response.headers.update(SECURITY_HEADERS)
    return response


def _serve(request: web.Request, name: str) -> web.StreamResponse:
    """Raises NotFound for a name the console does not have."""
    found = request.app[CONSOLE_FILES].get(name)
    if found is None:
        raise NotFound(f"the console has no file {name!r}")
    headers = {hdrs.ETAG: found.etag, hdrs.CACHE_CONTROL: REVALIDATE}
    if found.etag in request.headers.get(hdrs.IF_NONE_MATCH, ""):
        return secured(web.Response(status=304, headers=headers))
    headers[hdrs.CONTENT_TYPE] = found.content_type
    return secured(web.Response(body=found.body, headers=headers))


async def page(request: web.Request) -> web.StreamResponse:
    return _serve(request, "index.html")


async def static_file(request: web.Request) -> web.StreamResponse:
    return _serve(request, request.match_info["name"])


async def labels(request: web.Request) -> web.StreamResponse:
    """The labels in the request's language: ``{"language": "en", "messages": {...}}``."""
    language = gateway_language.of(request)  # the middleware says Vary and Content-Language
    texts = {**messages.catalogue(language, "console."), **messages.catalogue(language, "state.")}
    body = json.dumps({"language": language.value, "messages": texts}, ensure_ascii=False)
    response = web.Response(
        text=body,
        content_type="application/json",
        headers={hdrs.CACHE_CONTROL: REVALIDATE},
    )
    return secured(response)


async def download_for_page(request: web.Request) -> web.StreamResponse:
    """``GET /download/{task_id}``, with the presigned link as a ``200`` envelope instead of
    a ``307`` (see the module's docstring). Raises as ``download.locate`` does."""
    where, headers = await download.locate(request)
    response: web.StreamResponse
    if isinstance(where, Path):
        response = web.FileResponse(where, headers=headers)
    else:
        response = respond(envelope.ok(where, "the archive's download link"))
        response.headers.update(headers)
    response.headers[hdrs.CACHE_CONTROL] = "no-store"
    return response


def setup(app: web.Application, directory: Path = STATIC) -> None:
    """Add the console's routes to ``app``; raises FileNotFoundError when ``directory``
    has no ``index.html`` (a broken install)."""
    app[CONSOLE_FILES] = ConsoleFiles(directory)
    app.router.add_get(PAGE, page)
    app.router.add_get(MESSAGES, labels)
    app.router.add_get(DOWNLOAD, download_for_page)
    app.router.add_get(FILES, static_file)

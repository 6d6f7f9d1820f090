"""The language of a response: ``Accept-Language`` against ``server.language``.

``negotiate_language`` (a middleware) picks it once per request (``events.messages``) and
keeps it under ``LANGUAGE``; the handlers' texts (``state_display``, the envelope's fixed
messages) come from the catalogue in that language. An answer that is not streamed says
which (``Content-Language``) and that it depends on the header (``Vary``), so a cache
never serves one language to a client that asked for another.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from events import messages
from events.messages import Language
from gateway.keys import SETTINGS

LANGUAGE = web.RequestKey("dcu_language", Language)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def of(request: web.Request) -> Language:
    """The request's language (the configured default if the middleware did not run)."""
    language: Language = request.get(LANGUAGE, request.app[SETTINGS].server.language)
    return language


@web.middleware
async def negotiate_language(request: web.Request, handler: Handler) -> web.StreamResponse:
    language = messages.negotiate(
        request.headers.get(hdrs.ACCEPT_LANGUAGE), request.app[SETTINGS].server.language
    )
    request[LANGUAGE] = language
    response = await handler(request)
    if not response.prepared:
        response.headers[hdrs.CONTENT_LANGUAGE] = language.value
        vary = response.headers.get(hdrs.VARY)
        response.headers[hdrs.VARY] = f"{vary}, Accept-Language" if vary else "Accept-Language"
    return response

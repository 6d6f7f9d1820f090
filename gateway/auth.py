"""Bearer tokens: who may change things, and whose name a task is started under.

With ``auth.enabled`` every request that changes something (any method but GET, HEAD and
OPTIONS: ``POST /start``, ``POST /cleanup``) needs ``Authorization: Bearer <token>``
naming one of ``auth.tokens``; with ``auth.protect_reads`` the GET endpoints need it too,
except ``/health``, which container health checks and load balancers poll without one. A
missing or unknown token is ``Unauthorized`` (401 with ``WWW-Authenticate: Bearer``);
requests for unknown routes or with a wrong method keep their 404/405.

Tokens are compared as sha256 digests with ``hmac.compare_digest`` against every entry
(no early exit), so a configured ``sha256:<hex>`` works like the token itself and the
time taken says nothing about which entry, if any, came close. A token is never logged:
the log names the authenticated user, or the reason and the peer address of a refusal.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import hdrs, web
from pydantic import SecretStr

from gateway.keys import API, SETTINGS
from kernel.errors import Unauthorized
from kernel.settings import token_digest

log = logging.getLogger(__name__)

CHALLENGE = 'Bearer realm="dcu"'
SAFE_METHODS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD, hdrs.METH_OPTIONS})
ALWAYS_OPEN = frozenset({f"{API}/health"})
# The web console's page, files and labels (gateway.console.OPEN_PATHS): a browser loads
# them before it has a token. The API calls the console makes stay protected.
CONSOLE_OPEN = frozenset({"/", "/console/messages.json", "/console/{name}"})
USER = web.RequestKey("dcu_user", str)
"""The authenticated name, set on requests that carried a valid token."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class TokenTable:
    """The configured tokens as ``(name, sha256 digest)`` pairs."""

    def __init__(self, tokens: Mapping[str, SecretStr]) -> None:
        self._entries = [
            (name, token_digest(secret.get_secret_value())) for name, secret in tokens.items()
        ]

    def __len__(self) -> int:
        return len(self._entries)

    def identify(self, token: str) -> str | None:
        """The name ``token`` belongs to, or None; compares with every entry."""
        presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found: str | None = None
        for name, digest in self._entries:
            if hmac.compare_digest(presented, digest) and found is None:
                found = name
        return found


TOKENS = web.AppKey("auth_tokens", TokenTable)


def bearer_token(header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header.

    Raises Unauthorized (without echoing the header) when it is missing or not a bearer.
    """
    if not header:
        raise Unauthorized("missing bearer token: send Authorization: Bearer <token>")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("the Authorization header must be: Bearer <token>")
    return token


def _needs_token(request: web.Request) -> bool:
    if request.match_info.http_exception is not None:
        return False  # no such route, or a method the path does not take: 404/405 as usual
    if request.method not in SAFE_METHODS:
        return True
    if not request.app[SETTINGS].auth.protect_reads:
        return False
    resource = request.match_info.route.resource
    return resource is None or resource.canonical not in ALWAYS_OPEN | CONSOLE_OPEN


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate the requests that need it and remember the name under ``USER``.

    Raises Unauthorized when the token is missing or matches no configured one.
    """
    if not request.app[SETTINGS].auth.enabled or not _needs_token(request):
        return await handler(request)
    try:
        name = request.app[TOKENS].identify(bearer_token(request.headers.get(hdrs.AUTHORIZATION)))
        if name is None:
            raise Unauthorized("invalid bearer token")
    except Unauthorized as exc:
        log.warning("%s %s from %s refused: %s", request.method, request.path, request.remote, exc)
        raise
    log.debug("%s %s by %s", request.method, request.path, name)
    request[USER] = name
    return await handler(request)


def setup(app: web.Application) -> None:
    """Load the configured tokens into ``app`` (the middleware is added by create_app)."""
    app[TOKENS] = TokenTable(app[SETTINGS].auth.tokens)

"""Operator endpoints.

``POST /api/dcu/cleanup`` with ``{"kind": "gzip"|"objects", "timeout": 60,
"requested_by": "ops"}`` asks for a cleanup run now: it subscribes to
``<prefix>.cleanup.<kind>.completed`` *before* publishing the ``requested`` event (with a
JetStream acknowledgement), then waits up to ``timeout`` seconds (default 60, at most
600) for the completion naming its request and returns that event as ``data``. When the
run does not finish in time (no cleanup worker running, a long run) it answers ``202``
with code 0 and the request id, so the caller can watch the subject instead.

With ``auth.enabled`` the request needs a bearer token (gateway/auth.py) and
``requested_by`` is the token's name; one in the body is then checked and ignored.

Errors: a body that is not a JSON object, an unknown ``kind`` (the message lists the
kinds) or a ``timeout`` out of range -> 400; a missing or wrong token -> 401; NATS not
acknowledging the request -> 503.
Shutdown answers every waiting request with its ``202`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web

from events import subjects
from events.cleanup import (
    CleanupCompleted,
    CleanupEvent,
    CleanupEventType,
    CleanupKind,
    admin_request,
    parse_kind,
)
from events.schema import DecodeError
from gateway import auth, envelope, views
from gateway.http import read_object, respond
from gateway.keys import API, BUS, SETTINGS
from kernel.errors import InvalidInput

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
MAX_TIMEOUT = 600.0
DEFAULT_REQUESTER = "admin"


class _Waiting:
    """Requests waiting for a completion; shutdown releases them all."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()


WAITING = web.AppKey("cleanup_waiting", _Waiting)


def _timeout(data: dict[str, Any]) -> float:
    value = data.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"timeout must be a number of seconds, got {value!r}")
    if not 0 <= value <= MAX_TIMEOUT:
        raise InvalidInput(f"timeout must be between 0 and {MAX_TIMEOUT:g} seconds")
    return float(value)


def _kind(data: dict[str, Any]) -> CleanupKind:
    if "kind" not in data:
        kinds = ", ".join(k.value for k in CleanupKind)
        raise InvalidInput(f"missing field: kind (one of: {kinds})")
    try:
        return parse_kind(data["kind"])
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


async def request_cleanup(request: web.Request) -> web.Response:
    """Publish a cleanup request and wait for its completion (see the module docstring).

    Raises InvalidInput for a bad body and BusError when NATS does not take the request.
    """
    data = await read_object(request, '{"kind": "gzip"|"objects"}')
    kind = _kind(data)
    timeout = _timeout(data)
    requested_by = DEFAULT_REQUESTER
    if "requested_by" in data:
        requested_by = views.check_username(data["requested_by"])
    requested_by = request.get(auth.USER, requested_by)
    event = admin_request(kind, requested_by)
    prefix = request.app[SETTINGS].nats.subject_prefix
    done_subject = subjects.cleanup(kind, CleanupEventType.COMPLETED, prefix)
    loop = asyncio.get_running_loop()
    completed: asyncio.Future[CleanupEvent] = loop.create_future()

    async def on_completed(subject: str, data: bytes) -> None:
        try:
            done = CleanupEvent.decode(data)
        except DecodeError as exc:
            log.warning("undecodable message on %s: %s", subject, exc)
            return
        if (
            isinstance(done.payload, CleanupCompleted)
            and done.payload.request_id == event.event_id
            and not completed.done()
        ):
            completed.set_result(done)

    bus = request.app[BUS]
    # confirmed by the server before the request is published, so no completion is missed
    subscription = await bus.live([done_subject], on_completed)
    try:
        await bus.publish_raw(subjects.for_cleanup(event, prefix), event.encode(), event.msg_id)
        log.info("cleanup %s: request %s by %s published", kind, event.event_id, requested_by)
        stopping = asyncio.ensure_future(request.app[WAITING].stopping.wait())
        waiters: set[asyncio.Future[Any]] = {completed, stopping}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopping
    finally:
        await subscription.close()
    if completed.done():
        return respond(envelope.ok(completed.result().to_dict(), "cleanup completed"))
    completed.cancel()
    return respond(
        {
            "code": 0,
            "status": 202,
            "message": f"cleanup requested; not completed within {timeout:g} s",
            "data": {
                "request_id": event.event_id,
                "kind": str(kind),
                "subject": done_subject,
            },
        }
    )


async def _release_waiting(app: web.Application) -> None:
    app[WAITING].stopping.set()


def setup(app: web.Application) -> None:
    """Register the admin routes on ``app``; shutdown releases waiting requests."""
    app[WAITING] = _Waiting()
    app.on_shutdown.append(_release_waiting)
    app.router.add_post(f"{API}/cleanup", request_cleanup)

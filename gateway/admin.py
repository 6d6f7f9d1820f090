"""Operator endpoints.

``POST /api/dcu/cleanup`` with ``{"kind": "gzip"|"objects", "timeout": 60,
"requested_by": "ops"}`` asks for a cleanup run now: it subscribes to
``<prefix>.cleanup.<kind>.completed`` *before* publishing the ``requested`` event (with a
JetStream acknowledgement), then waits up to ``timeout`` seconds (default 60, at most
600: ``gateway.models.CleanupRequest``) for the completion naming its request and returns
that event as ``data``. When the run does not finish in time (no cleanup worker running,
a long run) it answers ``202`` with code 0 and the request id, so the caller can watch the
subject instead.

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
    admin_request,
)
from events.schema import DecodeError
from gateway import auth, envelope, models
from gateway.http import parse_body, respond
from gateway.keys import API, BUS, SETTINGS

log = logging.getLogger(__name__)


class _Waiting:
    """Requests waiting for a completion; shutdown releases them all."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()


WAITING = web.AppKey("cleanup_waiting", _Waiting)


async def request_cleanup(request: web.Request) -> web.Response:
    """Publish a cleanup request and wait for its completion (see the module docstring).

    Raises InvalidInput for a bad body and BusError when NATS does not take the request.
    """
    body = await parse_body(request, models.CleanupRequest)
    kind, timeout = body.kind, body.timeout
    requested_by = request.get(auth.USER, body.requested_by)
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
        report = models.CleanupCompletedEvent.model_validate(completed.result().to_dict())
        return respond(envelope.ok(report, "cleanup completed"))
    completed.cancel()
    pending = models.CleanupPending(request_id=event.event_id, kind=kind, subject=done_subject)
    message = f"cleanup requested; not completed within {timeout:g} s"
    return respond(envelope.ok(pending, message, status=202))


async def _release_waiting(app: web.Application) -> None:
    app[WAITING].stopping.set()


def setup(app: web.Application) -> None:
    """Register the admin routes on ``app``; shutdown releases waiting requests."""
    app[WAITING] = _Waiting()
    app.on_shutdown.append(_release_waiting)
    app.router.add_post(f"{API}/cleanup", request_cleanup)

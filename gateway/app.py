"""The aiohttp application: routes, the error middleware and the resources it owns.

Resources (NATS connection, database, optional persistence subscriber) live in
``app.cleanup_ctx``: opened before ``yield``, closed after it, in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from dcu import bus
from dcu.errors import DcuError, InvalidInput, NotFound, TooManyRequests, Unauthorized
from dcu.settings import Settings
from events.platform import InvalidPlatform, parse_platform
from events.reference import InvalidReference, parse_reference, registry_refusal
from events.schema import Event, Requested
from events.states import TaskState
from gateway import admin, auth, envelope, events_api, openapi, views
from gateway.http import read_object, respond
from gateway.keys import API, JETSTREAM, NATS, NATS_URL, SETTINGS
from persistence import repository
from persistence.database import close_database, init_database
from persistence.runner import subscriber_running

log = logging.getLogger(__name__)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Serialises the per-user limit's count-then-create within this gateway.
START_LOCK = web.AppKey("start_lock", asyncio.Lock)


@web.middleware
async def envelope_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as the envelope with a precise message; never a bare 500."""
    try:
        return await handler(request)
    except DcuError as exc:
        body = envelope.for_error(exc)
        if body["status"] >= 500:
            log.error("%s %s: %s", request.method, request.path, exc)
        response = respond(body)
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = auth.CHALLENGE
        return response
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].server.max_body_bytes
        return respond(envelope.for_status(413, f"request body larger than {limit} bytes"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = respond(envelope.for_status(exc.status, exc.reason))
        if "Allow" in exc.headers:  # a 405 names the methods the path takes (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return respond(envelope.failure(*envelope.INTERNAL, "internal error"))


async def start_task(request: web.Request) -> web.Response:
    """Validate the request and publish ``requested``.

    With a token the task's username is the token's name (a ``username`` in the body is
    still validated, then ignored). An optional ``platform`` (``linux/arm64``) goes into the
    event normalised; absent, the download stage uses ``download.platform``. Raises
    InvalidInput for a bad body, a bad reference or platform, or a registry outside
    ``docker.allowed_registries``, TooManyRequests when the user is at
    ``server.max_active_tasks_per_user``, BusError when NATS does not take the event.
    """
    data = await read_object(request)
    authenticated = request.get(auth.USER)
    if authenticated is None and "username" not in data:
        raise InvalidInput("missing field: username")
    if "docker_image_name" not in data:
        raise InvalidInput("missing field: docker_image_name")
    username = views.check_username(data["username"]) if "username" in data else ""
    if authenticated is not None:
        username = authenticated  # the token's name wins; the body's was only checked
    try:
        ref = parse_reference(data["docker_image_name"])
    except InvalidReference as exc:
        raise InvalidInput(str(exc)) from None
    if len(ref.original) > 500:
        raise InvalidInput("docker_image_name is longer than 500 characters")
    settings = request.app[SETTINGS]
    refusal = registry_refusal(ref, settings.docker.allowed_registries)
    if refusal is not None:
        raise InvalidInput(refusal)
    platform = None
    if "platform" in data:
        try:
            platform = str(parse_platform(data["platform"]))
        except InvalidPlatform as exc:
            raise InvalidInput(str(exc)) from None
    event = Event(
        task_id=str(uuid.uuid4()),
        payload=Requested(username=username, docker_image_name=ref.original, platform=platform),
    )
    limit = settings.server.max_active_tasks_per_user
    if limit:
        async with request.app[START_LOCK]:
            active = await repository.count_active(username)
            if active >= limit:
                log.warning(
                    "start by %s refused: %d unfinished tasks, limit %d", username, active, limit
                )
                raise TooManyRequests(
                    f"user {username} already has {active} unfinished tasks, the limit is "
                    f"{limit}; try again when one has ended"
                )
            await _publish_requested(request, event)
    else:
        await _publish_requested(request, event)
    log.info(
        "task %s: requested %s for %s by %s",
        event.task_id,
        ref,
        platform or "the default platform",
        username,
    )
    return respond(
        envelope.ok({"task_id": event.task_id, "state": TaskState.IDLE.value}, envelope.STARTED)
    )


async def _publish_requested(request: web.Request, event: Event) -> None:
    settings = request.app[SETTINGS]
    await bus.publish(request.app[JETSTREAM], event, settings.nats.subject_prefix)
    # The subscriber records the same event; recording it here as well means a status
    # query (or the per-user count) right after this response can never miss the task.
    await repository.create_if_absent(event)


async def task_status(request: web.Request) -> web.Response:
    task_id = views.check_task_id(request.match_info["task_id"])
    try:
        task = await repository.get(task_id)
    except NotFound:
        raise NotFound(f"task {task_id} not found") from None
    detail = await repository.get_detail(task_id)
    return respond(envelope.ok(views.task_view(task, datetime.now(UTC), _detail_view(detail))))


def _detail_view(detail: repository.TaskDetailRecord | None) -> dict[str, Any]:
    if detail is None:
        return {}
    total = detail.stage_bytes_total
    done = detail.stage_bytes_done
    percent = None
    if total and done is not None:
        percent = round(min(100.0, 100.0 * done / total), 1)
    return {
        "image_id": detail.image_id,
        "archive_bytes": detail.archive_bytes,
        "archive_sha256": detail.archive_sha256,
        "stage": detail.stage,
        "stage_progress": percent,
        "stage_bytes_done": done,
        "stage_bytes_total": total,
        "stage_rate": detail.stage_rate,
        "platform": detail.platform,
        "manifest_digest": detail.manifest_digest,
        "engine": detail.engine,
        "reused": detail.reused,
        "download_bytes_fetched": detail.fetched_bytes,
        "download_bytes_cached": detail.cached_bytes,
    }


async def query_tasks(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    params = views.parse_query(request.query, settings.server.max_page_size)
    total, items = await repository.query(
        docker_image_name=params.docker_image_name,
        username=params.username,
        state=params.state,
        page=params.page,
        page_size=params.page_size,
    )
    now = datetime.now(UTC)
    return respond(envelope.ok({"total": total, "items": [views.task_view(t, now) for t in items]}))


async def health(request: web.Request) -> web.Response:
    nc = request.app[NATS]
    checks = {"nats": "connected" if nc.is_connected else "disconnected"}
    try:
        await repository.ping()
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    healthy = checks["nats"] == "connected" and checks["database"] == "ok"
    if healthy:
        return respond(envelope.ok({"status": "ok", **checks}))
    body = envelope.failure(503, 50300, "unhealthy")
    body["data"] = {"status": "unhealthy", **checks}
    return respond(body)


async def _nats_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    nc = await bus.connect(app[NATS_URL], settings.nats, "dcu-gateway")
    js = nc.jetstream()
    await bus.ensure_stream(js, settings.nats)
    app[NATS] = nc
    app[JETSTREAM] = js
    yield
    await nc.drain()


async def _database_ctx(app: web.Application) -> AsyncIterator[None]:
    await init_database(app[SETTINGS].database.tortoise_url())
    yield
    await close_database()


async def _persistence_ctx(app: web.Application) -> AsyncIterator[None]:
    async with subscriber_running(app[SETTINGS], app[NATS_URL]):
        yield


def create_app(
    settings: Settings, nats_url: str, *, with_persistence: bool = False
) -> web.Application:
    """The gateway; ``with_persistence`` also runs the persistence subscriber in it."""
    app = web.Application(
        middlewares=[envelope_errors, auth.require_token],
        client_max_size=settings.server.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[NATS_URL] = nats_url
    app[START_LOCK] = asyncio.Lock()
    auth.setup(app)
    app.cleanup_ctx.append(_database_ctx)
    app.cleanup_ctx.append(_nats_ctx)
    if with_persistence:
        app.cleanup_ctx.append(_persistence_ctx)
    app.router.add_post(f"{API}/start", start_task)
    app.router.add_get(f"{API}/status/{{task_id}}", task_status)
    app.router.add_get(f"{API}/query", query_tasks)
    app.router.add_get(f"{API}/health", health)
    events_api.setup(app)
    admin.setup(app)
    openapi.setup(app)
    return app

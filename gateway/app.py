"""The aiohttp application: routes, the error middleware and the resources it owns.

Resources (NATS connection, database, optional persistence subscriber) live in
``app.cleanup_ctx``: opened before ``yield``, closed after it, in reverse order.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from dcu import bus
from dcu.errors import DcuError, InvalidInput, NotFound
from dcu.settings import Settings
from events.reference import InvalidReference, parse_reference
from events.schema import Event, Requested
from events.states import TaskState
from gateway import admin, envelope, events_api, openapi, views
from gateway.keys import API, JETSTREAM, NATS, NATS_URL, SETTINGS
from persistence import repository
from persistence.database import close_database, init_database
from persistence.runner import subscriber_running

log = logging.getLogger(__name__)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: dict[str, Any]) -> web.Response:
    return web.json_response(
        body, status=body["status"], dumps=lambda obj: json.dumps(obj, ensure_ascii=False)
    )


@web.middleware
async def envelope_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as the envelope with a precise message; never a bare 500."""
    try:
        return await handler(request)
    except DcuError as exc:
        body = envelope.for_error(exc)
        if body["status"] >= 500:
            log.error("%s %s: %s", request.method, request.path, exc)
        return _json(body)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].server.max_body_bytes
        return _json(envelope.for_status(413, f"request body larger than {limit} bytes"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _json(envelope.for_status(exc.status, exc.reason))
        if "Allow" in exc.headers:  # a 405 names the methods the path takes (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _json(envelope.failure(*envelope.INTERNAL, "internal error"))


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        raise InvalidInput("request body is empty; expected a JSON object")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
    return data


async def start_task(request: web.Request) -> web.Response:
    data = await _body(request)
    for field in ("username", "docker_image_name"):
        if field not in data:
            raise InvalidInput(f"missing field: {field}")
    username = views.check_username(data["username"])
    try:
        ref = parse_reference(data["docker_image_name"])
    except InvalidReference as exc:
        raise InvalidInput(str(exc)) from None
    if len(ref.original) > 500:
        raise InvalidInput("docker_image_name is longer than 500 characters")
    event = Event(
        task_id=str(uuid.uuid4()),
        payload=Requested(username=username, docker_image_name=ref.original),
    )
    settings = request.app[SETTINGS]
    await bus.publish(request.app[JETSTREAM], event, settings.nats.subject_prefix)
    # The subscriber records the same event; recording it here as well means a status
    # query right after this response can never miss the task.
    await repository.create_if_absent(event)
    log.info("task %s: requested %s by %s", event.task_id, ref, username)
    return _json(
        envelope.ok({"task_id": event.task_id, "state": TaskState.IDLE.value}, envelope.STARTED)
    )


async def task_status(request: web.Request) -> web.Response:
    task_id = views.check_task_id(request.match_info["task_id"])
    try:
        task = await repository.get(task_id)
    except NotFound:
        raise NotFound(f"task {task_id} not found") from None
    detail = await repository.get_detail(task_id)
    return _json(envelope.ok(views.task_view(task, datetime.now(UTC), _detail_view(detail))))


def _detail_view(detail: Any) -> dict[str, Any]:
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
    return _json(envelope.ok({"total": total, "items": [views.task_view(t, now) for t in items]}))


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
        return _json(envelope.ok({"status": "ok", **checks}))
    body = envelope.failure(503, 50300, "unhealthy")
    body["data"] = {"status": "unhealthy", **checks}
    return _json(body)


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
        middlewares=[envelope_errors], client_max_size=settings.server.max_body_bytes
    )
    app[SETTINGS] = settings
    app[NATS_URL] = nats_url
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

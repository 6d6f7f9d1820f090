"""The aiohttp application: routes, the error middleware and the resources it owns.

Resources (the database and the NATS connection) live in ``app.cleanup_ctx``: opened
before ``yield``, closed after it, in reverse order. Handlers reach them through the
typed keys of ``gateway.keys`` (``REPOSITORY``, ``BUS``); nothing here is module-global.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Literal

from aiohttp import web

from bus import Bus
from gateway import (
    admin,
    asyncapi,
    auth,
    console,
    download,
    envelope,
    events_api,
    language,
    metrics,
    models,
    openapi,
    start,
)
from gateway.http import parse_path, parse_query, respond
from gateway.keys import API, BUS, REPOSITORY, SETTINGS
from kernel.errors import DcuError, NotFound, Unauthorized
from kernel.settings import Settings
from persistence.database import Database
from persistence.repository import TaskRepository

log = logging.getLogger(__name__)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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


async def task_status(request: web.Request) -> web.Response:
    """The task's row; without one (the subscriber has not recorded it yet), the task as
    its ``requested`` event in the stream shows it, idle. Raises NotFound when neither
    knows it, BusError when the stream cannot be read, DatabaseError."""
    task_id = parse_path(request, models.TaskPath).task_id
    task: models.TaskLike
    repository = request.app[REPOSITORY]
    try:
        task = await repository.get(task_id)
    except NotFound:
        found = await start.stream_task(request.app, task_id)
        if found is None:
            raise NotFound(f"task {task_id} not found") from None
        task, detail = found
    else:
        detail = await repository.get_detail(task_id)
    now = datetime.now(UTC)
    if detail is None:
        return respond(envelope.ok(models.Task.of(task, now, language.of(request))))
    answer = models.TaskDetail.with_detail(task, now, detail, language.of(request))
    return respond(envelope.ok(answer))


async def query_tasks(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    query = parse_query(request, models.task_query(settings.server.max_page_size))
    total, items = await request.app[REPOSITORY].query(
        docker_image_name=query.docker_image_name,
        username=query.username,
        state=query.state,
        page=query.page,
        page_size=query.page_size,
    )
    now = datetime.now(UTC)
    in_language = language.of(request)
    answers = [models.Task.of(task, now, in_language) for task in items]
    page = models.TaskPage(total=total, items=answers)
    return respond(envelope.ok(page))


async def health(request: web.Request) -> web.Response:
    nats: Literal["connected", "disconnected"] = (
        "connected" if request.app[BUS].connected else "disconnected"
    )
    try:
        await request.app[REPOSITORY].ping()
        database = "ok"
    except Exception as exc:
        database = f"error: {type(exc).__name__}"
    if nats == "connected" and database == "ok":
        return respond(envelope.ok(models.Health(status="ok", nats=nats, database=database)))
    report = models.Health(status="unhealthy", nats=nats, database=database)
    return respond(envelope.failure(503, 50300, "unhealthy", report))


async def _nats_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[BUS] = await Bus.connect(settings.nats.url, settings.nats, "dcu-gateway")
    yield
    await app[BUS].close()


async def _database_ctx(app: web.Application) -> AsyncIterator[None]:
    database = await Database.open(app[SETTINGS].database.tortoise_url())
    app[REPOSITORY] = TaskRepository(database)
    yield
    await database.close()


def create_app(settings: Settings) -> web.Application:
    """The gateway on ``settings`` (``settings.nats.url`` is the NATS it publishes to)."""
    app = web.Application(
        middlewares=[language.negotiate_language, envelope_errors, auth.require_token],
        client_max_size=settings.server.max_body_bytes,
    )
    app[SETTINGS] = settings
    start.setup(app)
    auth.setup(app)
    app.cleanup_ctx.append(_database_ctx)
    app.cleanup_ctx.append(_nats_ctx)
    app.router.add_post(f"{API}/start", start.start_task)
    app.router.add_post(f"{API}/bundle", start.start_bundle)
    app.router.add_get(f"{API}/status/{{task_id}}", task_status)
    app.router.add_get(f"{API}/query", query_tasks)
    app.router.add_get(f"{API}/health", health)
    events_api.setup(app)
    download.setup(app)
    admin.setup(app)
    openapi.setup(app)
    asyncapi.setup(app)
    metrics.setup(app)
    console.setup(app)
    return app

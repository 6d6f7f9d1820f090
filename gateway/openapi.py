"""The service's OpenAPI 3.1 document, served at ``/api/dcu/openapi.json``, generated from
the models the handlers validate and answer with (``gateway.models``).

``_operations`` says, for each route, which models are its path, query, headers, body and
answers; the parameters, bodies and schemas (every constraint, enum and description) are
pydantic's JSON Schema of those models. ``document`` is built each time it is asked for,
from the routes the app has at that moment: an operation appears only when its route is
registered, and a registered route not in ``_operations`` still appears, as an
envelope-only operation marked ``x-undescribed``, so the document never omits an endpoint
nor names one the app lacks.

The document itself is plain OpenAPI, not wrapped in the envelope, so tools load it as is.
Every other response, errors included, is the envelope (``#/components/schemas/Envelope``):
``code`` 0 exactly when the HTTP status is 2xx, ``status`` equal to the HTTP status.

Security follows the settings (gateway/auth.py): with ``auth.enabled`` off, POST
operations accept an optional bearer token; on, they require one (and ``/start`` takes
its username from it, so its body's ``username`` is optional); with
``auth.protect_reads`` every GET but ``auth.ALWAYS_OPEN`` requires one as well and
documents the 401.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from aiohttp import web
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue
from pydantic_core import core_schema

from gateway import asyncapi, auth, envelope, models
from gateway.keys import API, SETTINGS
from kernel.settings import AuthSettings, Settings

PATH = "/openapi.json"
VERSION = "3.1.0"

Schema = dict[str, Any]

_REF = "#/components"
_PARAMETER = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
_OPEN_READS = {path.removeprefix(API) for path in auth.ALWAYS_OPEN}


class _Generator(GenerateJsonSchema):
    """Pydantic's JSON Schema, without a title per field, and without ``"default": null``
    (an optional input field is absent, not null: see ``gateway.models``)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        json_schema = super().default_schema(schema)
        if "default" in json_schema and json_schema["default"] is None:
            del json_schema["default"]
        return json_schema


# --- operations ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful answer: the envelope with ``data`` of type ``data`` (a response model
    or a union of them), or, for the few answers that are not the envelope, ``content``."""

    description: str
    data: Any = None
    content: Schema | None = None


@dataclass(frozen=True, slots=True)
class Operation:
    operation_id: str
    tag: str
    summary: str
    replies: Mapping[int, Reply]
    errors: tuple[str, ...] = ()
    description: str = ""
    path: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    headers: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    extra_responses: Mapping[str, Schema] = field(default_factory=dict)


_SSE = {"text/event-stream": {"schema": {"type": "string"}}}
_SSE_DESCRIPTION = (
    "Server-sent events: `id: <event_id>`, `event: <type>`, `data: <event JSON>`; "
    "`: keep-alive` comments during silence."
)


def _operations(settings: Settings) -> dict[str, dict[str, Operation]]:
    """Path (below ``API``) -> method -> operation, for every route of the gateway."""
    start_body = models.TokenStartRequest if settings.auth.enabled else models.StartRequest
    bundle_body = models.TokenBundleRequest if settings.auth.enabled else models.BundleRequest
    start_errors = (
        "BadRequest",
        "Unauthorized",
        "Conflict",
        "PayloadTooLarge",
        "TooManyRequests",
        "Unavailable",
    )
    return {
        "/start": {
            "post": Operation(
                "startTask",
                "tasks",
                "Request a task: pull, compress and upload one image.",
                description="Answers once the `requested` event is stored in JetStream; the "
                "task's row follows from it (`/status` shows the task at once). With an "
                "`Idempotency-Key` the task id follows from the username and the key: a "
                "repeated start answers the same task, and starts no other.",
                headers=models.StartHeaders,
                body=start_body,
                replies={
                    200: Reply(
                        f"The task was requested (message `{envelope.STARTED}`).",
                        models.StartResult,
                    )
                },
                errors=start_errors,
            )
        },
        "/bundle": {
            "post": Operation(
                "startBundle",
                "tasks",
                "Request a bundle: one archive of several images, each layer stored once.",
                description="A task like `POST /start`'s (same answer, status, events and "
                "`Idempotency-Key`), whose `docker_image_name` is the bundle's `name`. The "
                "archive holds every image with its tag; `/status` lists the images and the "
                "bytes saved by sharing layers (`shared_bytes`). Needs the registry engine.",
                headers=models.StartHeaders,
                body=bundle_body,
                replies={
                    200: Reply(
                        f"The bundle was requested (message `{envelope.STARTED}`).",
                        models.StartResult,
                    )
                },
                errors=start_errors,
            )
        },
        "/status/{task_id}": {
            "get": Operation(
                "getTask",
                "tasks",
                "One task, with its live stage figures.",
                description="Until the persistence subscriber has recorded a task just "
                "started, its `requested` event in the stream answers for it (`idle`).",
                path=models.TaskPath,
                replies={200: Reply("The task.", models.TaskDetail | models.Task)},
                errors=("BadRequest", "NotFound", "Unavailable"),
            )
        },
        "/download/{task_id}": {
            "get": Operation(
                "downloadArchive",
                "tasks",
                "A completed task's archive, without S3 credentials.",
                description="With S3 the answer is a `307` to a URL presigned for "
                "`minio.download_url_expiry` seconds; with the local store the file itself, "
                "`Range` requests included. `X-Checksum-Sha256` carries the recorded sha256. "
                "A task that has not completed is a `409`; an archive already removed by the "
                "cleanup a `404`.",
                path=models.TaskPath,
                replies={
                    200: Reply(
                        "The archive (local store).",
                        content={
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            }
                        },
                    ),
                    307: Reply("Redirect to the archive (S3): `Location`.", models.DownloadLink),
                },
                errors=("BadRequest", "Unauthorized", "NotFound", "Conflict", "Unavailable"),
            )
        },
        "/query": {
            "get": Operation(
                "queryTasks",
                "tasks",
                "Tasks matching every filter given, newest first.",
                query=models.task_query(settings.server.max_page_size),
                replies={200: Reply("One page of tasks and the total matching.", models.TaskPage)},
                errors=("BadRequest", "Unavailable"),
            )
        },
        "/health": {
            "get": Operation(
                "health",
                "meta",
                "Whether NATS and the database answer.",
                replies={200: Reply("Healthy.", models.Health)},
                extra_responses={
                    "503": _json(
                        "NATS or the database does not answer; `data` says which.",
                        _envelope(503, _ref("schemas", "Health")),
                    )
                },
            )
        },
        "/events/{task_id}": {
            "get": Operation(
                "getTaskEvents",
                "events",
                "The task's events as stored in the stream.",
                path=models.TaskPath,
                query=models.EventsQuery,
                replies={200: Reply("The events, oldest first.", models.EventHistory)},
                errors=("BadRequest", "NotFound", "Unavailable", "GatewayTimeout"),
            )
        },
        "/events/{task_id}/stream": {
            "get": Operation(
                "streamTaskEvents",
                "events",
                "The task's events so far, then live ones until it ends (SSE).",
                path=models.TaskPath,
                query=models.EventsQuery,
                headers=models.StreamHeaders,
                replies={
                    200: Reply(_SSE_DESCRIPTION, content=_SSE),
                    204: Reply("The client already has the terminal event."),
                },
                errors=("BadRequest", "NotFound", "Unavailable", "GatewayTimeout"),
            )
        },
        "/events/stream": {
            "get": Operation(
                "streamAllEvents",
                "events",
                "Every task's live events, optionally of one type (SSE).",
                query=models.LiveEventsQuery,
                replies={200: Reply(_SSE_DESCRIPTION, content=_SSE)},
                errors=("BadRequest", "Unavailable"),
            )
        },
        "/cleanup": {
            "post": Operation(
                "startCleanup",
                "admin",
                "Run the gzip or object cleanup now.",
                body=models.CleanupRequest,
                replies={
                    200: Reply(
                        "The run finished; `data` is its completed event.",
                        models.CleanupCompletedEvent,
                    ),
                    202: Reply(
                        "The run was requested but did not finish within `timeout`.",
                        models.CleanupPending,
                    ),
                },
                errors=("BadRequest", "Unauthorized", "PayloadTooLarge", "Unavailable"),
            )
        },
        PATH: {
            "get": Operation(
                "getOpenApi",
                "meta",
                "This document (plain OpenAPI, not in the envelope).",
                replies={
                    200: Reply(
                        "The OpenAPI document.",
                        content={"application/json": {"schema": {"type": "object"}}},
                    )
                },
            )
        },
        asyncapi.PATH: {
            "get": Operation(
                "getAsyncApi",
                "meta",
                "The AsyncAPI 3.0.0 document of the `dcu.*` subjects other systems may "
                "subscribe to, generated from the event models (plain AsyncAPI, not in the "
                "envelope).",
                replies={
                    200: Reply(
                        "The AsyncAPI document.",
                        content={"application/json": {"schema": {"type": "object"}}},
                    )
                },
            )
        },
    }


# --- schemas ---------------------------------------------------------------------------


def _ref(kind: str, name: str) -> Schema:
    return {"$ref": f"{_REF}/{kind}/{name}"}


def _definitions(
    types: Iterable[tuple[Any, JsonSchemaMode]],
) -> tuple[dict[tuple[Any, JsonSchemaMode], Schema], dict[str, Schema]]:
    """The schema of each ``(type, mode)`` (a reference for a model) and every schema they
    refer to, all generated together so that each model is one component."""
    keys = list(dict.fromkeys(types))
    generator = _Generator(ref_template=f"{_REF}/schemas/{{model}}")
    inputs = [(key, key[1], TypeAdapter(key[0]).core_schema) for key in keys]
    mapping, definitions = generator.generate_definitions(inputs)
    return {key: mapping[(key, key[1])] for key in keys}, {
        str(k): v for k, v in definitions.items()
    }


def _one_line(node: Any) -> Any:
    """``node`` with each ``description`` on one line (the models' docstrings wrap)."""
    if isinstance(node, list):
        return [_one_line(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {
        key: " ".join(value.split())
        if key == "description" and isinstance(value, str)
        else _one_line(value)
        for key, value in node.items()
    }


def _inline(schema: Any, definitions: Mapping[str, Schema]) -> Any:
    """``schema`` with its local references replaced by what they name (parameters carry
    their whole schema), less the titles pydantic gives to models and enums."""
    if isinstance(schema, list):
        return [_inline(item, definitions) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        named = definitions[schema["$ref"].rsplit("/", 1)[-1]]
        return _inline({**named, **{k: v for k, v in schema.items() if k != "$ref"}}, definitions)
    return {key: _inline(value, definitions) for key, value in schema.items() if key != "title"}


def _parameters(model: type[BaseModel] | None, where: str) -> list[Schema]:
    """One parameter ``in`` ``where`` per field of ``model``; a query parameter's empty
    value is taken as none (``gateway.http.parse_query``)."""
    if model is None:
        return []
    schema = model.model_json_schema(schema_generator=_Generator, mode="validation")
    required = set(schema.get("required", ()))
    parameters = []
    for name, prop in schema["properties"].items():
        prop = _inline(prop, schema.get("$defs", {}))
        parameter: Schema = {"name": name, "in": where, "required": where == "path"}
        parameter["required"] = parameter["required"] or name in required
        if where == "query":
            parameter["allowEmptyValue"] = True
        if "description" in prop:
            parameter["description"] = prop.pop("description")
        parameter["schema"] = prop
        parameters.append(parameter)
    return parameters


def _envelope(status: int, data: Schema) -> Schema:
    """The envelope with ``status`` and its ``code`` pinned (0 for 2xx, else status*100)."""
    code = 0 if 200 <= status < 300 else status * 100
    fixed: Schema = {
        "type": "object",
        "properties": {
            "code": {"type": "integer", "enum": [code]},
            "status": {"type": "integer", "enum": [status]},
            "data": data,
        },
    }
    return {"allOf": [_ref("schemas", "Envelope"), fixed]}


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_NO_DATA: Schema = {"type": "null"}
_ERRORS: dict[str, tuple[int, str]] = {
    "BadRequest": (400, "Malformed input; `message` names the problem."),
    "Unauthorized": (401, "Only with `auth.enabled`: the bearer token is missing or wrong."),
    "NotFound": (404, "No such task, or an unknown route."),
    "MethodNotAllowed": (405, "A method the path does not take (any path)."),
    "Conflict": (
        409,
        "The `Idempotency-Key` was used for a different request (another image or platform).",
    ),
    "PayloadTooLarge": (413, "The body is larger than `server.max_body_bytes`."),
    "TooManyRequests": (
        429,
        "The user already has `server.max_active_tasks_per_user` unfinished tasks.",
    ),
    "Unavailable": (503, "NATS or the database failed; try again."),
    "GatewayTimeout": (504, "NATS did not answer in time; try again."),
}
_HEADERS = {"Unauthorized": "WWW-Authenticate", "MethodNotAllowed": "Allow"}


def _responses() -> dict[str, Schema]:
    """The error answers, each the envelope with ``data`` null."""
    responses = {}
    for name, (status, description) in _ERRORS.items():
        response = _json(description, _envelope(status, _NO_DATA))
        if name in _HEADERS:
            response["headers"] = {_HEADERS[name]: {"schema": {"type": "string"}}}
        responses[name] = response
    return responses


def _operation(
    operation: Operation, schemas: Mapping[tuple[Any, JsonSchemaMode], Schema]
) -> Schema:
    built: Schema = {
        "operationId": operation.operation_id,
        "tags": [operation.tag],
        "summary": operation.summary,
    }
    if operation.description:
        built["description"] = operation.description
    parameters = [
        *_parameters(operation.path, "path"),
        *_parameters(operation.query, "query"),
        *_parameters(operation.headers, "header"),
    ]
    if parameters:
        built["parameters"] = parameters
    if operation.body is not None:
        schema = schemas[(operation.body, "validation")]
        built["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    responses: Schema = {}
    for status, reply in operation.replies.items():
        if reply.data is not None:
            data = schemas[(reply.data, "serialization")]
            responses[str(status)] = _json(reply.description, _envelope(status, data))
        elif reply.content is not None:
            responses[str(status)] = {"description": reply.description, "content": reply.content}
        else:
            responses[str(status)] = {"description": reply.description}
    responses.update(operation.extra_responses)
    responses.update({str(_ERRORS[name][0]): _ref("responses", name) for name in operation.errors})
    built["responses"] = responses
    return built


def _schemas(
    operations: Iterable[Operation],
) -> tuple[dict[tuple[Any, JsonSchemaMode], Schema], dict[str, Schema]]:
    """The schema of every body and answer of ``operations``, and the components."""
    wanted: list[tuple[Any, JsonSchemaMode]] = [(envelope.Envelope, "serialization")]
    for operation in operations:
        if operation.body is not None:
            wanted.append((operation.body, "validation"))
        wanted.extend((r.data, "serialization") for r in operation.replies.values() if r.data)
    return _definitions(wanted)


# --- the document ----------------------------------------------------------------------


def _undescribed(path: str) -> Schema:
    """A registered route nobody described yet: its parameters and the envelope."""
    return {
        "summary": "Not described yet.",
        "x-undescribed": True,
        "parameters": [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PARAMETER.findall(path)
        ],
        "responses": {"default": _json("The envelope.", _ref("schemas", "Envelope"))},
    }


_OPTIONAL_AUTH: list[dict[str, list[str]]] = [{}, {"bearerAuth": []}]
_REQUIRED_AUTH: list[dict[str, list[str]]] = [{"bearerAuth": []}]


def _secured(path: str, method: str, operation: Schema, auth_settings: AuthSettings) -> Schema:
    """``operation`` with the security the settings give it (see the module docstring)."""
    if method not in {"get", "head", "options"}:
        security = _REQUIRED_AUTH if auth_settings.enabled else _OPTIONAL_AUTH
        responses = {**operation["responses"], "401": _ref("responses", "Unauthorized")}
        return {**operation, "security": security, "responses": responses}
    if auth_settings.enabled and auth_settings.protect_reads and path not in _OPEN_READS:
        responses = {**operation["responses"], "401": _ref("responses", "Unauthorized")}
        return {**operation, "security": _REQUIRED_AUTH, "responses": responses}
    return operation


def _scheme_description(auth_settings: AuthSettings) -> str:
    if not auth_settings.enabled:
        return "Not enforced (auth.enabled is off); POST endpoints accept it."
    open_reads = ", ".join(sorted(_OPEN_READS))
    reads = f"and every GET but {open_reads} " if auth_settings.protect_reads else ""
    return (
        f"Required by POST endpoints {reads}(auth.enabled); "
        "`POST /start` takes the task's username from the token's name."
    )


def _routes(app: web.Application) -> list[tuple[str, str]]:
    """``(path below API, lower-case method)`` of every route, in registration order;
    HEAD (aiohttp's automatic twin of GET) and catch-all routes are left out."""
    found: list[tuple[str, str]] = []
    for route in app.router.routes():
        method = route.method.lower()
        canonical = route.resource.canonical if route.resource is not None else ""
        if method in {"head", "*"} or not canonical.startswith(f"{API}/"):
            continue
        key = (_PARAMETER.sub(r"{\1}", canonical[len(API) :]), method)
        if key not in found:
            found.append(key)
    return found


def _version() -> str:
    try:
        return metadata.version("dcu")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document for the routes ``app`` has now."""
    settings = app[SETTINGS]
    described = _operations(settings)
    schemas, components = _schemas(op for item in described.values() for op in item.values())
    paths: dict[str, dict[str, Schema]] = {}
    for path, method in _routes(app):
        found = described.get(path, {}).get(method)
        operation = _undescribed(path) if found is None else _operation(found, schemas)
        paths.setdefault(path, {})[method] = _secured(path, method, operation, settings.auth)
    built = {
        "openapi": VERSION,
        "info": {
            "title": "DCU",
            "version": _version(),
            "description": "Download-Compress-Upload: package container images as "
            "docker-loadable .tar.gz archives in S3. Every response but this document is "
            "the envelope `{code, status, message, data}`; an unknown route answers 404 and "
            "a method a path does not take 405 (with `Allow`), both in the envelope. "
            "`state_display` and the envelope's fixed messages are Chinese (the seed) unless "
            "`Accept-Language` prefers English (`en`) or `server.language` is `en`; an answer "
            "says which in `Content-Language`.",
        },
        "servers": [{"url": API}],
        "tags": [{"name": "tasks"}, {"name": "events"}, {"name": "admin"}, {"name": "meta"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": _responses(),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": _scheme_description(settings.auth),
                }
            },
        },
    }
    return dict(_one_line(built))


async def serve(request: web.Request) -> web.Response:
    return web.json_response(document(request.app))


def setup(app: web.Application) -> None:
    """Register the OpenAPI route on ``app``."""
    app.router.add_get(f"{API}{PATH}", serve)

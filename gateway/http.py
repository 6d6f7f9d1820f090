"""The aiohttp helpers every route module shares: answer with an envelope, and read a
request's path, query, headers and body into the models of ``gateway.models``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from aiohttp import web

from gateway.envelope import Envelope
from gateway.models import RequestModel, validate
from kernel.errors import InvalidInput

R = TypeVar("R", bound=RequestModel)


def respond(body: Mapping[str, Any]) -> web.Response:
    """The envelope (``gateway.envelope``'s fields, ``data`` a response model or None) as
    JSON, non-ASCII kept readable, with its ``status`` as HTTP status."""
    answer = Envelope.model_validate(body)
    return web.json_response(
        answer.model_dump(mode="json"),
        status=answer.status,
        dumps=lambda obj: json.dumps(obj, ensure_ascii=False),
    )


async def read_object(request: web.Request, expected: str = "a JSON object") -> dict[str, Any]:
    """The request body as a JSON object; raises InvalidInput saying what is wrong with it
    (``expected`` names the shape wanted, for the empty-body message)."""
    raw = await request.read()
    if not raw:
        raise InvalidInput(f"request body is empty; expected {expected}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput("request body is nested too deeply") from None
    except ValueError:  # an integer literal past Python's digit limit for int()
        raise InvalidInput("request body holds a number too long to read") from None
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
    return data


async def parse_body(request: web.Request, model: type[R], context: object = None) -> R:
    """The JSON body as ``model`` (``context`` goes to its validators); raises InvalidInput."""
    return validate(model, await read_object(request, model.shape), context)


def parse_path(request: web.Request, model: type[R]) -> R:
    """The path's parameters as ``model``; raises InvalidInput."""
    return validate(model, dict(request.match_info))


def parse_query(request: web.Request, model: type[R]) -> R:
    """The query parameters ``model`` names (the first of repeated ones) as ``model``; an
    empty value counts as none. Raises InvalidInput."""
    values = {name: value for name in model.model_fields if (value := request.query.get(name))}
    return validate(model, values)


def parse_headers(request: web.Request, model: type[R]) -> R:
    """The headers ``model`` names (by ``validation_alias``), each as the list of its
    values, as ``model``; raises InvalidInput."""
    values: dict[str, object] = {}
    for name, field in model.model_fields.items():
        header = field.validation_alias if isinstance(field.validation_alias, str) else name
        if header in request.headers:
            values[header] = request.headers.getall(header)
    return validate(model, values)

"""The two aiohttp helpers every route module shares: answer with an envelope, read a body."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from kernel.errors import InvalidInput


def respond(body: dict[str, Any]) -> web.Response:
    """The envelope as JSON (non-ASCII kept readable), with its ``status`` as HTTP status."""
    return web.json_response(
        body, status=body["status"], dumps=lambda obj: json.dumps(obj, ensure_ascii=False)
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

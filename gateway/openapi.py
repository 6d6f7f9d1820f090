"""The service's OpenAPI document, served at ``/api/dcu/openapi.json``."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Register the OpenAPI route on ``app``."""

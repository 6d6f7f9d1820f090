"""Event history and live server-sent events for tasks (filled in by the events-API work)."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Register the event routes on ``app``."""

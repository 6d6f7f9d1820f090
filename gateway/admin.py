"""Operator endpoints (filled in by the cleanup work)."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Register the admin routes on ``app``."""

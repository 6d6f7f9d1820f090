"""Typed application keys shared by the gateway's route modules."""

from __future__ import annotations

from aiohttp import web

from bus import Bus
from kernel.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
NATS_URL = web.AppKey("nats_url", str)
BUS = web.AppKey("bus", Bus)  # the gateway's NATS connection

API = "/api/dcu"

"""Typed application keys shared by the gateway's route modules."""

from __future__ import annotations

from aiohttp import web
from nats.aio.client import Client
from nats.js import JetStreamContext

from dcu.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
NATS_URL = web.AppKey("nats_url", str)
NATS = web.AppKey("nats", Client)
JETSTREAM = web.AppKey("jetstream", JetStreamContext)

API = "/api/dcu"

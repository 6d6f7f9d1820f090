"""Typed application keys shared by the gateway's route modules."""

from __future__ import annotations

from aiohttp import web

from bus import Bus
from kernel.settings import Settings
from persistence.repository import TaskRepository

SETTINGS = web.AppKey("settings", Settings)
BUS = web.AppKey("bus", Bus)  # the gateway's NATS connection
REPOSITORY = web.AppKey("repository", TaskRepository)  # the gateway's database

API = "/api/dcu"

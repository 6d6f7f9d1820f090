"""The NATS edge: connecting with the configured credentials, the audit stream, publishing.

One JetStream stream (``nats.stream``) holds every ``<prefix>.>`` subject with the
configured age and size limits: it is both the transport and the audit log that
``dcu replay`` reads back.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from dcu.errors import BusError
from dcu.settings import NatsSettings
from events import subjects
from events.schema import Event

log = logging.getLogger(__name__)

# JetStream's de-duplication window: a re-published event id within it is dropped.
DUPLICATE_WINDOW = 120.0


def connect_options(settings: NatsSettings) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` from settings; never logged (secrets)."""
    options: dict[str, Any] = {
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
    }
    if settings.user:
        options["user"] = settings.user
        options["password"] = settings.password.get_secret_value()
    if settings.token.get_secret_value():
        options["token"] = settings.token.get_secret_value()
    if settings.creds_file:
        options["user_credentials"] = settings.creds_file
    if settings.tls_ca_file:
        options["tls"] = ssl.create_default_context(cafile=settings.tls_ca_file)
    return options


async def connect(url: str, settings: NatsSettings, name: str) -> Client:
    """Connect to NATS; raises BusError (without the credentials) when it cannot."""

    async def _log_error(exc: Exception) -> None:
        log.warning("nats connection %s: %s", name, exc)

    try:
        return await nats.connect(url, name=name, error_cb=_log_error, **connect_options(settings))
    except (OSError, NatsError, TimeoutError) as exc:
        raise BusError(f"cannot connect to NATS at {url}: {exc}") from exc


def stream_config(settings: NatsSettings) -> StreamConfig:
    return StreamConfig(
        name=settings.stream,
        subjects=[subjects.all_events(settings.subject_prefix)],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=settings.stream_max_age or None,
        max_bytes=settings.stream_max_bytes,
        duplicate_window=DUPLICATE_WINDOW,
    )


async def ensure_stream(js: JetStreamContext, settings: NatsSettings) -> None:
    """Create the audit stream, or bring its limits in line with the settings."""
    config = stream_config(settings)
    try:
        await js.stream_info(settings.stream)
    except NotFoundError:
        await js.add_stream(config)
        log.info("created stream %s for %s", settings.stream, config.subjects)
        return
    await js.update_stream(config)


async def publish(js: JetStreamContext, event: Event, prefix: str) -> int:
    """Publish ``event`` and wait for JetStream's acknowledgement; returns the sequence.

    The event id is the ``Nats-Msg-Id``, so publishing the same event twice stores it once.
    Raises BusError when the stream does not acknowledge.
    """
    subject = subjects.for_event(event, prefix)
    try:
        ack = await js.publish(
            subject, event.encode(), headers={"Nats-Msg-Id": event.event_id}, timeout=10
        )
    except (NatsError, TimeoutError) as exc:
        raise BusError(f"cannot publish {event.type} for task {event.task_id}: {exc}") from exc
    return int(ack.seq)


@dataclass(frozen=True, slots=True)
class Published:
    seq: int
    duplicate: bool  # JetStream already held this Nats-Msg-Id (within DUPLICATE_WINDOW)


async def publish_raw(js: JetStreamContext, subject: str, data: bytes, msg_id: str) -> Published:
    """Publish ``data`` on ``subject`` with ``Nats-Msg-Id`` ``msg_id`` and wait for the ack.

    Raises BusError when the stream does not acknowledge.
    """
    try:
        ack = await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id}, timeout=10)
    except (NatsError, TimeoutError) as exc:
        raise BusError(f"cannot publish on {subject}: {exc}") from exc
    return Published(seq=int(ack.seq), duplicate=bool(ack.duplicate))

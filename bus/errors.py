"""NATS errors, translated once: every failure of the client or a JetStream API call
becomes ``kernel.errors.BusError`` naming what was being done (never the credentials)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from nats.errors import Error as NatsError

from kernel.errors import BusError


@contextlib.asynccontextmanager
async def translating(what: str) -> AsyncIterator[None]:
    """Run the body; a nats-py error or a timeout leaves as ``BusError("what: …")``."""
    try:
        yield
    except (NatsError, TimeoutError) as exc:
        raise BusError(f"{what}: {exc!r}" if not str(exc) else f"{what}: {exc}") from exc


class LegacyStream(BusError):
    """The single stream of earlier versions still holds the subjects."""

"""The NATS edge: the only package that talks to NATS.

``Bus`` (one connection per role) publishes every event family, looks facts up, reads
a subject's history, opens live subscriptions and durable consumers; ``bus.streams``
sets the three streams up; every nats-py error becomes ``kernel.errors.BusError``
(``bus.errors``). Subjects come from ``events.subjects``.
"""

from bus.client import (
    Bus,
    ConsumerLag,
    Delivery,
    LiveSubscription,
    Published,
    PullConsumer,
    StreamEvent,
    connect_options,
    servers,
)
from bus.errors import LegacyStream, translating
from bus.streams import DUPLICATE_WINDOW, cluster_size, differences, ensure_streams, stream_configs
from events.audit_archive import StoredMessage

__all__ = [
    "DUPLICATE_WINDOW",
    "Bus",
    "ConsumerLag",
    "Delivery",
    "LegacyStream",
    "LiveSubscription",
    "Published",
    "PullConsumer",
    "StoredMessage",
    "StreamEvent",
    "cluster_size",
    "connect_options",
    "differences",
    "ensure_streams",
    "servers",
    "stream_configs",
    "translating",
]

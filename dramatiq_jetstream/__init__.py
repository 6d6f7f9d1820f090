"""A dramatiq broker on NATS JetStream, usable without the rest of DCU.

``JetStreamBroker`` maps dramatiq's queues onto durable pull consumers; ``Retries``
replaces dramatiq's middleware of that name with nak-with-delay retries (see
``dramatiq_jetstream.broker`` for the whole mapping).
"""

from dramatiq_jetstream.broker import (
    DRAMATIQ_HEADER,
    DeliveriesExceeded,
    JetStreamBroker,
    JetStreamConsumer,
    JetStreamMessageProxy,
    SettleLater,
    dead_subject,
    durable_name,
    queue_subject,
)
from dramatiq_jetstream.retries import Retries, default_middleware

__all__ = [
    "DRAMATIQ_HEADER",
    "DeliveriesExceeded",
    "JetStreamBroker",
    "JetStreamConsumer",
    "JetStreamMessageProxy",
    "Retries",
    "SettleLater",
    "dead_subject",
    "default_middleware",
    "durable_name",
    "queue_subject",
]

"""Retries for the JetStream broker: a retry is a nak with a delay, not a new publish.

Dramatiq's own ``Retries`` re-enqueues a failed message on the delay queue and lets the
original be acked. On JetStream that is a second write that can fail on its own (stream
full, no leader, message too large) after the original is gone, and the task is lost.
Here the original stays in the stream: the consumer settles it with ``-NAK`` and the
backoff as delay, JetStream delivers it again, and the retry count is its delivery count.
The options are dramatiq's (``max_retries``, ``min_backoff``, ``max_backoff``,
``retry_when``, ``throws``, ``on_retry_exhausted``) with the same meaning, and the
backoff is dramatiq's own ``compute_backoff``. Messages of other brokers get dramatiq's
behaviour, so one middleware list serves a StubBroker in tests too.
"""

from __future__ import annotations

import traceback
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.common import compute_backoff
from dramatiq.errors import Retry
from dramatiq.middleware import Middleware
from dramatiq.middleware import Retries as DramatiqRetries
from dramatiq.middleware import default_middleware as dramatiq_default_middleware

from dramatiq_jetstream.broker import JetStreamMessageProxy

__all__ = ["Retries", "default_middleware"]

DEFAULT_MAX_RETRIES = 20
DEFAULT_MIN_BACKOFF = 15_000  # milliseconds, as in dramatiq
DEFAULT_MAX_BACKOFF = 7 * 86_400_000


class Retries(DramatiqRetries):
    """Retry failed messages with exponential backoff by nak-with-delay (see module)."""

    def __init__(
        self,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        min_backoff: int | None = None,
        max_backoff: int | None = None,
        retry_when: Any = None,
    ) -> None:
        super().__init__(
            max_retries=max_retries,
            min_backoff=min_backoff or DEFAULT_MIN_BACKOFF,
            max_backoff=max_backoff or DEFAULT_MAX_BACKOFF,
            retry_when=retry_when,
        )

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if not isinstance(message, JetStreamMessageProxy):
            dramatiqs: Any = super().after_process_message  # untyped in dramatiq
            dramatiqs(broker, message, result=result, exception=exception)
            return
        if exception is None:
            return
        actor = broker.get_actor(message.actor_name)
        throws = message.options.get("throws") or actor.options.get("throws")
        if throws and isinstance(exception, throws):
            message.fail()
            return

        retries = message.num_delivered - 1
        message.options["retries"] = retries
        message.options["traceback"] = traceback.format_exc(limit=30)

        def option(name: str, default: Any) -> Any:
            return message.options.get(name, actor.options.get(name, default))

        max_retries = option("max_retries", self.max_retries)
        retry_when = actor.options.get("retry_when", self.retry_when)
        exhausted = (
            not retry_when(retries, exception)
            if retry_when is not None
            else max_retries is not None and retries >= max_retries
        )
        if exhausted:
            self.logger.warning(
                "Retries exceeded for message %r (%d deliveries).",
                message.message_id,
                message.num_delivered,
            )
            message.fail()
            target = option("on_retry_exhausted", None)
            if target:
                broker.get_actor(target).send(
                    message.asdict(), {"retries": retries, "max_retries": max_retries}
                )
            return

        if isinstance(exception, Retry) and exception.delay is not None:
            delay = int(exception.delay)
        else:
            min_backoff = message.options.get(
                "min_backoff", option("min_backoff", self.min_backoff)
            )
            max_backoff = message.options.get(
                "max_backoff", option("max_backoff", self.max_backoff)
            )
            _, delay = compute_backoff(
                retries, factor=min_backoff, max_backoff=min(max_backoff, DEFAULT_MAX_BACKOFF)
            )
        self.logger.info("Retrying message %r in %d milliseconds.", message.message_id, delay)
        message.retry_after(delay)


def default_middleware() -> list[Middleware]:
    """Dramatiq's default middleware with its ``Retries`` replaced by this module's."""
    return [Retries() if cls is DramatiqRetries else cls() for cls in dramatiq_default_middleware]

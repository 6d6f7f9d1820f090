"""The streams: three, each configured for its purpose (docs/events.md).

* ``<stream>_AUDIT``: the task and cleanup facts (``<prefix>.task.>``,
  ``<prefix>.cleanup.>``). Limits retention without an age limit, deny delete and purge,
  and *discard new*: a full audit log refuses new work loudly rather than forgetting old
  facts. ``dcu replay`` rebuilds the database from it.
* ``<stream>_PROGRESS``: ``<prefix>.progress.<task>``, only the latest report per task
  (``max_msgs_per_subject=1``) for ``progress_max_age``.
* ``<stream>_WORK``: the queues and dead letters (``<prefix>.queue.>``,
  ``<prefix>.dead.>``) with work-queue retention.

``ensure_streams`` is the one place streams are set up: it creates missing streams and,
for existing ones, logs every difference from the wanted configuration instead of
overwriting it (``dcu setup --apply`` applies them).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from bus.errors import LegacyStream, translating
from events import subjects
from kernel.settings import NatsSettings

log = logging.getLogger(__name__)

# JetStream's de-duplication window: a re-published event id within it is dropped.
DUPLICATE_WINDOW = 120.0


def _limit(value: float) -> float | None:
    return value or None


def stream_configs(settings: NatsSettings) -> list[StreamConfig]:
    """The wanted audit, progress and work streams."""
    prefix = settings.subject_prefix
    common: dict[str, Any] = {
        "storage": StorageType.FILE,
        "num_replicas": settings.replicas,
        "duplicate_window": DUPLICATE_WINDOW,
    }
    return [
        StreamConfig(
            name=settings.audit_stream,
            description="DCU audit log: every task and cleanup fact",
            subjects=[subjects.every_task(prefix=prefix), subjects.all_cleanup(prefix)],
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.NEW,
            max_age=_limit(settings.audit_max_age),
            max_bytes=settings.audit_max_bytes,
            deny_delete=True,
            deny_purge=True,
            **common,
        ),
        StreamConfig(
            name=settings.progress_stream,
            description="DCU progress: the latest report of each task",
            subjects=[subjects.every_progress(prefix)],
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            max_msgs_per_subject=1,
            max_age=settings.progress_max_age,
            **{**common, "duplicate_window": min(DUPLICATE_WINDOW, settings.progress_max_age)},
        ),
        StreamConfig(
            name=settings.work_stream,
            description="DCU work: stage queues and dead letters",
            subjects=[subjects.every_queue(prefix), subjects.every_dead(prefix)],
            retention=RetentionPolicy.WORK_QUEUE,
            discard=DiscardPolicy.OLD,
            max_age=_limit(settings.work_max_age),
            **common,
        ),
    ]


# The settings ``ensure_streams`` compares; the server fills in the rest.
_COMPARED = (
    "subjects",
    "retention",
    "discard",
    "max_age",
    "max_bytes",
    "max_msgs_per_subject",
    "num_replicas",
    "deny_delete",
    "deny_purge",
    "duplicate_window",
    "storage",
)
# What the server reports for a limit left unset.
_UNSET: dict[str, Any] = {"max_age": 0.0, "max_bytes": -1, "max_msgs_per_subject": -1}


def differences(wanted: StreamConfig, actual: StreamConfig) -> list[str]:
    """``field: server has X, settings want Y`` for every compared field that differs."""
    found = []
    for name in _COMPARED:
        want = getattr(wanted, name)
        have = getattr(actual, name)
        if want is None:
            want = _UNSET.get(name)
        if have is None:
            have = _UNSET.get(name)
        if name == "subjects":
            want, have = sorted(want or []), sorted(have or [])
        if isinstance(want, float) or isinstance(have, float):
            same = abs(float(want or 0) - float(have or 0)) < 1e-3
        else:
            same = want == have
        if not same:
            found.append(f"{name}: server has {have!r}, settings want {want!r}")
    return found


def cluster_size(nc: Client) -> int:
    """How many servers the connected server's cluster has (itself and the peers whose
    client URLs it advertises); 1 for a single server."""
    info = nc._server_info or {}
    urls = set(info.get("connect_urls") or [])
    return max(1, len(urls)) if info.get("cluster") else 1


async def ensure_streams(
    js: JetStreamContext,
    settings: NatsSettings,
    *,
    apply: bool = False,
    peers: int | None = None,
) -> dict[str, list[str]]:
    """Create missing streams; report (and with ``apply`` update) differing ones.

    ``peers`` (``cluster_size``) caps the replicas, so settings written for a
    three-node cluster work against a single server. Returns the differences found per
    stream. Raises LegacyStream when the single stream
    of earlier versions (``nats.stream`` covering ``<prefix>.>``) is still there: its
    facts must be moved with ``dcu migrate-streams`` first. BusError when JetStream
    cannot be reached or refuses a configuration.
    """
    async with translating("cannot set up the streams"):
        await _refuse_legacy(js, settings)
        found: dict[str, list[str]] = {}
        wanted_configs = stream_configs(settings)
        if peers is not None and settings.replicas > peers:
            log.warning(
                "nats.replicas is %d but the server names %d JetStream server(s) in its "
                "cluster; the streams get %d replica(s)",
                settings.replicas,
                peers,
                peers,
            )
            wanted_configs = [replace(c, num_replicas=peers) for c in wanted_configs]
        for wanted in wanted_configs:
            name = str(wanted.name)
            try:
                actual = (await js.stream_info(name)).config
            except NotFoundError:
                await js.add_stream(wanted)
                log.info("created stream %s for %s", wanted.name, wanted.subjects)
                continue
            changes = differences(wanted, actual)
            if not changes:
                continue
            found[name] = changes
            for change in changes:
                log.warning("stream %s differs from the settings: %s", wanted.name, change)
            if apply:
                await js.update_stream(wanted)
                log.warning("stream %s updated to the settings", wanted.name)
        return found


async def _refuse_legacy(js: JetStreamContext, settings: NatsSettings) -> None:
    try:
        legacy = (await js.stream_info(settings.stream)).config
    except NotFoundError:
        return
    if subjects.all_events(settings.subject_prefix) in (legacy.subjects or []):
        raise LegacyStream(
            f"stream {settings.stream} of an earlier DCU version holds "
            f"{subjects.all_events(settings.subject_prefix)}; run `dcu migrate-streams` to "
            "move its facts into the audit stream before starting this version"
        )

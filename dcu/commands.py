"""The service commands of ``dcu`` (everything but the gateway clients ``submit`` and
``fetch``): build the settings, set up logging, then run roles or a maintenance command.

``dcu.cli`` parses the command line and imports this module only for these commands, so
the pipeline clients never load the service stack.

Exit code 2 is a configuration the command refuses before starting anything: invalid
settings (``kernel.errors.ConfigError``: a bad key, an unreadable config file or
``docker.config_file``), or an HTTP role (serve, gateway) on a non-loopback address with
auth off (``kernel.settings.listen_refusal``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import sys

from dcu.migrate import NothingToMigrate, migrate_streams
from dcu.replay import ReplayRefused, replay
from dcu.roles import ROLES
from dcu.service import RolePlan, ensure_topology, nats_resolved, run_roles
from kernel import diagnostics, logs
from kernel.errors import ConfigError
from kernel.settings import Settings, listen_refusal, load_settings

log = logging.getLogger("dcu")


def _configure_logging(settings: Settings) -> None:
    logs.configure(
        settings.log.format,
        logging.DEBUG if settings.server.mode == "debug" else logging.INFO,
    )
    for noisy in ("aiohttp.access", "asyncio", "tortoise", "aiosqlite", "dramatiq", "nats"):
        logging.getLogger(noisy).setLevel(
            logging.INFO if noisy == "aiohttp.access" else logging.WARNING
        )


async def _replay(
    settings: Settings, target_url: str, *, allow_partial: bool, from_archive: bool
) -> int:
    async with nats_resolved(settings) as settings:
        try:
            report = await replay(
                settings,
                target_url,
                allow_partial=allow_partial,
                from_archive=from_archive,
            )
        except ReplayRefused as exc:
            print(f"dcu replay: refused: {exc}", file=sys.stderr)
            return 1
    counts = report.counts
    partial = " (PARTIAL: facts are missing)"
    archived = f"the audit archive (1-{report.archived}) and " if from_archive else ""
    print(
        f"replayed {archived}stream {settings.nats.audit_stream}: "
        f"tasks rebuilt {counts.tasks}, events applied {counts.applied}, "
        f"events refused {counts.refused}" + (partial if report.partial else "")
    )
    return 0


async def _setup(settings: Settings, *, apply: bool) -> int:
    async with nats_resolved(settings) as settings:
        found = await ensure_topology(settings, apply=apply)
    for stream, changes in found.items():
        for change in changes:
            print(f"{stream}: {change}")
    if found and not apply:
        print("dcu setup: streams differ from the settings; run with --apply to update them")
        return 1
    print("dcu setup: streams " + ("updated" if found else "match the settings"))
    return 0


async def _migrate(settings: Settings, *, delete_old: bool) -> int:
    async with nats_resolved(settings) as settings:
        try:
            report = await migrate_streams(settings, delete_old=delete_old)
        except NothingToMigrate as exc:
            print(f"dcu migrate-streams: {exc}", file=sys.stderr)
            return 1
    print(
        f"migrated stream {settings.nats.stream}: {report.read} messages read, "
        f"{report.facts} facts in {settings.nats.audit_stream}, {report.dead_letters} dead "
        f"letters in {settings.nats.work_stream}, {report.skipped} progress/queue messages "
        "not copied; old stream " + ("deleted" if report.old_stream_deleted else "kept")
    )
    return 0


# glibc's mallopt parameters (malloc.h); no Python package exposes them.
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def _bound_malloc() -> None:
    """Keep the worker's memory flat however large the image: DCU streams in 1-8 MiB
    buffers from many threads, and glibc by default gives each thread an arena of its
    own and raises its mmap threshold after every large free, so freed buffers stay in
    arenas (RSS grows with the archive). Two arenas and a fixed 1 MiB threshold hand
    every large buffer back to the kernel when it is freed. A no-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_ARENA_MAX, 2)
        libc.mallopt(_M_MMAP_THRESHOLD, 1024 * 1024)
    except (OSError, AttributeError):
        return


def run(args: argparse.Namespace) -> int:
    """Run the parsed service command ``args.command``; its exit code."""
    _bound_malloc()
    diagnostics.install()
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"dcu: bad configuration: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    command = args.command
    if command == "replay":
        target = args.into or settings.database.tortoise_url()
        return asyncio.run(
            _replay(
                settings,
                target,
                allow_partial=args.allow_partial,
                from_archive=args.from_archive,
            )
        )
    if command == "setup":
        return asyncio.run(_setup(settings, apply=args.apply))
    if command == "migrate-streams":
        return asyncio.run(_migrate(settings, delete_old=args.delete_old))
    if command in {"serve", "gateway"} and (refusal := listen_refusal(settings)) is not None:
        print(f"dcu: {refusal}", file=sys.stderr)
        return 2
    roles = list(ROLES) if command == "serve" else list(dict.fromkeys(getattr(args, "stages", [])))
    timer = command in {"serve", "timer"}
    code = 0
    with contextlib.suppress(KeyboardInterrupt):
        plan = RolePlan(
            http=command in {"serve", "gateway"},
            persist=command in {"serve", "persist"},
            stages=roles,
            timer=timer,
            archiver=command == "archiver" or (command == "serve" and settings.archive.enabled),
        )
        code = asyncio.run(run_roles(settings, plan))
    return code

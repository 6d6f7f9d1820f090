"""The ``dcu`` command: parse, build settings, wire components, wait for a signal, stop.

dcu serve     all in one process: gateway, persistence, download/compress/upload and
              cleanup workers, and the cleanup timer
dcu gateway   the HTTP gateway only
dcu worker    workers for some roles: dcu worker download compress upload cleanup
dcu persist   the persistence subscriber only
dcu timer     the cleanup timer only (publishes cleanup requests on the cron ticks)

Exit code 2 is a configuration the command refuses before starting anything: invalid
settings, an unreadable ``docker.config_file`` for a download worker, or an HTTP role
(serve, gateway) on a non-loopback address with auth off (``dcu.settings.listen_refusal``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web

from dcu.embedded import EmbeddedNats
from dcu.service import ROLES, StageWorkers, ensure_topology, wait_for_signal
from dcu.settings import Settings, describe_error, is_loopback, listen_refusal, load_settings

log = logging.getLogger("dcu")


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=logging.DEBUG if settings.server.mode == "debug" else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("aiohttp.access", "asyncio", "tortoise", "aiosqlite", "dramatiq", "nats"):
        logging.getLogger(noisy).setLevel(
            logging.INFO if noisy == "aiohttp.access" else logging.WARNING
        )


async def _run(
    settings: Settings, *, http: bool, persist: bool, stages: list[str], timer: bool = False
) -> int:
    from actors.timer import CleanupTimer
    from gateway.app import create_app
    from persistence.runner import run_persistence

    embedded: EmbeddedNats | None = None
    nats_url = settings.nats.url
    if not nats_url:
        embedded = EmbeddedNats(Path(settings.nats.data_dir))
        nats_url = await asyncio.to_thread(embedded.start)
    if not settings.minio.endpoint and stages:
        log.warning(
            "minio.endpoint is empty: archives are stored under %s, not in S3",
            Path(settings.minio.local_path).resolve(),
        )
    workers: StageWorkers | None = None
    runner: web.AppRunner | None = None
    stop = asyncio.Event()
    # Handled from here on, not only once every role is up: a SIGTERM while the roles
    # start (slow on a loaded host) still stops the process cleanly, with exit code 0.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    timer_task: asyncio.Task[None] | None = None
    exit_code = 0
    try:
        await ensure_topology(settings, nats_url)
        if timer:
            timer_task = asyncio.create_task(CleanupTimer(settings, nats_url).run(stop))
            # A timer that ends by itself (NATS unreachable at start) stops the process.
            timer_task.add_done_callback(lambda _: stop.set())
        if stages:
            workers = StageWorkers(settings, nats_url, stages)
            workers.start()
        if http:
            app = create_app(settings, nats_url, with_persistence=persist)
            runner = web.AppRunner(app, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, settings.server.host, settings.server.port)
            await site.start()
            log.info(
                "gateway listening on http://%s:%d/api/dcu (auth %s)",
                settings.server.host,
                settings.server.port,
                "on" if settings.auth.enabled else "off",
            )
            if not settings.auth.enabled and not is_loopback(settings.server.host):
                log.warning(
                    "the gateway is reachable beyond this host without authentication "
                    "(server.allow_unauthenticated)"
                )
            await wait_for_signal(stop)
        elif persist:
            await run_persistence(settings, nats_url, until=wait_for_signal(stop))
        else:
            await wait_for_signal(stop)
    finally:
        log.info("shutting down")
        stop.set()
        if timer_task is not None:
            await asyncio.wait({timer_task}, timeout=10)
            timer_task.cancel()
            (outcome,) = await asyncio.gather(timer_task, return_exceptions=True)
            if isinstance(outcome, Exception):
                log.error("cleanup timer failed: %s", outcome)
                exit_code = 1
        if runner is not None:
            await runner.cleanup()
        if workers is not None:
            await asyncio.to_thread(workers.stop)
        if embedded is not None:
            embedded.stop()
    return exit_code


async def _replay(settings: Settings, target_url: str) -> int:
    from dcu.replay import replay

    embedded: EmbeddedNats | None = None
    nats_url = settings.nats.url
    if not nats_url:  # read the embedded server's own store
        embedded = EmbeddedNats(Path(settings.nats.data_dir))
        nats_url = await asyncio.to_thread(embedded.start)
    try:
        count = await replay(settings, nats_url, target_url)
    finally:
        if embedded is not None:
            embedded.stop()
    print(f"replayed {count} events from stream {settings.nats.stream}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcu", description="Download-Compress-Upload service")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML config (default: configs/config.yaml if present)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "gateway, persistence, all workers and the cleanup timer in one process"),
        ("gateway", "the HTTP gateway"),
        ("persist", "the persistence subscriber"),
        ("timer", "the cleanup timer: publishes cleanup requests on the cron ticks"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    replay_cmd = sub.add_parser("replay", help="rebuild a task database from the event stream")
    replay_cmd.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    replay_cmd.add_argument(
        "--into",
        default=None,
        help="database URL to rebuild into (default: the configured database)",
    )
    worker = sub.add_parser("worker", help="workers for some roles (stages, cleanup)")
    worker.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    worker.add_argument("stages", nargs="+", choices=ROLES, metavar="role", help=", ".join(ROLES))
    return parser


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _bound_malloc()
    try:
        settings = load_settings(args.config)
    except Exception as exc:
        print(f"dcu: bad configuration: {describe_error(exc)}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    command = args.command
    if command == "replay":
        return asyncio.run(_replay(settings, args.into or settings.database.tortoise_url()))
    if command in {"serve", "gateway"} and (refusal := listen_refusal(settings)) is not None:
        print(f"dcu: {refusal}", file=sys.stderr)
        return 2
    roles = list(ROLES) if command == "serve" else list(dict.fromkeys(getattr(args, "stages", [])))
    if "download" in roles and settings.docker.config_file:
        from actors.registry_auth import DockerConfigError, RegistryAuth

        try:
            RegistryAuth(settings.docker).load()
        except DockerConfigError as exc:
            print(f"dcu: bad configuration: {exc}", file=sys.stderr)
            return 2
    timer = command in {"serve", "timer"}
    if timer:
        from actors.timer import schedules

        try:
            schedules(settings)
        except ValueError as exc:
            print(f"dcu: bad configuration: {exc}", file=sys.stderr)
            return 2
    code = 0
    with contextlib.suppress(KeyboardInterrupt):
        code = asyncio.run(
            _run(
                settings,
                http=command in {"serve", "gateway"},
                persist=command in {"serve", "persist"},
                stages=roles,
                timer=timer,
            )
        )
    return code


if __name__ == "__main__":
    sys.exit(main())

"""The ``dcu`` command: parse, build settings, wire components, wait for a signal, stop.

dcu serve     all in one process: gateway, persistence, download/compress/upload workers
dcu gateway   the HTTP gateway only
dcu worker    stage workers: dcu worker download compress upload
dcu persist   the persistence subscriber only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from pathlib import Path

from aiohttp import web

from dcu.embedded import EmbeddedNats
from dcu.service import StageWorkers, ensure_topology, wait_for_signal
from dcu.settings import Settings, load_settings
from events.schema import Stage

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


async def _run(settings: Settings, *, http: bool, persist: bool, stages: list[Stage]) -> None:
    from persistence.runner import run_persistence

    from gateway.app import create_app

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
    try:
        await ensure_topology(settings, nats_url)
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
                "gateway listening on http://%s:%d/api/dcu",
                settings.server.host,
                settings.server.port,
            )
            await wait_for_signal()
        elif persist:
            await run_persistence(settings, nats_url, until=wait_for_signal())
        else:
            await wait_for_signal()
    finally:
        log.info("shutting down")
        if runner is not None:
            await runner.cleanup()
        if workers is not None:
            await asyncio.to_thread(workers.stop)
        if embedded is not None:
            embedded.stop()


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
        ("serve", "gateway, persistence and all stage workers in one process"),
        ("gateway", "the HTTP gateway"),
        ("persist", "the persistence subscriber"),
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
    worker = sub.add_parser("worker", help="stage workers")
    worker.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    worker.add_argument("stages", nargs="+", choices=[s.value for s in Stage])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except Exception as exc:
        print(f"dcu: bad configuration: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    command = args.command
    if command == "replay":
        return asyncio.run(_replay(settings, args.into or settings.database.tortoise_url()))
    stages = list(Stage) if command == "serve" else [Stage(s) for s in getattr(args, "stages", [])]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            _run(
                settings,
                http=command in {"serve", "gateway"},
                persist=command in {"serve", "persist"},
                stages=stages,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

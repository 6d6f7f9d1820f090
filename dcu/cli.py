"""The ``dcu`` command line: parse, then hand the command to what runs it.

dcu serve     all in one process: gateway, persistence, download/compress/upload and
              cleanup workers, and the cleanup timer
dcu gateway   the HTTP gateway only
dcu worker    workers for some roles: dcu worker download compress upload cleanup
dcu persist   the persistence subscriber only
dcu timer     the cleanup timer only (publishes cleanup requests on the cron ticks)
dcu archiver  the audit archiver only
dcu replay, dcu setup, dcu migrate-streams   maintenance (docs/operations.md)
dcu submit    start a task on a gateway and, with --wait, follow it (dcu.submit, docs/ci.md)
dcu fetch     a completed task's archive from a gateway, sha256 checked (dcu.fetch)

``submit`` and ``fetch`` are clients of a gateway: they read no service settings, and the
service commands' module (``dcu.commands``, which imports the whole service stack) is
imported only when one of those runs, so a pipeline step starts in a fraction of a second.
Exit code 2 is bad usage or a configuration refused before anything starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dcu import fetch, submit
from dcu.roles import ROLES


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
        ("archiver", "the audit archiver: copies the audit stream to the object store"),
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
    replay_cmd.add_argument(
        "--allow-partial",
        action="store_true",
        help="rebuild even when facts are missing (the stream's head is gone)",
    )
    replay_cmd.add_argument(
        "--from-archive",
        action="store_true",
        help="start from the audit archive in the object store, then the stream after it",
    )
    setup_cmd = sub.add_parser(
        "setup", help="create the streams; report where existing ones differ from the settings"
    )
    setup_cmd.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    setup_cmd.add_argument(
        "--apply", action="store_true", help="update existing streams to the settings"
    )
    migrate_cmd = sub.add_parser(
        "migrate-streams", help="move an earlier version's single stream into the three streams"
    )
    migrate_cmd.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    migrate_cmd.add_argument(
        "--delete-old", action="store_true", help="delete the old stream once copied"
    )
    fetch_cmd = sub.add_parser(
        "fetch", help="download a completed task's archive and check its sha256"
    )
    fetch_cmd.add_argument("task_id")
    fetch_cmd.add_argument("-o", "--output", type=Path, required=True, help="file to write")
    fetch_cmd.add_argument("--server", default=None, help="gateway URL (env DCU_SERVER)")
    fetch_cmd.add_argument("--token", default=None, help="bearer token (env DCU_TOKEN)")
    submit.add_arguments(
        sub.add_parser("submit", help="start a task from a pipeline; --wait follows it to its end")
    )
    worker = sub.add_parser("worker", help="workers for some roles (stages, cleanup)")
    worker.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    worker.add_argument("stages", nargs="+", choices=ROLES, metavar="role", help=", ".join(ROLES))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "fetch":  # a client of the gateway: no service settings
        return fetch.run(args.server, args.token, args.task_id, args.output)
    if args.command == "submit":  # a client too (dcu.submit)
        return submit.run(args)
    # Imported here, not at the top: the service stack takes most of a second to import,
    # which the two clients above should not pay.
    from dcu import commands

    return commands.run(args)


if __name__ == "__main__":
    sys.exit(main())

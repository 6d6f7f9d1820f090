"""The machine's PostgreSQL on 127.0.0.1:5432 (trust auth), and a database per test.

PostgreSQL is not started per session: it is the shared server the multi-node
deployment uses. ``postgres_dsn`` starts the Debian cluster if it is installed but
stopped, and raises ``ServerStartError`` when it still cannot be reached.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

from tests.polling import wait_until
from tests.servers.base import ServerStartError, port_open

HOST = "127.0.0.1"
PORT = 5432
USER = "postgres"
ADMIN_DATABASE = "test"

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def dsn_for(database: str) -> str:
    """A DSN asyncpg and Tortoise ORM both accept."""
    return f"postgres://{USER}@{HOST}:{PORT}/{database}"


def psql(sql: str, *, database: str = ADMIN_DATABASE) -> str:
    """Run one SQL command with ``psql`` and return its unaligned output."""
    binary = shutil.which("psql")
    if binary is None:
        raise ServerStartError("psql not found: apt-get install -y postgresql")
    argv = [binary, "-X", "-q", "-w", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
    argv += ["-h", HOST, "-p", str(PORT), "-U", USER, "-d", database, "-c", sql]
    env = {**os.environ, "PGCONNECT_TIMEOUT": "5"}
    env.pop("PGPASSWORD", None)
    result = subprocess.run(
        argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60
    )
    if result.returncode != 0:
        raise ServerStartError(f"psql -d {database} -c {sql!r} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def _start_cluster() -> None:
    clusters = Path("/etc/postgresql")
    versions = sorted(
        (p.name for p in clusters.iterdir() if p.is_dir()) if clusters.is_dir() else [],
        key=lambda v: [int(part) for part in v.split(".") if part.isdigit()],
    )
    if not versions:
        raise ServerStartError(
            f"PostgreSQL is not listening on {HOST}:{PORT} and no cluster exists in "
            f"{clusters}: apt-get install -y postgresql (or run scripts/test)"
        )
    ctl = shutil.which("pg_ctlcluster") or "/usr/bin/pg_ctlcluster"
    argv = [ctl, "--skip-systemctl-redirect", versions[-1], "main", "start"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0 and not port_open(PORT, HOST):
        raise ServerStartError(
            f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}"
        )


def postgres_dsn() -> str:
    """The DSN of the ``test`` database, starting the local cluster if needed.

    Raises ``ServerStartError`` if PostgreSQL cannot be reached with trust auth.
    """
    if not port_open(PORT, HOST):
        _start_cluster()
        wait_until(
            lambda: port_open(PORT, HOST),
            timeout=60,
            what="PostgreSQL on 5432",
            error=ServerStartError,
        )
    if psql("select 1") != "1":
        raise ServerStartError(f"PostgreSQL at {dsn_for(ADMIN_DATABASE)} did not answer 1")
    return dsn_for(ADMIN_DATABASE)


def unique_database_name(prefix: str = "dcu") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _checked(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"not a plain lower-case database name: {name!r}")
    return name


def create_database(name: str | None = None) -> str:
    """Create an empty database (default ``dcu_<uuid8>``) and return its DSN."""
    name = _checked(name or unique_database_name())
    psql(f'CREATE DATABASE "{name}"')
    return dsn_for(name)


def drop_database(name: str) -> None:
    """Drop the database (a name or a DSN from ``create_database``), disconnecting anyone
    still connected; a missing database is fine."""
    if "://" in name:
        name = name.rpartition("/")[2]
    psql(f'DROP DATABASE IF EXISTS "{_checked(name)}" WITH (FORCE)')

"""Build the project's Dockerfile on the test engine and run containers of the image.

Nothing can be pulled here, so the Dockerfile's base, ``python:3.11-slim``, is replaced by
a stand-in with the same name in the test's own engine: Debian bookworm made by
``debootstrap --variant=minbase`` from the mirror apt uses, with the packages that give
what the real image gives the Dockerfile (``python`` on PATH, ``venv`` with ``pip``, CA
certificates), turned into an image by ``docker import`` with the real image's
``PATH``, ``LANG`` and ``CMD``. The Dockerfile itself, its ``FROM`` lines included, is
built unchanged by the engine (``docker build --network host``: the engine has no bridge,
and ``pip install`` in its ``RUN`` steps needs the package index).

The stand-in also trusts the CA certificates this machine adds to Debian's
(``/usr/local/share/ca-certificates``): where outgoing HTTPS passes an intercepting proxy,
``pip`` in the build needs them, as a base image built on such a network would have them.
They are public certificates, not secrets; nothing else of the host reaches the image.

debootstrap takes about 40 s, so the root file system is kept as a tarball under
``/var/tmp/dcu-test-cache`` (``DCU_TEST_CACHE`` overrides it), named by a digest of
everything that goes into it: later sessions on the machine import it in seconds.

Containers run with ``--network host`` so the image's ``dcu`` reaches the test's NATS,
S3, registry and PostgreSQL on 127.0.0.1, the same way as the Compose network's names
would. Their environment goes through an ``--env-file`` (mode 0600), so no token or key
shows in a process list or a failed command's message.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.polling import wait_until
from tests.servers.base import ServerStartError
from tests.servers.docker_engine import (
    DockerCommandError,
    DockerEngine,
)

BASE_IMAGE = "python:3.11-slim"
"""The name the Dockerfile's ``FROM`` lines use; the stand-in is tagged with it."""
SUITE = "bookworm"
PACKAGES = (
    "python3.11",
    "python3.11-venv",
    # python3.11-venv needs python3.11-distutils, a name only python3-distutils provides,
    # and debootstrap's resolver does not follow provided names.
    "python3-distutils",
    "python-is-python3",  # `python` on PATH, as the real image has
    "ca-certificates",
)
# What `docker import` gives the stand-in of the real image's config: without PATH,
# the Dockerfile's `ENV PATH=/opt/venv/bin:$PATH` would drop the system directories.
BASE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
RECIPE_VERSION = "1"  # bump when the way the root file system is made changes
DEFAULT_MIRROR = "http://deb.debian.org/debian"
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
DEBOOTSTRAP_TIMEOUT = 900.0
BUILD_TIMEOUT = 900.0


def cache_dir() -> Path:
    return Path(os.environ.get("DCU_TEST_CACHE", "/var/tmp/dcu-test-cache"))


# --- an engine that builds and runs the image --------------------------------------------------


@dataclass
class ImageEngine(DockerEngine):
    """A private engine like ``DockerEngine`` but on ``overlay2`` where the kernel has it.

    With ``vfs`` (the session engine's driver) every build step and every container copies
    the whole file system: building the Dockerfile took 216 s and each ``docker run`` 3-8 s
    here; with ``overlay2`` 22 s and under 1 s. ``storage_drivers`` are tried in order.
    """

    storage_drivers: tuple[str, ...] = ("overlay2", "vfs")

    def start(self) -> ImageEngine:
        failures = []
        for driver in self.storage_drivers:
            self.storage_driver = driver
            try:
                super().start()
            except ServerStartError as exc:
                failures.append(f"{driver}: {exc}")
                continue
            return self
        raise ServerStartError("no storage driver worked:\n" + "\n".join(failures))


# --- the Debian mirror apt uses --------------------------------------------------------------


def _deb822_stanzas(text: str) -> Iterator[dict[str, list[str]]]:
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, list[str]] = {}
        for line in block.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.split()
        if fields:
            yield fields


def _one_line_entries(text: str) -> Iterator[tuple[str, str, list[str]]]:
    """``deb [options] URI SUITE COMPONENT...`` lines as (uri, suite, components)."""
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 3:
            yield words[0], words[1], words[2:]


def debian_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The first ``main`` mirror apt uses for ``SUITE``, else deb.debian.org."""
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in _deb822_stanzas(text):
                if (
                    SUITE in stanza.get("suites", [])
                    and "main" in stanza.get("components", [])
                    and "deb" in stanza.get("types", ["deb"])
                    and stanza.get("uris")
                ):
                    return stanza["uris"][0]
        else:
            for uri, suite, components in _one_line_entries(text):
                if suite == SUITE and "main" in components:
                    return uri
    return DEFAULT_MIRROR


# --- the stand-in's root file system, cached -------------------------------------------------


def extra_ca_certificates() -> list[Path]:
    """The CA certificates this machine adds to Debian's own (``update-ca-certificates``)."""
    if not EXTRA_CA_DIR.is_dir():
        return []
    return sorted(p for p in EXTRA_CA_DIR.rglob("*.crt") if p.is_file())


def rootfs_key(mirror: str, certificates: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    recipe = {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "variant": "minbase",
        "packages": sorted(PACKAGES),
        "mirror": mirror,
    }
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    for certificate in certificates:
        digest.update(certificate.name.encode() + b"\0" + certificate.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class RootfsTarball:
    path: Path
    built: bool
    """Whether this call ran debootstrap (a cold cache) rather than reusing the tarball."""
    seconds: float


def stand_in_rootfs(directory: Path | None = None) -> RootfsTarball:
    """The tarball of the stand-in's root file system, made once per recipe and machine."""
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    mirror = debian_mirror()
    certificates = extra_ca_certificates()
    key = rootfs_key(mirror, certificates)
    tarball = directory / f"python-3.11-slim-standin-{key}.tar"
    started = time.monotonic()
    with (directory / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be making the same one
        if tarball.is_file():
            return RootfsTarball(tarball, False, time.monotonic() - started)
        for stale in directory.glob("python-3.11-slim-standin-*.tar"):
            stale.unlink()
        _debootstrap_tarball(tarball, mirror, certificates)
    return RootfsTarball(tarball, True, time.monotonic() - started)


def _debootstrap_tarball(tarball: Path, mirror: str, certificates: Sequence[Path]) -> None:
    debootstrap = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    if debootstrap is None:
        raise ServerStartError("debootstrap not found: apt-get install -y debootstrap")
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=tarball.parent))
    root = work / "root"
    try:
        _run(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(root),
                mirror,
            ],
            what="debootstrap",
            timeout=DEBOOTSTRAP_TIMEOUT,
            log=work / "debootstrap.log",
        )
        if certificates:
            target = root / "usr/local/share/ca-certificates"
            target.mkdir(parents=True, exist_ok=True)
            for certificate in certificates:
                shutil.copyfile(certificate, target / certificate.name)
            _run(
                ["chroot", str(root), "update-ca-certificates"],
                what="update-ca-certificates in the stand-in",
                timeout=120,
                log=work / "update-ca-certificates.log",
            )
        # As the real slim image: no package cache, no package lists.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        partial = work / "rootfs.tar"
        _run(
            ["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."],
            what="tar of the stand-in root file system",
            timeout=300,
            log=work / "tar.log",
        )
        partial.replace(tarball)
    finally:
        _remove_tree(work)


def _run(argv: list[str], *, what: str, timeout: float, log: Path) -> None:
    with log.open("wb") as out:
        result = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout
        )
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise ServerStartError(f"{what} exited with {result.returncode}:\n{tail}")


def _remove_tree(path: Path) -> None:
    """Remove a debootstrap tree, unmounting whatever a failed run left mounted in it."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    inside = [m.split()[1] for m in mounts if m.split()[1].startswith(f"{path}/")]
    for target in sorted(inside, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def import_base_image(engine: DockerEngine, tarball: Path, name: str = BASE_IMAGE) -> str:
    """``docker import`` the stand-in as ``name``; returns its image ID."""
    changes = [arg for change in BASE_CHANGES for arg in ("--change", change)]
    engine.docker("import", *changes, str(tarball), name, timeout=300)
    return engine.docker("image", "inspect", "--format", "{{.Id}}", name).stdout.strip()


# --- building the Dockerfile -----------------------------------------------------------------


@dataclass(frozen=True)
class ImageConfig:
    """What ``docker image inspect`` says the image runs, and as whom."""

    id: str
    user: str
    entrypoint: list[str]
    cmd: list[str]
    working_dir: str
    env: dict[str, str]
    healthcheck: list[str]


def inspect_image(engine: DockerEngine, name: str) -> ImageConfig:
    (image,) = json.loads(engine.docker("image", "inspect", name).stdout)
    config = image["Config"]
    return ImageConfig(
        id=image["Id"],
        user=config.get("User") or "",
        entrypoint=config.get("Entrypoint") or [],
        cmd=config.get("Cmd") or [],
        working_dir=config.get("WorkingDir") or "",
        env=dict(entry.split("=", 1) for entry in config.get("Env") or []),
        healthcheck=(config.get("Healthcheck") or {}).get("Test") or [],
    )


def build_image(engine: DockerEngine, context: Path, tag: str, log: Path) -> ImageConfig:
    """``docker build --network host -t TAG CONTEXT``: the context's own Dockerfile and
    ``.dockerignore``, the classic builder (the engine is 20.10 without buildx)."""
    argv = ["build", "--network", "host", "--pull=false", "-t", tag, str(context)]
    result = engine.docker(*argv, check=False, timeout=BUILD_TIMEOUT)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise DockerCommandError(
            result.returncode, ["docker", *argv], result.stdout[-6000:], result.stderr[-3000:]
        )
    return inspect_image(engine, tag)


# --- running containers ----------------------------------------------------------------------


@dataclass
class Container:
    """One container of the image, removed (with its anonymous volumes) by ``remove``."""

    engine: DockerEngine
    name: str
    id: str = ""
    stop_timeout: int = 30

    def inspect(self) -> dict[str, Any]:
        result = self.engine.docker("container", "inspect", self.id or self.name)
        (found,) = json.loads(result.stdout)
        assert isinstance(found, dict)
        return found

    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    def health(self) -> str:
        return str((self.inspect()["State"].get("Health") or {}).get("Status", ""))

    def logs(self, tail: int = 200) -> str:
        result = self.engine.docker("logs", "--tail", str(tail), self.id or self.name, check=False)
        return result.stdout + result.stderr

    def pid_uids(self) -> tuple[int, int]:
        """Real and effective uid of the container's first process, as the host sees it."""
        pid = int(self.inspect()["State"]["Pid"])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                real, effective, *_ = line.split()[1:]
                return int(real), int(effective)
        raise AssertionError(f"no Uid line for pid {pid}")

    def remove(self) -> None:
        target = self.id or self.name
        self.engine.docker("stop", "--time", str(self.stop_timeout), target, check=False)
        self.engine.docker("rm", "--force", "--volumes", target, check=False)


@dataclass
class RunSpec:
    """A ``docker run`` of the image: the image's own entrypoint, user, working directory
    and environment, with ``env`` added and ``command`` (empty: the image's ``CMD``)."""

    name: str
    command: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    volumes: Sequence[str] = ()  # -v SOURCE:TARGET
    group_add: Sequence[str] = ()
    healthcheck: bool = True  # False: --no-healthcheck (Compose's `healthcheck: disable`)
    health_interval: str = "1s"  # timing only; the check's command stays the image's
    stop_timeout: int = 30


def run_container(engine: DockerEngine, image: str, spec: RunSpec, env_dir: Path) -> Container:
    env_dir.mkdir(parents=True, exist_ok=True)
    env_file = env_dir / f"{spec.name}.env"
    lines = []
    for key, value in spec.env.items():
        if "\n" in value or "\n" in key or "=" in key:
            raise ValueError(f"environment entry {key!r} cannot go into an env file")
        lines.append(f"{key}={value}\n")
    fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.writelines(lines)
    argv = ["run", "--detach", "--name", spec.name, "--network", "host"]
    argv += ["--env-file", str(env_file), "--stop-timeout", str(spec.stop_timeout)]
    for volume in spec.volumes:
        argv += ["--volume", volume]
    for group in spec.group_add:
        argv += ["--group-add", group]
    if spec.healthcheck:
        argv += ["--health-interval", spec.health_interval, "--health-start-period", "60s"]
    else:
        argv.append("--no-healthcheck")
    container = Container(engine, spec.name, stop_timeout=spec.stop_timeout)
    try:
        container.id = engine.docker(*argv, image, *spec.command, timeout=300).stdout.strip()
    except BaseException:
        container.remove()
        raise
    return container


def wait_healthy(container: Container, timeout: float = 120) -> None:
    """Until the engine reports the image's HEALTHCHECK as passing; fails at once when
    the container stops."""

    def healthy() -> bool:
        state = container.inspect()["State"]
        if not state["Running"]:
            raise AssertionError(
                f"{container.name} exited with {state['ExitCode']}:\n{container.logs()}"
            )
        return (state.get("Health") or {}).get("Status") == "healthy"

    wait_until(
        healthy,
        timeout=timeout,
        what=f"{container.name}'s HEALTHCHECK to pass",
        interval=0.5,
        describe=container.logs,
    )


@contextlib.contextmanager
def containers(engine: DockerEngine) -> Iterator[list[Container]]:
    """A list to put started containers in; every one is stopped and removed after."""
    started: list[Container] = []
    try:
        yield started
    finally:
        for container in reversed(started):
            container.remove()

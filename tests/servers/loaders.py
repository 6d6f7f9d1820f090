"""Real image loaders, for proving that an archive loads and what it loads as.

DCU's archives are meant for other people's tools, so tests hand them to those tools
and compare what each one reports with the source image: the image ID (the config
digest, ``sha256:<hex>``) and the names (``repository:tag``, spelled as each tool spells
them). Every loader here has a private store, ``images()`` lists it and ``remove_all()``
empties it, so one load is seen alone.

What each loader reads (measured with Debian bookworm's packages):

======================  ==========================  ===========================  ====
archive                 ``docker load`` (20.10)     ``podman load`` (4.3.1)      ctr
======================  ==========================  ===========================  ====
docker-archive tar      yes                         yes                          yes
docker-archive .tar.gz  yes (it detects gzip)       no: ``unexpected EOF``       no
oci-archive tar         no (``blobs/json`` error)   yes                          yes
======================  ==========================  ===========================  ====

ctr is ``ctr images import`` (containerd 1.6). ``stdin_gunzip=True`` is the documented
workaround for a gzip archive (``gunzip -c a.tar.gz | podman load``): the archive is
decompressed with Python's ``gzip`` module and fed to the loader's standard input
through a pipe. docker, podman and ctr (``import -``) all read it.

skopeo (1.9.3) is not a store but a converter, so ``SkopeoLoader`` has its own API: it
copies ``docker-archive:PATH[:ref]`` (tar only, never gzip) or ``oci-archive:PATH[:ref]``
into a throwaway ``dir:`` layout (which keeps the config bytes; an ``oci:`` layout
converts a Docker config and changes its digest), or into the test registry, and reads
the config digest of what it wrote.

Names differ by tool for a Docker Hub short name (RepoTag ``busybox:1.0``): docker keeps
``busybox:1.0``, podman says ``localhost/busybox:1.0`` and ctr
``docker.io/library/busybox:1.0``. For an oci-archive, ctr and podman both prefer the
``io.containerd.image.name`` annotation to ``org.opencontainers.image.ref.name``.

``ctr images import`` only imports images for the host platform unless given
``--all-platforms`` (otherwise an archive of, say, one arm64 image fails with "image
might be filtered out"). ``CtrLoader`` passes it by default, as DCU archives images of
any platform; ``all_platforms=False`` is ctr's default, and the only way ctr imports an
index whose other platforms' blobs are missing from the archive.

Errors::

    LoaderError              a loader's answer made no sense, or gunzip failed
    └── LoaderCommandError   a loader command failed (refused an archive, timed out):
                             names the loader and the command, keeps its stderr

Containerd runs as ``Containerd`` (a private root, state and socket, the CRI plugin
off); it fails loudly with ``ServerStartError`` when it cannot start.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from tests.polling import wait_until
from tests.servers.base import ManagedProcess, ServerStartError, log_tail
from tests.servers.docker_engine import UNIX_PATH_MAX, DockerEngine, docker_cli_binary

COMMAND_TIMEOUT = 300.0
"""Seconds any one loader command may take (loads of the large fixture image included)."""
FEED_CHUNK = 1 << 20

INDEX_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
TRANSPORTS = ("docker-archive", "oci-archive")
_IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")
_CTR_UNPACKING = re.compile(r"unpacking (\S+) \((sha256:[0-9a-f]{64})\)\.\.\.done")
_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


class LoaderError(RuntimeError):
    """A loader answered something the harness cannot read, or feeding it failed."""


class LoaderCommandError(LoaderError):
    """A loader's command exited non-zero (or timed out): the loader refused the archive
    or could not do what was asked. ``str()`` names the loader and the command and
    carries the command's stderr (and stdout when stderr is empty)."""

    def __init__(
        self,
        loader: str,
        argv: Sequence[str],
        returncode: int | None,
        stdout: str,
        stderr: str,
        *,
        timeout: float | None = None,
    ) -> None:
        self.loader = loader
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        outcome = f"timed out after {timeout:g}s" if timeout else f"exited with {returncode}"
        detail = stderr.strip() or f"(no stderr) stdout: {stdout.strip()}"
        super().__init__(f"{loader}: `{shlex.join(self.argv)}` {outcome}: {detail}")


@dataclass(frozen=True)
class LoadedImage:
    """One image as a loader reports it."""

    image_id: str
    """``sha256:<hex>``: the image config digest."""
    names: tuple[str, ...]
    """The ``repository:tag`` names the loader gave it, as the loader spells them."""


class Loader(Protocol):
    """A tool that loads an archive into a store of its own."""

    name: str

    def load(self, archive: Path, *, stdin_gunzip: bool = False) -> list[LoadedImage]:
        """Load ``archive`` (from stdin, gunzipped, with ``stdin_gunzip``); one entry per
        image ID, with the names this load gave it (none for an untagged image). Raises
        LoaderCommandError when the loader refuses the archive, LoaderError when
        ``stdin_gunzip`` is asked of a file that does not gunzip."""
        ...

    def images(self) -> list[LoadedImage]:
        """Everything in the store, sorted by image ID, names sorted."""
        ...

    def remove_all(self) -> None:
        """Empty the store."""
        ...


# --- running commands -----------------------------------------------------------------


class _GunzipFeeder(threading.Thread):
    """Decompresses a gzip file into a child's stdin pipe, then closes it."""

    def __init__(self, archive: Path, pipe: IO[bytes]) -> None:
        super().__init__(name=f"gunzip {archive.name}", daemon=True)
        self.archive = archive
        self.pipe = pipe
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with gzip.open(self.archive, "rb") as source:
                while chunk := source.read(FEED_CHUNK):
                    self.pipe.write(chunk)
        except BrokenPipeError:
            pass  # the loader stopped reading; its exit status and stderr say why
        except Exception as exc:  # not gzip, truncated, corrupt: reported by the caller
            self.error = exc
        finally:
            try:
                self.pipe.close()
            except BrokenPipeError:
                pass


def run_loader_command(
    loader: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    gunzip_to_stdin: Path | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> str:
    """Run ``argv`` and return its stdout. With ``gunzip_to_stdin``, that gzip file is
    decompressed into the command's stdin. Raises LoaderCommandError when the command
    fails or times out, LoaderError when it cannot be started or the file not gunzipped.
    """
    argv = list(argv)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if gunzip_to_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=None if env is None else dict(env),
        )
    except OSError as exc:
        raise LoaderError(f"{loader}: cannot run {argv[0]}: {exc}") from exc
    feeder: _GunzipFeeder | None = None
    if gunzip_to_stdin is not None:
        assert proc.stdin is not None
        feeder = _GunzipFeeder(gunzip_to_stdin, proc.stdin)
        proc.stdin = None  # the feeder owns the pipe; communicate() must not close it
        feeder.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        out, err = proc.communicate()
        raise LoaderCommandError(
            loader,
            argv,
            None,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
            timeout=timeout,
        ) from exc
    finally:
        if feeder is not None:
            feeder.join(timeout=60)
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if feeder is not None and feeder.error is not None:
        raise LoaderError(
            f"{loader}: cannot gunzip {gunzip_to_stdin} into `{shlex.join(argv)}`: "
            f"{feeder.error}; the command exited with {proc.returncode}: {stderr.strip()}"
        ) from feeder.error
    if proc.returncode != 0:
        raise LoaderCommandError(loader, argv, proc.returncode, stdout, stderr)
    return stdout


def _group(pairs: Iterable[tuple[str, str | None]]) -> list[LoadedImage]:
    """(image ID, name or None) pairs -> one LoadedImage per ID, in first-seen order."""
    names: dict[str, list[str]] = {}
    for image_id, name in pairs:
        seen = names.setdefault(image_id, [])
        if name is not None and name not in seen:
            seen.append(name)
    return [LoadedImage(image_id, tuple(found)) for image_id, found in names.items()]


def _sorted(images: Iterable[LoadedImage]) -> list[LoadedImage]:
    return sorted(
        (LoadedImage(i.image_id, tuple(sorted(i.names))) for i in images),
        key=lambda i: i.image_id,
    )


def _checked_id(loader: str, value: object, context: str) -> str:
    text = str(value)
    if not text.startswith("sha256:"):
        text = f"sha256:{text}"
    if not _IMAGE_ID.fullmatch(text):
        raise LoaderError(f"{loader}: {context}: {value!r} is not an image ID")
    return text


def _json(loader: str, text: str, context: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise LoaderError(f"{loader}: {context} is not JSON: {text[:2000]!r}") from exc


# --- manifests ------------------------------------------------------------------------


def host_platform() -> tuple[str, str]:
    """``(os, architecture)`` of this machine in OCI (Go) spelling, e.g. linux/amd64."""
    machine = platform.machine().lower()
    return ("linux", _GOARCH.get(machine, machine))


def _pick_manifest(loader: str, index: Mapping[str, Any]) -> str:
    """The digest of the manifest an index (or layout ``index.json``) stands for here:
    its only entry (attestations aside), or else the host platform's."""
    entries = [e for e in index.get("manifests", []) if isinstance(e, dict)]
    real = [e for e in entries if (e.get("platform") or {}).get("os") != "unknown"]
    if len(real) == 1:
        return str(real[0]["digest"])
    os_name, architecture = host_platform()
    for entry in real:
        found = entry.get("platform") or {}
        if found.get("os") == os_name and found.get("architecture") == architecture:
            return str(entry["digest"])
    platforms = [e.get("platform") for e in entries]
    raise LoaderError(
        f"{loader}: no single manifest and none for {os_name}/{architecture} in the index "
        f"(platforms: {platforms})"
    )


def config_digest(loader: str, document: bytes, fetch: Callable[[str], bytes]) -> str:
    """The config digest of an image manifest; an index is followed (``fetch`` returns a
    blob by digest) to its only manifest or the host platform's. Raises LoaderError."""
    for _ in range(8):  # indexes nest, but not forever
        parsed = _json(loader, document.decode(errors="replace"), "a manifest")
        if not isinstance(parsed, dict):
            raise LoaderError(f"{loader}: a manifest is not a JSON object: {parsed!r}")
        if parsed.get("mediaType") in INDEX_MEDIA_TYPES or "manifests" in parsed:
            document = fetch(_pick_manifest(loader, parsed))
            continue
        digest = (parsed.get("config") or {}).get("digest")
        return _checked_id(loader, digest, "config digest of a manifest")
    raise LoaderError(f"{loader}: indexes nested more than 8 deep")


# --- docker ---------------------------------------------------------------------------


@dataclass
class DockerLoader:
    """``docker load`` into an engine (in ``tests/loaders``, one of the loaders' own).

    ``remove_all`` empties that engine: tests share it, so it is emptied before and
    after each use and no test may keep images there between tests.
    """

    engine: DockerEngine
    name: str = field(default="docker", init=False)

    def _docker(self, *args: str, gunzip_to_stdin: Path | None = None) -> str:
        return run_loader_command(
            self.name,
            [docker_cli_binary(), *args],
            env=self.engine.env,
            gunzip_to_stdin=gunzip_to_stdin,
        )

    def load(self, archive: Path, *, stdin_gunzip: bool = False) -> list[LoadedImage]:
        if stdin_gunzip:
            out = self._docker("load", gunzip_to_stdin=archive)
        else:
            out = self._docker("load", "-i", str(archive))
        loaded: list[tuple[str | None, str | None]] = []  # (image ID, name)
        for line in out.splitlines():
            if line.startswith("Loaded image ID: "):
                loaded.append((line.removeprefix("Loaded image ID: ").strip(), None))
            elif line.startswith("Loaded image: "):
                loaded.append((None, line.removeprefix("Loaded image: ").strip()))
        if not loaded:
            raise LoaderError(f"docker: `docker load` reported no image: {out!r}")
        named = [name for image_id, name in loaded if name is not None]
        ids = dict(zip(named, self._ids_of(named), strict=True))
        return _group(
            (
                _checked_id(self.name, image_id or ids[str(name)], "docker load"),
                name,
            )
            for image_id, name in loaded
        )

    def _ids_of(self, references: Sequence[str]) -> list[str]:
        if not references:
            return []
        inspected = _json(self.name, self._docker("image", "inspect", *references), "inspect")
        return [str(image["Id"]) for image in inspected]

    def _listed_ids(self, *, everything: bool) -> list[str]:
        args = ["image", "ls", "--quiet", "--no-trunc"] + (["--all"] if everything else [])
        return list(dict.fromkeys(self._docker(*args).split()))

    def images(self) -> list[LoadedImage]:
        ids = self._listed_ids(everything=True)
        if not ids:
            return []
        inspected = _json(self.name, self._docker("image", "inspect", *ids), "inspect")
        return _sorted(
            LoadedImage(
                _checked_id(self.name, image["Id"], "docker image inspect"),
                tuple(image.get("RepoTags") or ()),
            )
            for image in inspected
        )

    def remove_all(self) -> None:
        """Remove every image: tagged ones first (their untagged parents go with them),
        then whatever untagged images remain. Raises LoaderError if images survive."""
        for _ in range(10):
            ids = self._listed_ids(everything=False) or self._listed_ids(everything=True)
            if not ids:
                return
            self._docker("image", "rm", "--force", *ids)
        raise LoaderError(f"docker: images remain after removing all: {self.images()}")


# --- podman ---------------------------------------------------------------------------


def podman_binary() -> str:
    found = shutil.which("podman")
    if found is None:
        raise ServerStartError("podman not found: apt-get install -y podman")
    return found


@dataclass
class PodmanLoader:
    """``podman load`` as root into private ``vfs`` storage under ``root``.

    No daemon, so nothing to start; ``close`` deletes the storage. podman refuses a
    runroot path longer than 50 characters, so that one lives in a short
    ``/tmp/dcu-podman-XXXXXXXX`` directory. podman's image ID is the config digest's
    hex, reported here as ``sha256:<hex>``.
    """

    root: Path
    name: str = field(default="podman", init=False)
    _runroot: Path | None = field(default=None, init=False, repr=False)

    @property
    def runroot(self) -> Path:
        if self._runroot is None:
            self._runroot = Path(tempfile.mkdtemp(prefix="dcu-podman-", dir="/tmp"))
        return self._runroot

    def _podman(self, *args: str, gunzip_to_stdin: Path | None = None) -> str:
        for directory in ("storage", "tmp"):
            (self.root / directory).mkdir(parents=True, exist_ok=True)
        argv = [
            podman_binary(),
            "--root",
            str(self.root / "storage"),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "vfs",
            "--events-backend",
            "none",
            "--cgroup-manager",
            "cgroupfs",
            "--tmpdir",
            str(self.root / "tmp"),
            *args,
        ]
        env = {**os.environ, "TMPDIR": str(self.root / "tmp")}
        return run_loader_command(self.name, argv, env=env, gunzip_to_stdin=gunzip_to_stdin)

    def load(self, archive: Path, *, stdin_gunzip: bool = False) -> list[LoadedImage]:
        if stdin_gunzip:
            out = self._podman("load", gunzip_to_stdin=archive)
        else:
            out = self._podman("load", "--input", str(archive))
        reported: list[str] = []
        for line in out.splitlines():
            for prefix in ("Loaded image(s): ", "Loaded image: "):
                if line.startswith(prefix):
                    reported += [n.strip() for n in line.removeprefix(prefix).split(",")]
                    break
        if not reported:
            raise LoaderError(f"podman: `podman load` reported no image: {out!r}")
        named = [n for n in reported if not _IMAGE_ID.fullmatch(n)]
        ids: dict[str, str] = {}
        if named:
            inspected = _json(self.name, self._podman("image", "inspect", *named), "inspect")
            ids = {n: str(image["Id"]) for n, image in zip(named, inspected, strict=True)}
        return _group(
            (
                _checked_id(self.name, ids.get(n, n), "podman load"),
                None if _IMAGE_ID.fullmatch(n) else n,
            )
            for n in reported
        )

    def pull(self, archive: Path, ref: str) -> None:
        """``podman pull oci-archive:ARCHIVE:REF``: the one image of a several-image OCI
        archive that ``podman load`` refuses ("more than one image in oci, choose an
        image"). Raises LoaderCommandError."""
        self._podman("pull", "--quiet", f"oci-archive:{archive}:{ref}")

    def images(self) -> list[LoadedImage]:
        listed = _json(self.name, self._podman("images", "--format", "json"), "images")
        return _sorted(
            _group(
                (_checked_id(self.name, image["Id"], "podman images"), name)
                for image in listed
                for name in (image.get("Names") or [None])
            )
        )

    def remove_all(self) -> None:
        self._podman("rmi", "--all", "--force")

    def close(self) -> None:
        """Delete the private storage (vfs layers are plain directories) and runroot."""
        shutil.rmtree(self.root, ignore_errors=True)
        if self._runroot is not None:
            shutil.rmtree(self._runroot, ignore_errors=True)
            self._runroot = None


# --- containerd and ctr ---------------------------------------------------------------


def containerd_binary() -> str:
    found = shutil.which("containerd") or shutil.which("containerd", path="/usr/sbin:/usr/bin")
    if found is None:
        raise ServerStartError("containerd not found: apt-get install -y containerd")
    return found


def ctr_binary() -> str:
    found = shutil.which("ctr")
    if found is None:
        raise ServerStartError("ctr not found: apt-get install -y containerd")
    return found


def _toml_string(value: str | Path) -> str:
    return json.dumps(str(value))  # a JSON string of a path is a TOML basic string


@dataclass
class Containerd:
    """One ``containerd`` with a private root and state, for ``ctr images import``.

    Its data lives under ``root``; its sockets and state in a short
    ``/tmp/dcu-ctrd-XXXXXXXX`` directory (unix socket paths are limited to 107 bytes).
    The CRI plugin is off and nothing listens on TCP. ``stop`` stops it by pid and
    deletes its data, state and socket directories (the log stays in ``root``).
    """

    root: Path
    socket_dir: Path | None = None
    process: ManagedProcess | None = None

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    @property
    def config(self) -> Path:
        return self.root / "containerd.toml"

    @property
    def log(self) -> Path:
        return self.root / "containerd.log"

    @property
    def address(self) -> Path:
        """The gRPC socket ``ctr -a`` talks to."""
        if self.socket_dir is None:
            raise RuntimeError("Containerd.start() has not been called")
        return self.socket_dir / "containerd.sock"

    def config_text(self) -> str:
        assert self.socket_dir is not None
        return "\n".join(
            [
                "version = 2",
                f"root = {_toml_string(self.data_root)}",
                f"state = {_toml_string(self.socket_dir / 'state')}",
                f"temp = {_toml_string(self.root / 'tmp')}",
                'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
                "[grpc]",
                f"  address = {_toml_string(self.address)}",
                "[ttrpc]",
                f"  address = {_toml_string(f'{self.address}.ttrpc')}",
                "[debug]",
                '  address = ""',
                "[metrics]",
                '  address = ""',
                '[plugins."io.containerd.internal.v1.opt"]',
                f"  path = {_toml_string(self.root / 'opt')}",
                "",
            ]
        )

    def start(self) -> Containerd:
        """Start containerd and wait until ``ctr version`` answers; raises ServerStartError."""
        if self.process is not None:
            raise ServerStartError("this containerd is already started")
        self.socket_dir = Path(tempfile.mkdtemp(prefix="dcu-ctrd-", dir="/tmp"))
        if len(f"{self.address}.ttrpc") > UNIX_PATH_MAX:
            raise ServerStartError(f"socket directory path too long: {self.socket_dir}")
        for directory in (self.data_root, self.root / "tmp", self.root / "opt"):
            directory.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.config_text())
        try:
            self.process = ManagedProcess(
                [containerd_binary(), "--config", str(self.config)], log=self.log
            )
            wait_until(
                self._ready,
                timeout=60,
                what="containerd to answer on its socket",
                error=ServerStartError,
                describe=lambda: log_tail(self.log),
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if not self.process.alive():
            raise ServerStartError(
                f"containerd exited with {self.process.proc.returncode}\n{log_tail(self.log)}"
            )
        try:
            answer = subprocess.run(
                [ctr_binary(), "--address", str(self.address), "version"],
                capture_output=True,
                timeout=5,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return answer.returncode == 0

    def ctr(self, namespace: str, *args: str, gunzip_to_stdin: Path | None = None) -> str:
        """Run ``ctr`` against this containerd in ``namespace``; returns stdout. Raises
        LoaderCommandError naming ``ctr``."""
        argv = [ctr_binary(), "--address", str(self.address), "--namespace", namespace, *args]
        return run_loader_command("ctr", argv, gunzip_to_stdin=gunzip_to_stdin)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=30)
            self.process = None
        shutil.rmtree(self.data_root, ignore_errors=True)
        shutil.rmtree(self.root / "tmp", ignore_errors=True)
        shutil.rmtree(self.root / "opt", ignore_errors=True)
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None


@dataclass
class CtrLoader:
    """``ctr images import --snapshotter native`` into one namespace of a Containerd.

    ctr names images itself (see the module docstring) and reports the manifest (or
    index) digest; the image ID reported here is the config digest read from that
    manifest with ``ctr content get``. ctr silently skips an image with no name (an
    untagged docker-archive entry, an oci-archive entry without annotations).
    """

    containerd: Containerd
    namespace: str = "dcu-tests"
    all_platforms: bool = True
    name: str = field(default="ctr", init=False)

    def _ctr(self, *args: str, gunzip_to_stdin: Path | None = None) -> str:
        return self.containerd.ctr(self.namespace, *args, gunzip_to_stdin=gunzip_to_stdin)

    def load(self, archive: Path, *, stdin_gunzip: bool = False) -> list[LoadedImage]:
        argv = ["images", "import", "--snapshotter", "native"]
        if self.all_platforms:
            argv.append("--all-platforms")
        if stdin_gunzip:
            out = self._ctr(*argv, "-", gunzip_to_stdin=archive)
        else:
            out = self._ctr(*argv, str(archive))
        imported = [m.groups() for m in map(_CTR_UNPACKING.fullmatch, out.splitlines()) if m]
        return _group((self.config_digest(digest), name) for name, digest in imported)

    def config_digest(self, manifest_digest: str) -> str:
        """The config digest of the manifest (or index) stored under ``manifest_digest``."""
        return config_digest(self.name, self._blob(manifest_digest), self._blob)

    def _blob(self, digest: str) -> bytes:
        return self._ctr("content", "get", digest).encode()

    def images(self) -> list[LoadedImage]:
        rows = self._ctr("images", "ls").splitlines()[1:]  # REF TYPE DIGEST SIZE ...
        listed = [(fields[0], fields[2]) for fields in map(str.split, rows) if fields]
        return _sorted(_group((self.config_digest(digest), ref) for ref, digest in listed))

    def remove_all(self) -> None:
        refs = self._ctr("images", "ls", "--quiet").split()
        if refs:
            self._ctr("images", "rm", "--sync", *refs)


# --- skopeo ---------------------------------------------------------------------------


def skopeo_binary() -> str:
    found = shutil.which("skopeo")
    if found is None:
        raise ServerStartError("skopeo not found: apt-get install -y skopeo")
    return found


def _source(archive: Path, transport: str, ref: str | None) -> str:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
    if ":" in str(archive):
        raise ValueError(f"skopeo cannot name an archive whose path has a colon: {archive}")
    return f"{transport}:{archive}" + (f":{ref}" if ref else "")


@dataclass
class SkopeoLoader:
    """``skopeo copy`` out of an archive: into a throwaway local layout (``load``) or
    into a registry (``push``), reporting the config digest of what it wrote.

    ``load`` copies into a ``dir:`` layout by default, which keeps the source's manifest
    format and config bytes. ``layout="oci"`` copies into an ``oci:`` layout instead,
    which converts a Docker image to OCI and re-serialises its config on the way, so a
    docker-archive's image then reports a *different* config digest than its source.
    ``registry`` is the ``host:port`` (or ``http://host:port``) of a plain-HTTP registry,
    needed by ``push`` only. Temporary files go under ``workdir`` (default: the system's)
    and are always removed. No policy file is read (``--insecure-policy``).
    """

    registry: str | None = None
    workdir: Path | None = None
    name: str = field(default="skopeo", init=False)

    def _skopeo(self, *args: str) -> str:
        with tempfile.TemporaryDirectory(prefix="dcu-skopeo-tmp-", dir=self.workdir) as tmp:
            argv = [skopeo_binary(), "--insecure-policy", "--tmpdir", tmp, *args]
            return run_loader_command(self.name, argv)

    def load(
        self,
        archive: Path,
        *,
        transport: str,
        ref: str | None = None,
        layout: Literal["dir", "oci"] = "dir",
    ) -> list[LoadedImage]:
        """Copy ``transport:archive[:ref]`` into a ``dir:`` (or ``oci:``) layout; the one
        image copied, named ``ref`` when given. Raises LoaderCommandError, and ValueError
        for a bad transport or layout."""
        source = _source(archive, transport, ref)
        if layout not in ("dir", "oci"):
            raise ValueError(f"layout must be 'dir' or 'oci', not {layout!r}")
        with tempfile.TemporaryDirectory(prefix="dcu-skopeo-", dir=self.workdir) as tmp:
            target = Path(tmp) / "layout"
            self._skopeo("copy", "--quiet", source, f"{layout}:{target}")
            blobs = target if layout == "dir" else target / "blobs" / "sha256"

            def blob(digest: str) -> bytes:
                return (blobs / digest.partition(":")[2]).read_bytes()

            top = target / ("manifest.json" if layout == "dir" else "index.json")
            image_id = config_digest(self.name, top.read_bytes(), blob)
        return [LoadedImage(image_id, (ref,) if ref else ())]

    @property
    def registry_address(self) -> str:
        if self.registry is None:
            raise ValueError("this SkopeoLoader has no registry to push to")
        return self.registry.removeprefix("http://").removeprefix("https://").rstrip("/")

    def push(
        self, archive: Path, *, transport: str, destination: str, ref: str | None = None
    ) -> LoadedImage:
        """Copy ``transport:archive[:ref]`` to ``docker://<registry>/<destination>``
        (``repo:tag``) over plain HTTP; the pushed manifest's config digest, named by the
        full destination reference. Raises LoaderCommandError."""
        source = _source(archive, transport, ref)
        target = f"{self.registry_address}/{destination}"
        self._skopeo("copy", "--quiet", "--dest-tls-verify=false", source, f"docker://{target}")
        name = target.partition("@")[0]
        head, slash, last = name.rpartition("/")
        repository = f"{head}{slash}{last.partition(':')[0]}"

        def fetch(reference: str) -> bytes:
            raw = self._skopeo("inspect", "--raw", "--tls-verify=false", reference)
            return raw.encode()

        image_id = config_digest(
            self.name, fetch(f"docker://{target}"), lambda d: fetch(f"docker://{repository}@{d}")
        )
        return LoadedImage(image_id, (target,))

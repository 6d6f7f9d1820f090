"""A private Docker engine (Debian's ``dockerd``) that touches no network stack.

The engine runs with the ``vfs`` storage driver, without iptables or a bridge, and with
its own data root, exec root, pidfile and unix socket, so it never collides with another
engine on the machine. Containers cannot be *run* here; pull, push, save, load and
``docker build`` of ``FROM scratch`` + ``COPY`` images all work.

Unix socket paths must stay below 108 bytes, so the exec root and the socket live in a
short directory ``/tmp/dcu-XXXXXXXX/``; the (possibly large) data root lives under the
``root`` the caller gives (normally a pytest tmp dir).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.polling import wait_until
from tests.servers.base import ManagedProcess, ServerStartError, log_tail

UNIX_PATH_MAX = 107
"""Longest usable ``sun_path`` (108 bytes including the terminating NUL)."""


class DockerCommandError(subprocess.CalledProcessError):
    """A ``docker`` CLI call failed; unlike its base class, ``str()`` shows stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout!s}\nstderr: {self.stderr!s}"


def dockerd_binary() -> str:
    found = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise ServerStartError("dockerd not found: apt-get install -y docker.io")
    return found


def docker_cli_binary() -> str:
    found = shutil.which("docker")
    if found is None:
        raise ServerStartError("docker CLI not found: apt-get install -y docker.io")
    return found


def ping_unix_socket(path: Path, timeout: float = 2.0) -> bool:
    """Whether an engine answers ``GET /_ping`` with ``200 OK`` on the unix socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            response = b""
            while chunk := sock.recv(4096):
                response += chunk
    except OSError:
        return False
    status_line, _, rest = response.partition(b"\r\n")
    return status_line.split(b" ")[1:2] == [b"200"] and rest.endswith(b"OK")


@dataclass
class DockerEngine:
    """One ``dockerd`` with private directories; ``stop`` removes them all.

    ``socket_dir`` defaults to a fresh ``/tmp/dcu-XXXXXXXX`` directory. Passing one
    whose socket already answers raises ``ServerStartError``: engines are never shared.
    """

    root: Path
    socket_dir: Path | None = None
    process: ManagedProcess | None = None
    storage_driver: str = "vfs"  # works on any file system; overlay2 is much faster
    _made_socket_dir: bool = field(default=False, repr=False)

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    @property
    def pidfile(self) -> Path:
        return self.root / "dockerd.pid"

    @property
    def log(self) -> Path:
        return self.root / "dockerd.log"

    @property
    def config_dir(self) -> Path:
        """A private ``DOCKER_CONFIG`` so the CLI never reads ``~/.docker``."""
        return self.root / "cli-config"

    @property
    def exec_root(self) -> Path:
        return self._socket_dir() / "exec"

    @property
    def socket_path(self) -> Path:
        return self._socket_dir() / "docker.sock"

    @property
    def host(self) -> str:
        """The ``DOCKER_HOST`` value, e.g. ``unix:///tmp/dcu-ab12cd34/docker.sock``."""
        return f"unix://{self.socket_path}"

    @property
    def env(self) -> dict[str, str]:
        """A complete environment for subprocesses that must talk to this engine only."""
        inherited = {
            key: value
            for key, value in os.environ.items()
            if key not in {"DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH"}
        }
        return {
            **inherited,
            "DOCKER_HOST": self.host,
            "DOCKER_CONFIG": str(self.config_dir),
            # The engine is 20.10 and no buildx plugin is installed: use the classic builder.
            "DOCKER_BUILDKIT": "0",
        }

    def _socket_dir(self) -> Path:
        if self.socket_dir is None:
            raise RuntimeError("DockerEngine.start() has not been called")
        return self.socket_dir

    def ping(self) -> bool:
        return self.socket_dir is not None and ping_unix_socket(self.socket_path)

    def start(self) -> DockerEngine:
        if self.socket_dir is None:
            self.socket_dir = Path(tempfile.mkdtemp(prefix="dcu-", dir="/tmp"))
            self._made_socket_dir = True
        longest_socket = self.exec_root / "containerd" / "containerd.sock.ttrpc"
        if len(str(longest_socket)) > UNIX_PATH_MAX:
            raise ServerStartError(f"socket directory path too long: {self.socket_dir}")
        if self.socket_path.exists() and ping_unix_socket(self.socket_path):
            raise ServerStartError(
                f"a Docker engine already listens on {self.socket_path}; refusing to share it"
            )
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        for directory in (self.root, self.data_root, self.config_dir):
            directory.mkdir(parents=True, exist_ok=True)
        argv = [
            dockerd_binary(),
            "--storage-driver",
            self.storage_driver,
            "--iptables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--bridge=none",
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "--pidfile",
            str(self.pidfile),
            "-H",
            self.host,
        ]
        try:
            self.process = ManagedProcess(argv, log=self.log)
            wait_until(
                self._ready,
                timeout=60,
                what=f"dockerd ({self.storage_driver}) to answer on its socket",
                error=ServerStartError,
                describe=lambda: log_tail(self.log),
            )
            driver = self.docker("info", "--format", "{{.Driver}}", timeout=30).stdout.strip()
            if driver != self.storage_driver:
                raise ServerStartError(f"dockerd runs {driver!r}, not {self.storage_driver!r}")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if not self.process.alive():
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise ServerStartError(f"dockerd exited with {self.process.proc.returncode}\n{tail}")
        return ping_unix_socket(self.socket_path, timeout=1.0)

    def docker(
        self, *args: str, check: bool = True, timeout: float = 600.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``docker`` CLI against this engine; raises ``DockerCommandError``."""
        argv = [docker_cli_binary(), *args]
        result = subprocess.run(
            argv,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if check and result.returncode != 0:
            raise DockerCommandError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def forget(self, *references: str) -> None:
        """Remove images from the engine if present, so the next pull really pulls."""
        for reference in references:
            result = self.docker("image", "rm", "--force", reference, check=False)
            if result.returncode != 0 and "No such image" not in result.stderr:
                raise DockerCommandError(result.returncode, result.args, "", result.stderr)

    def stop(self) -> None:
        """Stop dockerd (and its containerd) by pid, then delete every directory it used."""
        containerd_pid = self._containerd_pid()
        if self.process is not None:
            self.process.stop(timeout=30)
            self.process = None
        if containerd_pid is not None:
            _terminate_pid(containerd_pid)
        if self.socket_dir is not None:
            _unmount_below(self.socket_dir)
        _unmount_below(self.data_root)
        shutil.rmtree(self.data_root, ignore_errors=True)
        if self.socket_dir is not None and self._made_socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None
            self._made_socket_dir = False

    def _containerd_pid(self) -> int | None:
        if self.socket_dir is None:
            return None
        try:
            return int((self.exec_root / "containerd" / "containerd.pid").read_text().strip())
        except (OSError, ValueError):
            return None


def _terminate_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM then SIGKILL a process that is not our child (dockerd's containerd)."""
    if not _pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not _pid_alive(pid), timeout=timeout, what=f"pid {pid} to exit")
    except AssertionError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _unmount_below(directory: Path) -> None:
    """Lazily unmount whatever a killed dockerd left mounted at or below ``directory``.

    dockerd bind-mounts its data root onto itself and undoes that on a clean shutdown
    only; after a SIGKILL the mount stays and ``rmtree`` would fail with EBUSY.
    """
    for _ in range(5):  # a path can carry stacked mounts; each umount removes the top one
        inside = _mounts_at_or_below(directory)
        if not inside:
            return
        for target in sorted(inside, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def _mounts_at_or_below(directory: Path) -> set[str]:
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return set()
    targets = {
        fields[1].replace("\\040", " ") for fields in map(str.split, mounts) if len(fields) > 1
    }
    return {t for t in targets if t == str(directory) or t.startswith(f"{directory}/")}

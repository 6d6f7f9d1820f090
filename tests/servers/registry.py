"""A private container registry: Debian's ``docker-registry`` (CNCF Distribution v2).

Storage is a directory under ``root`` and deletion is enabled, so tests can also
remove manifests. The engine treats registries on 127.0.0.0/8 as insecure (plain
HTTP) without extra flags, so ``docker push 127.0.0.1:PORT/...`` just works.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.polling import wait_until
from tests.servers.base import ManagedProcess, ServerStartError, free_port, log_tail


def registry_binary() -> str:
    found = shutil.which("docker-registry")
    if found is None:
        raise ServerStartError("docker-registry not found: apt-get install -y docker-registry")
    return found


MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
)

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""An opener that ignores ``http_proxy``: test servers are always on loopback."""


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The HTTP status ``GET url`` answers with, or ``None`` if nothing answers."""
    try:
        with _DIRECT.open(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)
    except (OSError, ValueError):
        return None


@dataclass
class Registry:
    """One registry process on ``127.0.0.1:<free port>``."""

    root: Path
    port: int = field(default_factory=free_port)
    process: ManagedProcess | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, the prefix of every image reference in this registry."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def config(self) -> Path:
        return self.root / "registry.yml"

    def registry_config(self) -> dict[str, Any]:
        """The registry's configuration (subclasses add sections)."""
        return {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.address},
        }

    def start(self) -> Registry:
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps(self.registry_config(), indent=2))  # JSON is YAML
        log = self.root / "registry.log"
        self.process = ManagedProcess([registry_binary(), "serve", str(self.config)], log=log)
        try:
            wait_until(
                self._ready,
                timeout=30,
                what="docker-registry to answer",
                error=ServerStartError,
                describe=lambda: log_tail(log),
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if not self.process.alive():
            raise ServerStartError(
                f"docker-registry exited with {self.process.proc.returncode}\n"
                + self.process.log.read_text(errors="replace")[-3000:]
            )
        return self._answers()

    def _answers(self) -> bool:
        """Whether the registry's API answers as this kind of registry should."""
        return http_status(f"{self.url}/v2/") == 200

    def catalog(self) -> list[str]:
        """Repository names the registry holds (``GET /v2/_catalog``)."""
        with _DIRECT.open(f"{self.url}/v2/_catalog?n=1000", timeout=10) as response:
            return list(json.load(response)["repositories"])

    def manifest(self, repo: str, reference: str) -> dict[str, Any]:
        """The image manifest (Docker v2 schema 2 or OCI) of ``repo`` at a tag or digest."""
        request = urllib.request.Request(
            f"{self.url}/v2/{repo}/manifests/{reference}",
            headers={"Accept": ", ".join(MANIFEST_TYPES)},
        )
        with _DIRECT.open(request, timeout=10) as response:
            manifest: dict[str, Any] = json.load(response)
            return manifest

    def stop(self) -> None:
        """Stop the registry by pid and delete its storage (fixture images are large)."""
        if self.process is not None:
            self.process.stop()
            self.process = None
        shutil.rmtree(self.storage, ignore_errors=True)

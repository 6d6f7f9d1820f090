"""Registry credentials for pulls: ``docker.registries`` over ``docker.config_file``.

The file is parsed by ``kernel.docker_config`` (the settings check it when they load)
and read again here when it changes, so rotated credentials need no restart.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kernel.docker_config import (
    DockerConfigError,
    RegistryCredentials,
    read_docker_config,
    registry_key,
)
from kernel.settings import DockerSettings

__all__ = ["DockerConfigError", "RegistryAuth"]

log = logging.getLogger(__name__)


class RegistryAuth:
    """Credentials by registry: ``docker.registries`` over ``docker.config_file``."""

    def __init__(self, settings: DockerSettings) -> None:
        self._configured = {registry_key(h): c for h, c in settings.registries.items()}
        self._path = Path(settings.config_file) if settings.config_file else None
        self._from_file: dict[str, RegistryCredentials] = {}
        self._stamp: tuple[int, int] | None = None

    def load(self) -> dict[str, RegistryCredentials]:
        """Every registry's credentials, the file re-read when it changed.

        Raises DockerConfigError when the file is missing, unreadable or malformed.
        """
        if self._path is not None:
            try:
                stat = self._path.stat()
            except OSError as exc:
                raise DockerConfigError(
                    f"cannot read docker.config_file {self._path}: {exc.strerror}"
                ) from None
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                self._from_file = read_docker_config(self._path)
                self._stamp = stamp
                log.info(
                    "read credentials for %d registries from %s",
                    len(self._from_file),
                    self._path,
                )
        return {**self._from_file, **self._configured}

    def credentials(self, host: str) -> RegistryCredentials | None:
        """The credentials for registry ``host`` (a reference's registry_host), or None."""
        return self.load().get(registry_key(host))

"""Registry credentials for pulls: ``docker.registries`` and a Docker client config file.

``docker.config_file`` names a Docker client config (``~/.docker/config.json``); its
``auths`` section gives credentials per registry, as ``{"auth": base64("user:password")}``
(what ``docker login`` writes) or ``{"username": ..., "password": ...}``. Entries of
``docker.registries`` win over the file's. Keys are normalised the same way on both
sides: scheme and path dropped, lower-cased, and Docker Hub's aliases
(``https://index.docker.io/v1/``, ``registry-1.docker.io``) become ``docker.io``, the
registry of shorthand names. Credential helpers (``credsStore``, ``credHelpers``) and
identity tokens are not used; entries holding only those are skipped.

The file is read again when it changes, so rotated credentials need no restart. Errors
(``DockerConfigError``) name the file and the entry, never a value.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from events.reference import DEFAULT_REGISTRY
from kernel.settings import DockerSettings, RegistryCredentials

log = logging.getLogger(__name__)

DOCKER_HUB_ALIASES = frozenset(
    {DEFAULT_REGISTRY, "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)


class DockerConfigError(ValueError):
    """The Docker config file cannot be read or holds a malformed entry."""


def registry_key(server: str) -> str:
    """``https://Registry.Example:5000/v2/`` -> ``registry.example:5000``; Hub -> docker.io."""
    name = server.strip().lower()
    name = name.partition("://")[2] if "://" in name else name
    name = name.partition("/")[0]
    return DEFAULT_REGISTRY if name in DOCKER_HUB_ALIASES else name


def _entry(server: str, entry: Any, source: str) -> RegistryCredentials | None:
    where = f"{source}: auths[{server!r}]"
    if not isinstance(entry, dict):
        raise DockerConfigError(f"{where} is not an object")
    encoded = entry.get("auth")
    if encoded:
        if not isinstance(encoded, str):
            raise DockerConfigError(f"{where}.auth is not a string")
        try:
            padded = encoded.strip() + "=" * (-len(encoded.strip()) % 4)
            decoded = base64.b64decode(padded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise DockerConfigError(f"{where}.auth is not base64 of user:password") from None
        username, colon, password = decoded.partition(":")
        if not colon or not username:
            raise DockerConfigError(f"{where}.auth is not base64 of user:password")
        return RegistryCredentials(username=username, password=SecretStr(password))
    user, secret = entry.get("username"), entry.get("password")
    if user is None and secret is None:
        return None  # an identity token or a credential helper's placeholder
    if not isinstance(user, str) or not user or not isinstance(secret, str):
        raise DockerConfigError(f"{where} needs a username and a password (strings)")
    return RegistryCredentials(username=user, password=SecretStr(secret))


def parse_docker_config(text: str, source: str) -> dict[str, RegistryCredentials]:
    """Credentials by registry key from a Docker config's JSON; raises DockerConfigError."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:  # its text has a position, not the document
        raise DockerConfigError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise DockerConfigError(f"{source} is not a JSON object")
    auths = document.get("auths", {})
    if not isinstance(auths, dict):
        raise DockerConfigError(f"{source}: auths is not an object")
    found: dict[str, RegistryCredentials] = {}
    for server, entry in auths.items():
        credentials = _entry(server, entry, source)
        if credentials is not None:
            found[registry_key(server)] = credentials
    if document.get("credsStore") or document.get("credHelpers"):
        log.warning("%s: credential helpers are not used; only auths entries are", source)
    return found


def read_docker_config(path: Path) -> dict[str, RegistryCredentials]:
    """``parse_docker_config`` of the file at ``path``; raises DockerConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise DockerConfigError(f"cannot read docker.config_file {path}: {reason}") from None
    return parse_docker_config(text, str(path))


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

"""Docker client config files (``~/.docker/config.json``): their ``auths`` as credentials.

``docker.config_file`` names one; its ``auths`` section gives credentials per registry, as
``{"auth": base64("user:password")}`` (what ``docker login`` writes) or
``{"username": ..., "password": ...}``. Keys are normalised: scheme and path dropped,
lower-cased, and Docker Hub's aliases (``https://index.docker.io/v1/``,
``registry-1.docker.io``) become ``docker.io``, the registry of shorthand names.
Credential helpers (``credsStore``, ``credHelpers``) and identity tokens are not used;
entries holding only those are skipped. Errors (``DockerConfigError``) name the file and
the entry, never a value.

In the kernel because the settings check the file when they load (a ``field_validator``
on ``docker.config_file``), and ``actors.registry_auth`` reads it again when it changes.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from events.reference import DEFAULT_REGISTRY
from kernel.errors import ConfigError

log = logging.getLogger(__name__)


class RegistryCredentials(BaseModel):
    username: str
    password: SecretStr


class DockerConfigError(ConfigError, ValueError):
    """The Docker config file cannot be read or holds a malformed entry."""


DOCKER_HUB_ALIASES = frozenset(
    {DEFAULT_REGISTRY, "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)


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

"""Image references: validation against the distribution grammar and normalisation.

Parsing uses ``docker_image.reference`` (a port of distribution/reference's grammar); this
module adds what that port leaves out: length and character limits checked *before* the
regular expressions run (so 10 000-character or control-character input costs nothing), and
the engine defaults (``docker.io``, ``latest``). Raises ``InvalidReference`` with a message a
caller can act on; never anything else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from docker_image import reference as _grammar

# distribution/reference: a repository name (host included) is at most 255 characters, a
# tag at most 128; the longest digest we accept is sha512 (7 + 128 hex).
NAME_MAX = 255
TAG_MAX = 128
REFERENCE_MAX = NAME_MAX + 1 + TAG_MAX + 1 + 7 + 128
DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"

_ALLOWED = re.compile(r"[a-z0-9A-Z._:/@+-]+")


class InvalidReference(ValueError):
    """The text is not a valid image reference; ``str()`` says why."""


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A parsed reference: ``[registry/]path[:tag][@digest]`` as the caller wrote it."""

    original: str
    registry: str | None  # as written (``127.0.0.1:5000``), None for Docker Hub shorthand
    path: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """Repository name as written, registry included when given."""
        return f"{self.registry}/{self.path}" if self.registry else self.path

    @property
    def registry_host(self) -> str:
        """The registry the engine will contact (``docker.io`` for shorthand names)."""
        return self.registry or DEFAULT_REGISTRY

    @property
    def repository(self) -> str:
        """The repository as the registry API names it: ``nginx`` on Docker Hub is
        ``library/nginx``."""
        if self.registry_host == DEFAULT_REGISTRY and "/" not in self.path:
            return f"library/{self.path}"
        return self.path

    @property
    def canonical(self) -> str:
        """The fully qualified reference: ``nginx`` is ``docker.io/library/nginx:latest``.
        A reference by digest keeps the digest (``host/repo@sha256:...``) unless it names
        a tag too (then the tag form: the name an image loaded from an archive gets)."""
        name = f"{self.registry_host}/{self.repository}"
        if self.digest and not self.tag:
            return f"{name}@{self.digest}"
        return f"{name}:{self.tag or DEFAULT_TAG}"

    @property
    def pull_tag(self) -> str:
        """What the engine's ``fromImage``/``tag`` pair needs as the tag: digest wins."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def pinned(self) -> str:
        """The reference the engine knows the pulled image by (tag or digest form)."""
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag or DEFAULT_TAG}"

    def __str__(self) -> str:
        return self.original


def _split_domain(name: str) -> tuple[str | None, str]:
    """distribution's splitDockerDomain: the first component is a registry host only when
    it has a dot or a port, or is ``localhost`` (the port's ``split_hostname`` wrongly
    treats ``library/nginx``'s ``library`` as one)."""
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return None, name


def parse_reference(text: object) -> ImageReference:
    """Validate ``text`` as an image reference.

    Raises InvalidReference for anything that is not a string of the distribution grammar,
    with a message naming the first problem found.
    """
    if not isinstance(text, str):
        raise InvalidReference("docker_image_name must be a string")
    if not text:
        raise InvalidReference("docker_image_name must not be empty")
    if len(text) > REFERENCE_MAX:
        raise InvalidReference(
            f"docker_image_name is {len(text)} characters long; at most {REFERENCE_MAX} allowed"
        )
    if not _ALLOWED.fullmatch(text):
        bad = next(ch for ch in text if not _ALLOWED.fullmatch(ch))
        raise InvalidReference(
            f"docker_image_name contains a character not allowed in image references: {bad!r}"
        )
    try:
        parsed = _grammar.Reference.parse(text)
    except _grammar.NameContainsUppercase as exc:
        raise InvalidReference("docker_image_name: repository name must be lowercase") from exc
    except _grammar.NameTooLong as exc:
        raise InvalidReference(
            f"docker_image_name: repository name longer than {NAME_MAX} characters"
        ) from exc
    except _grammar.ReferenceInvalidFormat as exc:
        raise InvalidReference(
            f"docker_image_name is not a valid image reference: {text!r}"
        ) from exc
    except Exception as exc:  # the grammar port raises a few undocumented kinds
        raise InvalidReference(f"docker_image_name is not a valid image reference: {exc}") from exc
    domain, path = _split_domain(parsed["name"])
    tag = parsed["tag"]
    if tag is not None and len(tag) > TAG_MAX:
        raise InvalidReference(f"docker_image_name: tag longer than {TAG_MAX} characters")
    return ImageReference(
        original=text, registry=domain, path=path, tag=tag, digest=parsed["digest"]
    )


def registry_refusal(ref: ImageReference, allowed: Sequence[str]) -> str | None:
    """Why ``ref`` may not be pulled under the allow-list ``allowed``, or None when it may.

    An empty list allows every registry. Entries are ``host[:port]``; Docker Hub shorthand
    (``nginx``) is ``docker.io``. The host compares case-insensitively and the port
    exactly: ``registry.local:5000`` allows neither ``registry.local`` nor
    ``registry.local:5001``.
    """
    if not allowed:
        return None
    host = ref.registry_host.lower()
    if host in {entry.lower() for entry in allowed}:
        return None
    return f"registry {host} is not allowed; allowed: {', '.join(allowed)}"

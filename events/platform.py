"""Image platforms (``os/architecture[/variant]``): parsing, normalisation, matching.

Plain Python, shared by the gateway (validating ``platform`` in a start request) and the
registry engine (choosing a manifest from a manifest list or OCI index). Normalisation
follows containerd's ``platforms.Normalize``, the rules every engine applies: ``x86_64``
is ``amd64``, ``aarch64`` is ``arm64`` whose default variant is ``v8``, ``armhf`` is
``arm/v7``. Written here rather than taken from a library: no maintained Python package
implements these rules, and they are twenty lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from events.limits import PLATFORM_MAX

DEFAULT_PLATFORM = "linux/amd64"
# Checked before lowering: ``str.lower`` maps some non-ASCII letters (the Kelvin sign) to
# ASCII ones.
PART_PATTERN = "[A-Za-z0-9_.-]{1,20}"
PLATFORM_PATTERN = f"^{PART_PATTERN}/{PART_PATTERN}(/{PART_PATTERN})?$"
_PART = re.compile(PART_PATTERN)

_ARCH_ALIASES = {
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
    "i386": ("386", ""),
}


class InvalidPlatform(ValueError):
    """The text is not ``os/architecture[/variant]``; ``str()`` says why."""


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        parts = [self.os, self.architecture] + ([self.variant] if self.variant else [])
        return "/".join(parts)

    def matches(self, other: Platform) -> bool:
        """Whether an image built for ``other`` serves a request for ``self``.

        OS and architecture must be equal; a request without a variant takes any variant,
        and the default variants (``arm64`` ``v8``) compare equal to none.
        """
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return not self.variant or self.variant == other.variant


def normalise(os_name: str, architecture: str, variant: str = "") -> Platform:
    os_name = os_name.lower()
    architecture = architecture.lower()
    variant = variant.lower()
    alias = _ARCH_ALIASES.get(architecture)
    if alias is not None:
        architecture, implied = alias
        variant = variant or implied
    if architecture == "arm64" and variant in {"v8", "8", "v8.0"}:
        variant = ""  # arm64's only variant in practice; containerd drops it too
    if architecture == "arm" and variant in {"", "5", "6", "7", "8"}:
        variant = f"v{variant or 7}"
    if architecture == "amd64" and variant == "v1":
        variant = ""
    return Platform(os_name, architecture, variant)


def parse_platform(text: object) -> Platform:
    """``linux/arm64`` -> Platform; raises InvalidPlatform with a message a caller can act on."""
    if not isinstance(text, str):
        raise InvalidPlatform("platform must be a string such as linux/amd64")
    if not text or len(text) > PLATFORM_MAX:
        raise InvalidPlatform(f"platform must be 1-{PLATFORM_MAX} characters, e.g. linux/arm64")
    parts = text.split("/")
    if len(parts) not in {2, 3} or not all(_PART.fullmatch(part) for part in parts):
        raise InvalidPlatform(
            f"platform {text[:PLATFORM_MAX]!r} is not os/architecture[/variant], e.g. linux/arm64"
        )
    return normalise(*parts)


def from_descriptor(entry: Mapping[str, Any]) -> Platform | None:
    """The platform of a manifest list / OCI index entry, None when it names none."""
    platform = entry.get("platform")
    if not isinstance(platform, Mapping):
        return None
    os_name, arch = platform.get("os"), platform.get("architecture")
    variant = platform.get("variant")
    variant = variant if isinstance(variant, str) else ""  # a malformed variant: none
    parts = (os_name, arch) + ((variant,) if variant else ())
    if not all(isinstance(part, str) and _PART.fullmatch(part) for part in parts):
        return None  # not a platform a request could name: never chosen, never listed
    return normalise(str(os_name), str(arch), str(variant))


def choose(wanted: Platform, candidates: Iterable[Platform]) -> int | None:
    """The index of the best candidate for ``wanted``: an exact match first, then one that
    matches without the variant; None when none serves it."""
    listed = list(candidates)
    for index, candidate in enumerate(listed):
        if candidate == wanted:
            return index
    for index, candidate in enumerate(listed):
        if wanted.matches(candidate):
            return index
    return None

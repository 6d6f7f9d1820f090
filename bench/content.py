"""Realistic, partly compressible image content for the benchmarks, chosen by a seed.

Real images are mostly ELF binaries and shared libraries (gzip shrinks them to about
40%), source and text files (about 25%), some already-compressed or random assets
(100%) and logs (5-10%). ``image_layers`` builds layer file maps (``tests.servers.oci``
``LayerFiles``) of that mix:

* **binaries**: real ELF files from ``/usr/lib``, ``/usr/bin``, ``/usr/sbin``, ``/usr/libexec``;
* **text**: real source and text files (``.py``, ``.h``, ``.pm``, ``.txt``, ...) from
  ``/usr/lib``, ``/usr/share``, ``/usr/include``;
* **logs**: generated log lines (``LogText``);
* **noise**: seeded random bytes (``Noise``).

Which real files are taken is a seeded shuffle of a sorted listing, so a seed gives the
same image on the same machine (another machine's ``/usr`` gives other bytes). No real
file appears twice in an image.
"""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1 << 20
BINARY_ROOTS = ("/usr/lib", "/usr/bin", "/usr/sbin", "/usr/libexec")
TEXT_ROOTS = ("/usr/lib", "/usr/share", "/usr/include")
TEXT_SUFFIXES = frozenset(
    {".py", ".h", ".hpp", ".c", ".cc", ".pm", ".pl", ".txt", ".html", ".rst", ".md"}
    | {".js", ".css", ".xml", ".json", ".sh", ".conf", ".ini", ".yaml", ".yml", ".tcl"}
)
NOISE_FILE = 32 * MIB
LOG_FILE = 16 * MIB


@dataclass(frozen=True)
class Noise:
    """``size`` seeded random bytes (incompressible, like encrypted or packed assets)."""

    size: int
    seed: int

    def chunks(self) -> Iterator[bytes]:
        rng = random.Random(self.seed)
        remaining = self.size
        while remaining > 0:
            length = min(4 * MIB, remaining)
            yield rng.randbytes(length)
            remaining -= length


_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "DEBUG", "WARN", "ERROR")
_COMPONENTS = ("http", "db.pool", "cache", "auth", "scheduler", "worker", "s3", "metrics")
_MESSAGES = (
    "request completed method=GET path=/api/v1/items/{n} status=200 bytes={b} ms={ms}",
    "request completed method=POST path=/api/v1/orders status=201 bytes={b} ms={ms}",
    "connection acquired pool=primary in_use={n} idle={ms}",
    "cache miss key=user:{n}:profile ttl=300",
    "token refreshed user_id={n} expires_in=3600",
    "job finished id={n} queue=default attempts=1 duration_ms={ms}",
    "upload part={n} size={b} etag={h}",
    "slow query took {ms} ms: select * from items where owner_id = {n} order by created_at",
)


@dataclass(frozen=True)
class LogText:
    """``size`` bytes of seeded application log lines (highly compressible)."""

    size: int
    seed: int

    def chunks(self) -> Iterator[bytes]:
        rng = random.Random(self.seed)
        remaining = self.size
        second = 1_700_000_000
        while remaining > 0:
            lines = []
            length = 0
            while length < MIB:
                bits = rng.getrandbits(128)  # one draw per line: fields from its bits
                second += bits & 1
                message = _MESSAGES[(bits >> 1) & 7].format(
                    n=(bits >> 4) % 99_999 + 1,
                    b=(bits >> 21) % 2_000_000 + 100,
                    ms=(bits >> 42) % 5000 + 1,
                    h=f"{(bits >> 64) & 0xFFFFFFFFFFFFFFFF:016x}",
                )
                line = (
                    f"{second} {_LEVELS[(bits >> 55) % 7]:5} [{_COMPONENTS[(bits >> 58) & 7]}] "
                    f"req={(bits >> 96) & 0xFFFFFFFF:08x} {message}\n"
                )
                lines.append(line)
                length += len(line)
            chunk = "".join(lines).encode()[:remaining]
            remaining -= len(chunk)
            yield chunk


def _is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"\x7fELF"
    except OSError:
        return False


def _regular_files(roots: Sequence[str]) -> Iterator[tuple[Path, int]]:
    for root in roots:
        for directory, subdirs, names in os.walk(root):
            subdirs.sort()
            for name in sorted(names):
                path = Path(directory, name)
                try:
                    info = path.lstat()
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode) and info.st_size > 0 and os.access(path, os.R_OK):
                    yield path, info.st_size


@dataclass
class RealFiles:
    """Seeded picks of real files, never the same file twice."""

    seed: int
    used: set[Path] = field(default_factory=set)
    _binaries: list[tuple[Path, int]] | None = None
    _texts: list[tuple[Path, int]] | None = None

    def _listing(self, kind: str) -> list[tuple[Path, int]]:
        if kind == "binary":
            if self._binaries is None:
                found = {
                    path: size
                    for path, size in _regular_files(BINARY_ROOTS)
                    if size >= 16_384 and _is_elf(path)
                }
                self._binaries = self._shuffled(found, 1)
            return self._binaries
        if self._texts is None:
            found = {
                path: size
                for path, size in _regular_files(TEXT_ROOTS)
                if path.suffix in TEXT_SUFFIXES
            }
            self._texts = self._shuffled(found, 2)
        return self._texts

    def _shuffled(self, found: dict[Path, int], salt: int) -> list[tuple[Path, int]]:
        listing = sorted(found.items())
        random.Random(self.seed * 1000 + salt).shuffle(listing)
        return listing

    def pick(self, kind: str, budget: int) -> dict[str, Path]:
        """Real files of ``kind`` (``binary`` or ``text``) totalling about ``budget`` bytes.

        Raises RuntimeError when the machine has too few unused files of that kind.
        """
        picked: dict[str, Path] = {}
        total = 0
        for path, size in self._listing(kind):
            if total >= budget:
                break
            if path in self.used or size > budget - total + MIB:
                continue
            self.used.add(path)
            picked[str(path).lstrip("/")] = path
            total += size
        if total < budget * 0.9:
            raise RuntimeError(f"only {total} bytes of {kind} files found for {budget}")
        return picked


@dataclass(frozen=True)
class LayerMix:
    binary: float = 0.0
    text: float = 0.0
    logs: float = 0.0
    noise: float = 0.0


IMAGE_SHAPE = (
    LayerMix(binary=0.19, text=0.06),  # the OS base: libraries, tools
    LayerMix(binary=0.19, text=0.09),  # a language runtime and its packages
    LayerMix(binary=0.06, noise=0.25),  # the application and its packed assets
    LayerMix(text=0.03, logs=0.09, noise=0.04),  # data, configuration, logs
)
"""Fractions of the image size per layer and kind: in all about 44% binaries, 18% text,
9% logs and 29% noise, which gzip -6 takes to roughly 50-55% of the tar."""


def _split(
    prefix: str, total: int, piece: int, make: type[Noise] | type[LogText], seed: int
) -> dict[str, Noise | LogText]:
    files: dict[str, Noise | LogText] = {}
    index = 0
    while total > 0:
        size = min(piece, total)
        files[f"{prefix}-{index:03d}"] = make(size, seed * 100_000 + index)
        total -= size
        index += 1
    return files


def image_layers(
    total_bytes: int, seed: int, shape: Sequence[LayerMix] = IMAGE_SHAPE
) -> list[dict[str, Path | Noise | LogText]]:
    """Layer file maps of about ``total_bytes`` in all, deterministic from ``seed``."""
    real = RealFiles(seed)
    layers: list[dict[str, Path | Noise | LogText]] = []
    for index, mix in enumerate(shape):
        files: dict[str, Path | Noise | LogText] = {}
        if mix.binary:
            files.update(real.pick("binary", int(total_bytes * mix.binary)))
        if mix.text:
            files.update(real.pick("text", int(total_bytes * mix.text)))
        if mix.logs:
            files.update(
                _split(
                    f"var/log/app/layer{index}/app.log",
                    int(total_bytes * mix.logs),
                    LOG_FILE,
                    LogText,
                    seed * 10 + index,
                )
            )
        if mix.noise:
            files.update(
                _split(
                    f"opt/app/assets/layer{index}/pack.bin",
                    int(total_bytes * mix.noise),
                    NOISE_FILE,
                    Noise,
                    seed * 10 + index,
                )
            )
        layers.append(files)
    return layers


def layer_bytes(files: dict[str, Path | Noise | LogText]) -> int:
    return sum(c.stat().st_size if isinstance(c, Path) else c.size for c in files.values())

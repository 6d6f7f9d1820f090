"""A content-addressed blob cache on the work volume, shared by every task and process.

Layout under ``download.cache_path``::

    sha256/<hex>             a verified blob (only ever appears whole: renamed into place)
    sha256/<hex>.layer.json  what inflating it found (diff_id, tar size, spliceable)
    tmp/<hex>.<rand>.part    a blob being fetched (removed on failure, swept when stale)
    locks/<hex>.lock         flock held while one task fetches that blob

A task never reads the cache directly: the download stage hard-links each blob into the
task's own directory, so an eviction (which only unlinks the cache's name) can never pull
a blob from under a compress stage running elsewhere. Eviction is least-recently-used by
mtime (a hit touches the file) down to ``download.cache_max_bytes``; it runs after every
download and with the scheduled archive cleanup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from actors.archive import LayerInfo
from events.naming import is_sha256_hex
from kernel.errors import StorageError

log = logging.getLogger(__name__)

_STALE_PART_SECONDS = 24 * 3600


@dataclass(frozen=True, slots=True)
class Eviction:
    removed: int
    freed_bytes: int
    kept_bytes: int


def _hex(digest: str) -> str:
    algorithm, _, value = digest.partition(":")
    if algorithm != "sha256" or not is_sha256_hex(value):
        raise ValueError(f"not a sha256 digest: {digest[:80]!r}")
    return value


class BlobCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def _dirs(self) -> None:
        for name in ("sha256", "tmp", "locks"):
            (self.root / name).mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / "sha256" / _hex(digest)

    def lookup(self, digest: str) -> Path | None:
        """The cached blob, its mtime touched (LRU), or None."""
        path = self.path(digest)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def lock_path(self, digest: str) -> Path:
        """The file whose ``flock`` the fetcher of ``digest`` holds."""
        self._dirs()
        return self.root / "locks" / f"{_hex(digest)}.lock"

    def part(self, digest: str) -> Path:
        self._dirs()
        return self.root / "tmp" / f"{_hex(digest)}.{uuid.uuid4().hex[:12]}.part"

    def drop_parts(self, digest: str) -> int:
        """Remove ``digest``'s ``.part`` files; call it holding the blob's fetch lock, when
        any such file is a dead fetch's (a killed worker's) and no live one's."""
        removed = 0
        for part in (self.root / "tmp").glob(f"{_hex(digest)}.*.part"):
            with contextlib.suppress(FileNotFoundError):
                if part.is_file() and not part.is_symlink():
                    part.unlink()
                    removed += 1
        return removed

    def commit(self, part: Path, digest: str) -> Path:
        """Move a verified ``part`` into place atomically; a concurrent copy already there
        wins (same content) and ``part`` is dropped."""
        final = self.path(digest)
        os.replace(part, final)
        return final

    def layer_info(self, digest: str) -> LayerInfo | None:
        sidecar = self.path(digest).with_suffix(".layer.json")
        try:
            data = json.loads(sidecar.read_text())
            return LayerInfo(
                diff_id=str(data["diff_id"]),
                tar_size=int(data["tar_size"]),
                spliceable=bool(data["spliceable"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save_layer_info(self, digest: str, info: LayerInfo) -> None:
        sidecar = self.path(digest).with_suffix(".layer.json")
        part = sidecar.with_name(f"{sidecar.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            part.write_text(json.dumps(dataclasses.asdict(info)))
            os.replace(part, sidecar)
        except OSError as exc:  # only a lost shortcut: the next task inflates again
            log.warning("cannot record layer info for %s: %s", digest, exc)
            with contextlib.suppress(OSError):
                part.unlink()

    def link_into(self, digest: str, dest: Path) -> None:
        """Give ``dest`` the cached blob: a hard link (no copy), or a copy across devices.

        Raises FileNotFoundError when the blob was evicted meanwhile, StorageError when
        the copy fails.
        """
        source = self.path(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        try:
            os.link(source, dest)
        except OSError as exc:
            if exc.errno not in {errno.EXDEV, errno.EPERM, errno.EMLINK}:
                raise
            try:
                shutil.copyfile(source, dest)
            except OSError as copy_exc:
                with contextlib.suppress(OSError):
                    dest.unlink()
                if isinstance(copy_exc, FileNotFoundError):
                    raise
                if copy_exc.errno == errno.ENOSPC:
                    raise StorageError(f"disk full while copying a blob to {dest}") from copy_exc
                raise StorageError(f"cannot copy {source} to {dest}: {copy_exc}") from copy_exc

    def evict(self, max_bytes: int | None = None) -> Eviction:
        """Unlink least-recently-used blobs until the cache holds at most ``max_bytes``
        (default ``cache_max_bytes``); sweeps ``.part`` and lock files older than a day."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        blobs = self.root / "sha256"
        entries: list[tuple[float, int, Path]] = []
        if blobs.is_dir():
            for path in blobs.iterdir():
                if path.suffix == ".json" or path.name.endswith(".part"):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = path.lstat()
                    if path.is_file() and not path.is_symlink():
                        entries.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in entries)
        removed = freed = 0
        for _, size, path in sorted(entries):
            if total <= limit:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                path.with_suffix(".layer.json").unlink(missing_ok=True)
                removed += 1
                freed += size
                total -= size
        now = time.time()
        # Old lock files too: removing one a fetch still holds costs at most a duplicate
        # fetch (both copies are verified and renamed into place atomically).
        for folder, pattern in (("tmp", "*.part"), ("locks", "*.lock")):
            if not (self.root / folder).is_dir():
                continue
            for stale in (self.root / folder).glob(pattern):
                with contextlib.suppress(FileNotFoundError):
                    if now - stale.lstat().st_mtime > _STALE_PART_SECONDS:
                        stale.unlink()
        if removed:
            log.info(
                "blob cache: evicted %d blobs (%d bytes); %d bytes kept", removed, freed, total
            )
        return Eviction(removed=removed, freed_bytes=freed, kept_bytes=total)

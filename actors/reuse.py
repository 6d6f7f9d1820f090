"""Digest reuse: a task whose archive was already packaged copies the object instead.

An archive's content is fixed by its format, the image manifest's digest (one platform's:
it pins the config and every layer) and the names written into it, so equal keys
(``registry_engine.reuse_key``) mean equal archives. After each upload a small pointer
object ``<prefix>reuse/<key>.json`` names the object that holds the archive; a later task
with the same key finds the pointer, checks that the object still exists with the same
key, size and sha256 in its metadata, and has the upload stage copy it server-side.

Any doubt is a miss: a missing, stale or unreadable pointer, an object that was cleaned
or changed, or a store error while looking. A miss costs one small GET.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from actors.object_store import ObjectInfo, ObjectStore
from actors.registry_engine import ResolvedImage, repo_tags, reuse_key
from events.formats import ArchiveFormat
from events.naming import UnsafeName, reuse_pointer_name
from events.reference import ImageReference
from events.schema import Compressed
from kernel.errors import StorageError

log = logging.getLogger(__name__)

_POINTER_MAX = 64 * 1024


@dataclass(frozen=True, slots=True)
class Reusable:
    object: str
    image_id: str
    sha256: str
    size: int
    platform: str | None


def key_for(manifest_digest: str, ref: ImageReference, fmt: ArchiveFormat) -> str:
    names = repo_tags(ref) if fmt.docker_layout else (ref.canonical,)
    return reuse_key(manifest_digest, names, fmt)


async def find(
    store: ObjectStore,
    prefix: str,
    resolved: ResolvedImage,
    ref: ImageReference,
    fmt: ArchiveFormat,
) -> Reusable | None:
    """The object already holding this task's archive in format ``fmt``, or None."""
    key = key_for(resolved.manifest.digest, ref, fmt)
    try:
        raw = await store.get_bytes(reuse_pointer_name(prefix, key), limit=_POINTER_MAX)
        if raw is None:
            return None
        pointer = json.loads(raw)
        name = str(pointer["object"])
        info = await store.stat(name)
    except (StorageError, UnsafeName, ValueError, KeyError, TypeError) as exc:
        log.warning("reuse pointer %s unusable, packaging %s again: %s", key, ref, exc)
        return None
    if info is None:
        return None
    if (
        info.metadata.get("dcu-reuse-key") != key
        or info.size != pointer.get("size")
        or info.metadata.get("dcu-sha256") != pointer.get("sha256")
        or not info.metadata.get("dcu-image-id")
    ):
        log.info("reuse pointer %s names %s, which no longer matches; packaging again", key, name)
        return None
    return _reusable(info)


async def describe(store: ObjectStore, name: str) -> Reusable | None:
    """Size and checksum of a reused object, from its metadata (None when it is gone)."""
    info = await store.stat(name)
    return None if info is None else _reusable(info)


def _reusable(info: ObjectInfo) -> Reusable:
    meta = info.metadata
    return Reusable(
        object=info.name,
        image_id=meta.get("dcu-image-id", ""),
        sha256=meta.get("dcu-sha256", ""),
        size=info.size,
        platform=meta.get("dcu-platform"),
    )


async def remember(
    store: ObjectStore,
    prefix: str,
    ref: ImageReference,
    name: str,
    payload: Compressed,
    fmt: ArchiveFormat,
) -> None:
    """Point this archive's key at ``name``; a failure only costs a later reuse."""
    if not payload.manifest_digest:
        return
    key = key_for(payload.manifest_digest, ref, fmt)
    pointer = {
        "object": name,
        "size": payload.bytes_out,
        "sha256": payload.sha256,
        "image_id": payload.image_id,
        "manifest_digest": payload.manifest_digest,
        "platform": payload.platform,
    }
    try:
        await store.put_bytes(
            reuse_pointer_name(prefix, key),
            json.dumps(pointer).encode(),
            {"dcu-reuse-key": key},
        )
    except StorageError as exc:
        log.warning("could not record reuse pointer for %s: %s", name, exc)

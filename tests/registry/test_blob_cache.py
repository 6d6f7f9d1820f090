"""The blob cache: atomic entries, hard links that outlive eviction, LRU order."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from actors.archive import LayerInfo
from actors.blob_cache import BlobCache


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put(cache: BlobCache, data: bytes, mtime: float | None = None) -> str:
    digest = digest_of(data)
    part = cache.part(digest)
    part.write_bytes(data)
    final = cache.commit(part, digest)
    if mtime is not None:
        os.utime(final, (mtime, mtime))
    return digest


def test_an_entry_appears_whole_and_is_found(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", max_bytes=1 << 20)
    digest = digest_of(b"layer")
    assert cache.lookup(digest) is None
    part = cache.part(digest)
    part.write_bytes(b"layer")
    assert cache.lookup(digest) is None  # a part is never visible as the blob
    cache.commit(part, digest)
    found = cache.lookup(digest)
    assert found is not None and found.read_bytes() == b"layer"
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_a_task_link_survives_eviction(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", max_bytes=0)
    digest = put(cache, b"base layer")
    task_blob = tmp_path / "work" / "task" / "blobs" / digest.partition(":")[2]
    cache.link_into(digest, task_blob)
    evicted = cache.evict()
    assert evicted.removed == 1 and evicted.kept_bytes == 0
    assert cache.lookup(digest) is None
    assert task_blob.read_bytes() == b"base layer"


def test_eviction_removes_least_recently_used_first(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", max_bytes=25)
    now = time.time()
    old = put(cache, b"a" * 10, now - 300)
    used = put(cache, b"b" * 10, now - 200)
    new = put(cache, b"c" * 10, now - 100)
    assert cache.lookup(used) is not None  # a hit makes it the most recent
    cache.save_layer_info(old, LayerInfo(diff_id="sha256:" + "0" * 64, tar_size=1, spliceable=True))
    evicted = cache.evict()
    assert evicted.removed == 1 and evicted.freed_bytes == 10
    assert cache.lookup(old) is None and cache.layer_info(old) is None
    assert cache.lookup(used) is not None and cache.lookup(new) is not None
    assert cache.evict().removed == 0


def test_layer_info_round_trips(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", max_bytes=1 << 20)
    digest = put(cache, b"x")
    info = LayerInfo(diff_id="sha256:" + "1" * 64, tar_size=1024, spliceable=False)
    cache.save_layer_info(digest, info)
    assert cache.layer_info(digest) == info


def test_stale_parts_are_swept_and_young_ones_kept(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", max_bytes=1 << 20)
    stale = cache.part(digest_of(b"s"))
    stale.write_bytes(b"s")
    two_days_ago = time.time() - 2 * 86400
    os.utime(stale, (two_days_ago, two_days_ago))
    young = cache.part(digest_of(b"y"))
    young.write_bytes(b"y")
    cache.evict()
    assert not stale.exists() and young.exists()


@pytest.mark.parametrize(
    "bad", ["sha256:../../etc/passwd", "md5:" + "0" * 32, "sha256:" + "G" * 64]
)
def test_only_sha256_digests_name_entries(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        BlobCache(tmp_path, 1).path(bad)


def test_a_dead_fetchs_parts_are_dropped_and_others_kept(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", max_bytes=1 << 20)
    dead = cache.part(digest_of(b"x"))
    dead.write_bytes(b"half")
    other = cache.part(digest_of(b"y"))
    other.write_bytes(b"another blob's")
    assert cache.drop_parts(digest_of(b"x")) == 1
    assert not dead.exists() and other.exists()

"""The gzip cleaner on a real directory tree, with an injected clock (no waiting)."""

from __future__ import annotations

import hashlib
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from actors.blob_cache import BlobCache
from actors.cleanup import clean_gzip, run_cleanup
from events.cleanup import CleanupKind
from kernel.settings import load_settings

NOW = datetime.now(UTC).replace(microsecond=0)
OLD = (NOW - timedelta(days=2)).timestamp()  # retention is 1 day
NEW = (NOW - timedelta(hours=1)).timestamp()


def task_id() -> str:
    return str(uuid.uuid4())


def write(path: Path, size: int, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (mtime, mtime))
    return path


def age_dir(path: Path, mtime: float) -> None:
    os.utime(path, (mtime, mtime), follow_symlinks=False)


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    gzip, work, outside = tmp_path / "gzip", tmp_path / "work", tmp_path / "outside"
    for path in (gzip, work, outside):
        path.mkdir()
    return gzip, work, outside


def test_removes_only_expired_dcu_archives_and_never_follows_links(roots) -> None:
    gzip, work, outside = roots
    # Given a gzip root with expired and young archives of DCU's shape ...
    expired_task, young_task, part_task, mixed_task = (task_id() for _ in range(4))
    expired = write(gzip / expired_task / "nginx_latest.tar.gz", 1000, OLD)
    young = write(gzip / young_task / "app_v1.tar.gz", 200, NEW)
    stale_part = write(gzip / part_task / "app.tar.gz.part", 30, OLD)
    mixed_old = write(gzip / mixed_task / "old.tar.gz", 4, OLD)
    # ... and things DCU did not write (or must not reach through a link), all old
    foreign_in_task = write(gzip / mixed_task / "notes.txt", 7, OLD)
    notes = write(gzip / "notes.txt", 11, OLD)
    non_uuid = write(gzip / "not-a-task" / "old.tar.gz", 13, OLD)
    upper = write(gzip / task_id().upper() / "old.tar.gz", 17, OLD)
    nested = write(gzip / task_id() / "nested" / "deep.tar.gz", 19, OLD)
    uuid_file = write(gzip / task_id(), 23, OLD)
    victim_dir = outside / "victims"
    victim = write(victim_dir / "victim.tar.gz", 29, OLD)
    linked_dir = gzip / task_id()
    linked_dir.symlink_to(victim_dir, target_is_directory=True)
    target = write(outside / "target.tar.gz", 31, OLD)
    link_task = task_id()
    (gzip / link_task).mkdir()
    link = gzip / link_task / "link.tar.gz"
    link.symlink_to(target)
    age_dir(link, OLD)
    empty_old, empty_new = gzip / task_id(), gzip / task_id()
    empty_old.mkdir()
    empty_new.mkdir()
    for task in (expired_task, part_task, mixed_task, link_task):
        age_dir(gzip / task, OLD)
    age_dir(empty_old, OLD)
    age_dir(nested.parent.parent, OLD)

    # When the cleaner runs with a one-day retention
    result = clean_gzip(gzip, work, NOW, 1)

    # Then exactly the expired archives (and the stale part) are gone ...
    assert result.kind is CleanupKind.GZIP
    assert result.errors == []
    assert result.deleted == 3
    assert result.bytes_freed == 1000 + 30 + 4
    for gone in (expired, stale_part, mixed_old):
        assert not gone.exists()
    # ... with the task directories they leave empty, and an old empty one
    assert not (gzip / expired_task).exists()
    assert not (gzip / part_task).exists()
    assert not empty_old.exists()
    # ... while everything else survives, links and their targets included
    for kept in (young, foreign_in_task, notes, non_uuid, upper, nested, uuid_file, victim, target):
        assert kept.is_file(), kept
    assert linked_dir.is_symlink() and link.is_symlink()
    assert empty_new.is_dir()
    assert (gzip / mixed_task).is_dir()
    # the young archive and the two links are DCU-shaped but left alone
    assert result.kept == 3


def test_removes_abandoned_work_dirs_only(roots) -> None:
    gzip, work, outside = roots
    abandoned, busy, mixed = task_id(), task_id(), task_id()
    tar = write(work / abandoned / "image.tar", 500, OLD)
    part = write(work / abandoned / "image.tar.part", 50, OLD)
    young_part = write(work / busy / "image.tar.part", 60, NEW)
    old_of_busy = write(work / busy / "image.tar", 70, OLD)
    mixed_tar = write(work / mixed / "image.tar", 5, OLD)
    foreign = write(work / mixed / "keep.me", 3, OLD)
    other = write(work / "scratch" / "image.tar", 9, OLD)
    outside_tar = write(outside / "image.tar", 8, OLD)
    linked = work / task_id()
    linked.symlink_to(outside, target_is_directory=True)
    for task in (abandoned, mixed):
        age_dir(work / task, OLD)

    result = clean_gzip(gzip, work, NOW, 1)

    assert result.errors == []
    assert result.deleted == 3
    assert result.bytes_freed == 500 + 50 + 5
    assert not tar.exists() and not part.exists() and not (work / abandoned).exists()
    assert not mixed_tar.exists()
    # a work dir with anything recent in it is still in use: untouched
    assert young_part.exists() and old_of_busy.exists()
    for kept in (foreign, other, outside_tar):
        assert kept.exists()
    assert (work / mixed).is_dir() and linked.is_symlink()
    assert result.kept == 2 + 1  # the busy dir's two files, the linked dir


def test_missing_roots_are_nothing_to_clean(tmp_path: Path) -> None:
    result = clean_gzip(tmp_path / "nope", tmp_path / "nope-either", NOW, 1)
    assert (result.deleted, result.kept, result.errors) == (0, 0, [])


def test_a_file_that_cannot_be_removed_is_reported_and_the_run_goes_on(
    roots, monkeypatch: pytest.MonkeyPatch
) -> None:
    gzip, work, _ = roots
    stuck_task, fine_task = task_id(), task_id()
    stuck = write(gzip / stuck_task / "a.tar.gz", 1, OLD)
    gone = write(gzip / fine_task / "b.tar.gz", 2, OLD)
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if path == "a.tar.gz":
            raise PermissionError(1, "Operation not permitted")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    result = clean_gzip(gzip, work, NOW, 1)
    monkeypatch.undo()

    assert not gone.exists() and stuck.exists()
    assert (result.deleted, result.bytes_freed) == (1, 2)
    assert result.errors == [f"{stuck_task}/a.tar.gz: Operation not permitted"]


def test_naive_now_is_refused_before_anything_is_touched(roots) -> None:
    gzip, work, _ = roots
    archive = write(gzip / task_id() / "a.tar.gz", 1, OLD)
    with pytest.raises(ValueError):
        clean_gzip(gzip, work, NOW.replace(tzinfo=None), 1)
    assert archive.exists()


def test_removes_an_abandoned_registry_download_without_following_links(roots) -> None:
    # Given a registry download abandoned long ago: its plan and hard links to blobs
    gzip, work, outside = roots
    abandoned = task_id()
    blob_name = "ab" * 32
    plan = write(work / abandoned / "plan.json", 40, OLD)
    blob = write(work / abandoned / "blobs" / blob_name, 300, OLD)
    stray = write(work / abandoned / "blobs" / "not-a-digest", 7, OLD)
    secret = write(outside / "secret", 11, OLD)
    (work / abandoned / "blobs" / ("cd" * 32)).symlink_to(secret)
    age_dir(work / abandoned / "blobs", OLD)
    age_dir(work / abandoned, OLD)

    # When the cleaner runs
    result = clean_gzip(gzip, work, NOW, 1)

    # Then the plan and the blob link are gone, the stranger and the link's target stay
    assert result.errors == []
    assert not plan.exists() and not blob.exists()
    assert result.deleted == 2 and result.bytes_freed == 40 + 300
    assert stray.exists() and secret.exists()


async def test_the_scheduled_archive_cleanup_evicts_the_blob_cache(tmp_path: Path) -> None:
    # Given a blob cache holding more than its limit, oldest first
    settings = load_settings(
        None,
        storage={"gzip_path": str(tmp_path / "gzip"), "work_path": str(tmp_path / "work")},
        download={"cache_max_bytes": 150},
    )
    cache = BlobCache(Path(settings.download.cache_path), settings.download.cache_max_bytes)
    blobs = []
    for index, mtime in enumerate((OLD, NEW, NOW.timestamp())):
        data = bytes([index]) * 100
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        part = cache.part(digest)
        part.write_bytes(data)
        os.utime(cache.commit(part, digest), (mtime, mtime))
        blobs.append(digest)
    # When the gzip cleanup runs
    result = await run_cleanup(CleanupKind.GZIP, settings, store=None, now=NOW)  # type: ignore[arg-type]
    # Then the two least recently used blobs went, and the run counts them
    assert result.errors == []
    assert result.deleted == 2 and result.bytes_freed == 200
    assert [cache.lookup(d) is not None for d in blobs] == [False, False, True]

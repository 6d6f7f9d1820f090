"""The object cleaner, one contract run against the S3 store (moto) and the local store.

Objects are uploaded now; their age is judged against an injected ``now`` in the future.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from actors.cleanup import clean_objects
from actors.object_store import ObjectInfo, ObjectStore
from events.cleanup import CleanupKind
from kernel.errors import StorageError


async def put(store: ObjectStore, tmp_path: Path, name: str, size: int) -> str:
    source = tmp_path / uuid.uuid4().hex
    source.write_bytes(b"z" * size)
    await store.put_file(name, source, {"dcu-sha256": "x"})
    return name


async def names(store: ObjectStore) -> set[str]:
    return {info.name for info in await store.list("")}


async def test_removes_expired_dcu_objects_only(object_store: ObjectStore, tmp_path: Path) -> None:
    # Given two DCU archives and keys DCU never writes, under and outside the prefix
    first = await put(object_store, tmp_path, f"dcu/{uuid.uuid4()}/nginx_latest.tar.gz", 300)
    second = await put(object_store, tmp_path, f"dcu/{uuid.uuid4()}/app_v1.tar.gz", 45)
    foreign = {
        await put(object_store, tmp_path, "dcu/notes.tar.gz", 5),
        await put(object_store, tmp_path, f"dcu/{uuid.uuid4()}/readme.txt", 6),
        await put(object_store, tmp_path, f"dcu/{uuid.uuid4()}/deeper/x.tar.gz", 7),
        await put(object_store, tmp_path, f"other/{uuid.uuid4()}/x.tar.gz", 8),
    }
    now = datetime.now(UTC)

    # When the cleaner runs while they are younger than the retention
    young = await clean_objects(object_store, "dcu/", now + timedelta(days=6), 7)

    # Then nothing is removed and the two archives are counted as kept
    assert (young.deleted, young.bytes_freed, young.kept, young.errors) == (0, 0, 2, [])
    assert await names(object_store) == {first, second} | foreign

    # When it runs once they are older than the retention
    result = await clean_objects(object_store, "dcu", now + timedelta(days=8), 7)

    # Then exactly the two archives are gone
    assert result.kind is CleanupKind.OBJECTS
    assert (result.deleted, result.bytes_freed, result.kept, result.errors) == (2, 345, 0, [])
    assert await names(object_store) == foreign
    assert await object_store.stat(first) is None

    # And a second run finds nothing left to do
    again = await clean_objects(object_store, "dcu/", now + timedelta(days=8), 7)
    assert (again.deleted, again.kept, again.errors) == (0, 0, [])


async def test_zero_retention_expires_what_was_just_uploaded(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    name = await put(object_store, tmp_path, f"dcu/{uuid.uuid4()}/a.tar.gz", 10)
    result = await clean_objects(object_store, "dcu/", datetime.now(UTC) + timedelta(seconds=2), 0)
    assert (result.deleted, result.bytes_freed) == (1, 10)
    assert await object_store.stat(name) is None


class BrokenStore:
    """A store whose listing or removals fail, as an unreachable S3 does."""

    location = "s3://broken/bucket"

    def __init__(self, objects: list[ObjectInfo], fail_list: bool = False) -> None:
        self.objects = objects
        self.fail_list = fail_list

    async def list(self, prefix: str) -> list[ObjectInfo]:
        if self.fail_list:
            raise StorageError("S3 at s3://broken/bucket: listing dcu/ failed: timed out")
        return self.objects

    async def remove(self, name: str) -> None:
        if name.endswith("b.tar.gz"):
            raise StorageError(f"S3 at s3://broken/bucket: removing {name} failed: AccessDenied")


async def test_store_failures_become_errors_not_exceptions() -> None:
    old = datetime(2020, 1, 1, tzinfo=UTC)
    task = uuid.uuid4()
    objects = [
        ObjectInfo(name=f"dcu/{task}/a.tar.gz", size=1, last_modified=old),
        ObjectInfo(name=f"dcu/{task}/b.tar.gz", size=2, last_modified=old),
    ]
    now = datetime.now(UTC)

    failed_list = await clean_objects(BrokenStore(objects, fail_list=True), "dcu/", now, 7)  # type: ignore[arg-type]
    assert failed_list.deleted == 0
    assert failed_list.errors and "timed out" in failed_list.errors[0]

    partial = await clean_objects(BrokenStore(objects), "dcu/", now, 7)  # type: ignore[arg-type]
    assert (partial.deleted, partial.bytes_freed) == (1, 1)
    assert len(partial.errors) == 1 and "AccessDenied" in partial.errors[0]


async def test_naive_now_is_refused(object_store: ObjectStore) -> None:
    with pytest.raises(ValueError):
        await clean_objects(object_store, "dcu/", datetime.now(), 7)

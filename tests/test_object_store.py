"""The object-store contract, run against the real S3 server (moto) and the local store."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from actors import object_store as object_store_module
from actors.object_store import LocalObjectStore, ObjectStore, S3ObjectStore
from kernel.errors import StorageError
from kernel.settings import MinioSettings
from tests.servers.s3 import MIN_PART_SIZE, S3Server

MIB = 1024 * 1024
PART = MIN_PART_SIZE  # object_store's part size: a few MiB make a multipart upload
STALE = 90.0  # seconds: 3 x the default nats.ack_wait, what the upload stage passes


def s3_settings(s3_server: S3Server, **overrides) -> MinioSettings:
    return s3_server.minio_settings(bucket=f"dcu-{uuid.uuid4().hex[:8]}", **overrides)


async def _start_unfinished_upload(store: ObjectStore, name: str, tmp_path: Path) -> None:
    """Leave what a worker killed mid-upload leaves: S3 parts, or a local part file."""
    if isinstance(store, S3ObjectStore):
        await store.ensure_bucket()
        bucket = store._settings.bucket
        upload_id = await store.client._create_multipart_upload(bucket, name, {})
        # one small part: parts under 5 MiB are refused only when the upload completes
        await store.client._upload_part(bucket, name, b"x" * 1024, None, upload_id, 1)
    else:
        assert isinstance(store, LocalObjectStore)
        target = store._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.with_name(target.name + ".part").write_bytes(b"half")


async def test_put_stat_list_fetch_remove(object_store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "a.tar.gz"
    source.write_bytes(b"archive-bytes" * 1000)
    name = f"dcu/{uuid.uuid4()}/a.tar.gz"
    stored = await object_store.put_file(name, source, {"dcu-sha256": "abc"})
    assert stored.size == source.stat().st_size
    info = await object_store.stat(name)
    assert info is not None and info.metadata["dcu-sha256"] == "abc"
    assert [o.name for o in await object_store.list("dcu/")] == [name]
    copy = tmp_path / "copy"
    await object_store.fetch(name, copy)
    assert copy.read_bytes() == source.read_bytes()
    await object_store.remove(name)
    assert await object_store.stat(name) is None


async def test_unfinished_uploads_are_aborted(object_store: ObjectStore, tmp_path: Path) -> None:
    # Given an upload that died half-way, and a finished object beside it
    name = f"dcu/{uuid.uuid4()}/image.tar.gz"
    other = f"dcu/{uuid.uuid4()}/other.tar.gz"
    source = tmp_path / "o.tar.gz"
    source.write_bytes(b"done")
    await object_store.put_file(other, source, {})
    await _start_unfinished_upload(object_store, name, tmp_path)
    # When the next attempt cleans up first, long after the dead one's last part
    later = datetime.now(UTC) + timedelta(seconds=STALE + 60)
    assert await object_store.abort_incomplete(name, older_than=STALE, now=later) == 1
    # Then nothing of the dead attempt is left, and nothing else was touched
    assert await object_store.abort_incomplete(name, older_than=None) == 0
    assert await object_store.stat(name) is None
    assert await object_store.stat(other) is not None


async def test_a_young_unfinished_upload_is_left_to_its_run(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    # Given an upload whose last part was written just now (a duplicate run still going)
    name = f"dcu/{uuid.uuid4()}/image.tar.gz"
    await _start_unfinished_upload(object_store, name, tmp_path)
    # When another run of the same upload starts and cleans up by the real clock
    aborted = await object_store.abort_incomplete(name, older_than=STALE)
    # Then the live upload is left alone
    assert aborted == 0
    # and it is only aborted once it has been quiet for longer than the threshold
    later = datetime.now(UTC) + timedelta(seconds=STALE + 60)
    assert await object_store.abort_incomplete(name, older_than=STALE, now=later) == 1
    assert await object_store.abort_incomplete(name, older_than=None) == 0


async def test_every_unfinished_upload_goes_without_a_threshold(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    name = f"dcu/{uuid.uuid4()}/image.tar.gz"
    await _start_unfinished_upload(object_store, name, tmp_path)
    assert await object_store.abort_incomplete(name, older_than=None) == 1
    assert await object_store.abort_incomplete(name, older_than=None) == 0


async def test_local_store_refuses_names_that_escape(tmp_path: Path) -> None:
    store = LocalObjectStore(MinioSettings(local_path=str(tmp_path / "objects")))
    for bad in ("../outside", "/etc/passwd", "a/../../b"):
        with pytest.raises(StorageError):
            await store.stat(bad)


@pytest.fixture
async def s3_store(s3_server) -> AsyncIterator[S3ObjectStore]:
    opened = S3ObjectStore(s3_settings(s3_server, part_size=PART))
    try:
        yield opened
    finally:
        await opened.close()


async def _pending_uploads(store: S3ObjectStore, name: str) -> list[str]:
    result = await store.client._list_multipart_uploads(store._settings.bucket, prefix=name)
    return [upload.upload_id for upload in result.uploads if upload.object_name == name]


async def test_multipart_upload_round_trips(object_store: ObjectStore, tmp_path: Path) -> None:
    # Given a file of three and a half parts
    source = tmp_path / "big.tar.gz"
    source.write_bytes(os.urandom(7 * PART // 2))
    size = source.stat().st_size
    name = f"dcu/{uuid.uuid4()}/big.tar.gz"
    calls: list[tuple[int, int | None]] = []
    # When it is uploaded
    stored = await object_store.put_file(
        name, source, {"dcu-task-id": "t1"}, lambda done, total: calls.append((done, total))
    )
    # Then the object is the file, with its metadata, and progress went up to the end
    assert stored.size == size
    assert stored.metadata == {"dcu-task-id": "t1"}
    copy = tmp_path / "copy"
    await object_store.fetch(name, copy)
    assert copy.read_bytes() == source.read_bytes()
    assert calls[-1] == (size, size)
    assert all(total == size for _, total in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    if isinstance(object_store, S3ObjectStore):
        assert len(calls) == 4
        obj = await object_store.client.stat_object(object_store._settings.bucket, name)
        assert obj.etag is not None and obj.etag.endswith("-4")
        assert obj.content_type == "application/gzip"


@pytest.mark.parametrize("size", [pytest.param(0, id="empty"), pytest.param(1, id="one-byte")])
async def test_files_smaller_than_a_part(
    object_store: ObjectStore, tmp_path: Path, size: int
) -> None:
    source = tmp_path / "small.tar.gz"
    source.write_bytes(b"x" * size)
    name = f"dcu/{uuid.uuid4()}/small.tar.gz"
    calls: list[tuple[int, int | None]] = []
    stored = await object_store.put_file(
        name, source, {}, lambda done, total: calls.append((done, total))
    )
    assert stored.size == size
    assert calls[-1] == (size, size)
    copy = tmp_path / "copy"
    await object_store.fetch(name, copy)
    assert copy.read_bytes() == source.read_bytes()


async def test_upload_checks_the_sha256_given(object_store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "a.tar.gz"
    source.write_bytes(os.urandom(PART + 1000))
    right = hashlib.sha256(source.read_bytes()).hexdigest()
    name = f"dcu/{uuid.uuid4()}/a.tar.gz"
    # When the file does not hash to the sha256 given (it changed since it was hashed)
    with pytest.raises(StorageError, match="sha256"):
        await object_store.put_file(name, source, {}, sha256=hashlib.sha256(b"other").hexdigest())
    # Then nothing is stored, not even an unfinished upload
    assert await object_store.stat(name) is None
    assert await object_store.abort_incomplete(name, older_than=None) == 0
    # And with the right one, the upload goes through
    stored = await object_store.put_file(name, source, {}, sha256=right)
    assert stored.size == source.stat().st_size


async def test_refused_upload_keeps_the_object_it_would_replace(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    name = f"dcu/{uuid.uuid4()}/a.tar.gz"
    first = tmp_path / "first"
    first.write_bytes(b"first")
    await object_store.put_file(name, first, {"attempt": "1"})
    second = tmp_path / "second"
    second.write_bytes(b"second")
    with pytest.raises(StorageError):
        await object_store.put_file(name, second, {"attempt": "2"}, sha256="0" * 64)
    info = await object_store.stat(name)
    assert info is not None and info.metadata == {"attempt": "1"}


async def test_failed_upload_leaves_no_unfinished_upload(
    s3_store: S3ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a server connection that breaks while part 3 is sent
    source = tmp_path / "a.tar.gz"
    source.write_bytes(os.urandom(4 * PART))
    name = f"dcu/{uuid.uuid4()}/a.tar.gz"
    upload_part = s3_store.client._upload_part

    async def breaking(bucket, object_name, data, headers, upload_id, part_number, *rest):
        if part_number == 3:
            raise aiohttp.ClientOSError(104, "Connection reset by peer")
        return await upload_part(bucket, object_name, data, headers, upload_id, part_number)

    monkeypatch.setattr(s3_store.client, "_upload_part", breaking)
    # When the file is uploaded
    with pytest.raises(StorageError, match="Connection reset by peer") as caught:
        await s3_store.put_file(name, source, {})
    # Then the error names the endpoint, and the multipart upload was aborted
    assert s3_store.location in str(caught.value)
    assert await _pending_uploads(s3_store, name) == []
    assert await s3_store.stat(name) is None


async def test_cancelled_upload_leaves_no_unfinished_upload(
    s3_store: S3ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "a.tar.gz"
    source.write_bytes(os.urandom(3 * PART))
    name = f"dcu/{uuid.uuid4()}/a.tar.gz"
    upload_part = s3_store.client._upload_part
    stalled = asyncio.Event()

    async def stalling(bucket, object_name, data, headers, upload_id, part_number, *rest):
        if part_number == 2:
            stalled.set()
            await asyncio.Event().wait()
        return await upload_part(bucket, object_name, data, headers, upload_id, part_number)

    monkeypatch.setattr(s3_store.client, "_upload_part", stalling)
    upload = asyncio.create_task(s3_store.put_file(name, source, {}))
    await asyncio.wait_for(stalled.wait(), 30)
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    assert await _pending_uploads(s3_store, name) == []
    assert await s3_store.stat(name) is None


async def test_an_abort_the_server_refuses_once_is_tried_again(
    s3_store: S3ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen under load: moto answered 500 to the abort of a cancelled upload whose part
    was still being processed, and the unfinished upload stayed."""
    source = tmp_path / "a.tar.gz"
    source.write_bytes(os.urandom(3 * PART))
    name = f"dcu/{uuid.uuid4()}/a.tar.gz"
    upload_part = s3_store.client._upload_part
    abort = s3_store.client._abort_multipart_upload
    refused: list[str] = []

    async def failing(bucket, object_name, data, headers, upload_id, part_number, *rest):
        if part_number == 2:
            raise OSError("connection reset while uploading part 2")
        return await upload_part(bucket, object_name, data, headers, upload_id, part_number)

    async def refused_once(bucket, object_name, upload_id):
        if not refused:
            refused.append(upload_id)
            raise ValueError("non-XML response from server; Response code: 500")
        return await abort(bucket, object_name, upload_id)

    monkeypatch.setattr(s3_store.client, "_upload_part", failing)
    monkeypatch.setattr(s3_store.client, "_abort_multipart_upload", refused_once)
    monkeypatch.setattr(object_store_module, "ABORT_BACKOFF", 0.0)

    with pytest.raises(StorageError, match="part 2"):
        await s3_store.put_file(name, source, {})

    assert len(refused) == 1
    assert await _pending_uploads(s3_store, name) == []


async def test_copy_replaces_the_metadata(object_store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "a.tar.gz"
    source.write_bytes(b"archive-bytes" * 1000)
    original = f"dcu/{uuid.uuid4()}/a.tar.gz"
    await object_store.put_file(original, source, {"dcu-task-id": "t1", "dcu-sha256": "abc"})
    dest = f"dcu/{uuid.uuid4()}/a.tar.gz"
    copied = await object_store.copy(original, dest, {"dcu-task-id": "t2"})
    assert copied.name == dest
    assert copied.size == source.stat().st_size
    assert copied.metadata == {"dcu-task-id": "t2"}
    info = await object_store.stat(original)
    assert info is not None and info.metadata == {"dcu-task-id": "t1", "dcu-sha256": "abc"}
    fetched = tmp_path / "fetched"
    await object_store.fetch(dest, fetched)
    assert fetched.read_bytes() == source.read_bytes()
    if isinstance(object_store, S3ObjectStore):
        obj = await object_store.client.stat_object(object_store._settings.bucket, dest)
        assert obj.content_type == "application/gzip"


async def test_copy_of_a_missing_object_fails(object_store: ObjectStore) -> None:
    missing = f"dcu/{uuid.uuid4()}/gone.tar.gz"
    with pytest.raises(StorageError, match=f"{missing} does not exist"):
        await object_store.copy(missing, f"dcu/{uuid.uuid4()}/a.tar.gz", {})


async def test_put_and_get_bytes(object_store: ObjectStore) -> None:
    name = f"dcu/reuse/{uuid.uuid4()}.json"
    data = b'{"object": "dcu/t1/a.tar.gz"}'
    stored = await object_store.put_bytes(name, data, {"dcu-kind": "pointer"})
    assert stored.size == len(data)
    assert stored.metadata == {"dcu-kind": "pointer"}
    assert await object_store.get_bytes(name) == data
    with pytest.raises(StorageError, match="larger than 10 bytes"):
        await object_store.get_bytes(name, limit=10)
    assert await object_store.get_bytes(f"dcu/reuse/{uuid.uuid4()}.json") is None
    empty = f"dcu/reuse/{uuid.uuid4()}.json"
    await object_store.put_bytes(empty, b"", {})
    assert await object_store.get_bytes(empty) == b""


async def test_upload_memory_is_bounded(s3_server, tmp_path: Path) -> None:
    # Given a 200 MiB file, 5 MiB parts and 2 parts in flight
    store = S3ObjectStore(s3_settings(s3_server, part_size=PART, parallel_parts=2))
    source = tmp_path / "huge.tar.gz"
    block = os.urandom(MIB)
    with source.open("wb") as out:
        for _ in range(200):
            out.write(block)
    name = f"dcu/{uuid.uuid4()}/huge.tar.gz"
    try:
        await store.ensure_bucket()
        # When it is uploaded under tracemalloc
        tracemalloc.start()
        try:
            stored = await store.put_file(name, source, {})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Then at most 2 parts in flight + 2 queued + 1 being read (25 MiB, measured
        # 27 MiB peak) were held: 64 MiB leaves room for allocator and aiohttp slack,
        # where reading every part first, as miniopy's fput_object does, peaks at ~207 MiB.
        assert stored.size == 200 * MIB
        assert peak < 64 * MIB, f"peak {peak / MIB:.1f} MiB"
    finally:
        source.unlink()
        await store.remove(name)
        await store.close()

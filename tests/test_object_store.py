"""The object-store contract, run against the real S3 server (moto) and the local store."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from actors.object_store import LocalObjectStore, ObjectStore, S3ObjectStore
from dcu.errors import StorageError
from dcu.settings import MinioSettings


@pytest.fixture(params=["s3", "local"])
async def store(request, s3_server, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    if request.param == "s3":
        settings = MinioSettings(
            endpoint=s3_server.endpoint,
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
            bucket=f"dcu-{uuid.uuid4().hex[:8]}",
        )
        opened: ObjectStore = S3ObjectStore(settings)
    else:
        opened = LocalObjectStore(MinioSettings(local_path=str(tmp_path / "objects")))
    try:
        yield opened
    finally:
        await opened.close()


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


async def test_put_stat_list_fetch_remove(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "a.tar.gz"
    source.write_bytes(b"archive-bytes" * 1000)
    name = f"dcu/{uuid.uuid4()}/a.tar.gz"
    stored = await store.put_file(name, source, {"dcu-sha256": "abc"})
    assert stored.size == source.stat().st_size
    info = await store.stat(name)
    assert info is not None and info.metadata["dcu-sha256"] == "abc"
    assert [o.name for o in await store.list("dcu/")] == [name]
    copy = tmp_path / "copy"
    await store.fetch(name, copy)
    assert copy.read_bytes() == source.read_bytes()
    await store.remove(name)
    assert await store.stat(name) is None


async def test_unfinished_uploads_are_aborted(store: ObjectStore, tmp_path: Path) -> None:
    # Given an upload that died half-way, and a finished object beside it
    name = f"dcu/{uuid.uuid4()}/image.tar.gz"
    other = f"dcu/{uuid.uuid4()}/other.tar.gz"
    source = tmp_path / "o.tar.gz"
    source.write_bytes(b"done")
    await store.put_file(other, source, {})
    await _start_unfinished_upload(store, name, tmp_path)
    # When the next attempt cleans up first
    assert await store.abort_incomplete(name) == 1
    # Then nothing of the dead attempt is left, and nothing else was touched
    assert await store.abort_incomplete(name) == 0
    assert await store.stat(name) is None
    assert await store.stat(other) is not None


async def test_local_store_refuses_names_that_escape(tmp_path: Path) -> None:
    store = LocalObjectStore(MinioSettings(local_path=str(tmp_path / "objects")))
    for bad in ("../outside", "/etc/passwd", "a/../../b"):
        with pytest.raises(StorageError):
            await store.stat(bad)

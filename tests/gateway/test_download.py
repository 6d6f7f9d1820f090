"""``GET /download/{task_id}``, in process: the local store streams the archive (ranges
too), S3 answers with a presigned URL that works, and a task without an archive to give
gets a 404 or 409 that says why."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from actors.object_store import ObjectStore, open_store
from events.schema import Event
from kernel.settings import Settings
from tests.gateway.conftest import Gateway
from tests.servers.s3 import S3Server
from tests.timeline import Timeline

IMAGE = "127.0.0.1:5000/team/app:1.0"
OBJECT = "dcu/127.0.0.1_5000_team_app_1.0.tar.gz"  # what Timeline.happy_path uploads


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    settings.minio.local_path = str(tmp_path / "objects")
    return settings


async def _stored(settings: Settings, data: bytes) -> str:
    """Put ``data`` in the gateway's store as the happy path's object; its sha256."""
    store: ObjectStore = open_store(settings.minio)
    digest = hashlib.sha256(data).hexdigest()
    source = Path(settings.minio.local_path).parent / f"upload-{uuid.uuid4().hex}"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(data)
    try:
        await store.ensure_bucket()
        await store.put_file(OBJECT, source, {"dcu-sha256": digest})
    finally:
        await store.close()
        source.unlink()
    return digest


async def _completed(gateway: Gateway) -> str:
    timeline = Timeline()
    await gateway.record(*timeline.happy_path(IMAGE))
    return timeline.task_id


async def test_an_unknown_task_is_a_404(gateway: Gateway) -> None:
    task_id = str(uuid.uuid4())
    status, answer = await gateway.get(f"/download/{task_id}")
    assert (status, answer["message"]) == (404, f"task {task_id} not found")


@pytest.mark.parametrize(
    "upto", [1, 2, 4, 6], ids=["idle", "downloading", "compressing", "uploading"]
)
async def test_a_task_that_has_not_completed_is_a_409(gateway: Gateway, upto: int) -> None:
    timeline = Timeline()
    events: list[Event] = timeline.happy_path(IMAGE)[:upto]
    await gateway.record(*events)
    status, answer = await gateway.get(f"/download/{timeline.task_id}")
    state = (await gateway.get(f"/status/{timeline.task_id}"))[1]["data"]["state"]
    assert status == 409, answer
    assert answer["message"] == (
        f"task {timeline.task_id} is {state}; its archive can be downloaded once it is completed"
    )


async def test_a_failed_task_is_a_409(gateway: Gateway) -> None:
    timeline = Timeline()
    await gateway.record(timeline.requested(IMAGE), timeline.failed())
    status, answer = await gateway.get(f"/download/{timeline.task_id}")
    assert status == 409
    assert " is failed; " in answer["message"]


async def test_the_local_store_streams_the_archive_and_its_ranges(
    gateway: Gateway, settings: Settings
) -> None:
    data = os.urandom(300_000)
    digest = await _stored(settings, data)
    task_id = await _completed(gateway)
    path = f"/api/dcu/download/{task_id}"

    async with gateway.client.get(path) as response:
        body = await response.read()
        assert response.status == 200
        assert response.headers["X-Checksum-Sha256"] == digest
        assert (
            'filename="127.0.0.1_5000_team_app_1.0.tar.gz"'
            in response.headers["Content-Disposition"]
        )
    assert body == data

    async with gateway.client.get(path, headers={"Range": "bytes=1000-1999"}) as response:
        assert response.status == 206
        assert await response.read() == data[1000:2000]


async def test_an_archive_the_cleanup_removed_is_a_404_saying_so(
    gateway: Gateway, settings: Settings
) -> None:
    task_id = await _completed(gateway)  # its object was never stored, or is gone

    status, answer = await gateway.get(f"/download/{task_id}")

    assert status == 404
    assert answer["message"] == (
        f"the archive of task {task_id} ({OBJECT}) no longer exists: the cleanup removes "
        "objects after 7 days"
    )


class TestS3:
    @pytest.fixture
    def settings(self, settings: Settings, s3_server: S3Server) -> Settings:
        settings.minio.endpoint = s3_server.endpoint
        settings.minio.access_key = SecretStr(s3_server.access_key)
        settings.minio.secret_key = SecretStr(s3_server.secret_key)
        settings.minio.bucket = f"dl-{uuid.uuid4().hex[:12]}"
        settings.minio.download_url_expiry = 600
        return settings

    async def test_s3_answers_a_redirect_to_a_presigned_url_that_works(
        self, gateway: Gateway, settings: Settings
    ) -> None:
        data = os.urandom(200_000)
        digest = await _stored(settings, data)
        task_id = await _completed(gateway)

        async with gateway.client.get(
            f"/api/dcu/download/{task_id}", allow_redirects=False
        ) as response:
            answer = await response.json()
            assert response.status == 307
            location = response.headers["Location"]
            assert response.headers["X-Checksum-Sha256"] == digest
        assert answer["code"] == 0
        assert answer["data"] == {
            "url": location,
            "file_name": "127.0.0.1_5000_team_app_1.0.tar.gz",
            "bytes": len(data),
            "sha256": digest,
            "expires_in": 600,
        }
        assert "X-Amz-Expires=600" in location
        # and the URL needs no credentials
        with urllib.request.urlopen(location, timeout=30) as fetched:
            assert fetched.read() == data

    async def test_dcu_fetch_follows_the_link(
        self, gateway: Gateway, settings: Settings, tmp_path: Path
    ) -> None:
        data = os.urandom(300_000)
        digest = await _stored(settings, data)
        task_id = await _completed(gateway)

        done = await _dcu_fetch(gateway, task_id, tmp_path / "app.tar.gz")

        assert done.returncode == 0, done.stderr
        assert (tmp_path / "app.tar.gz").read_bytes() == data
        assert done.stdout.strip().endswith(f"sha256:{digest}")


DCU = str(Path(sys.executable).with_name("dcu"))


async def _dcu_fetch(
    gateway: Gateway, task_id: str, dest: Path
) -> subprocess.CompletedProcess[str]:
    """``dcu fetch`` as a user runs it, against the in-process gateway."""
    env = {**os.environ, "DCU_SERVER": f"http://127.0.0.1:{gateway.port}"}
    return await asyncio.to_thread(
        subprocess.run,
        [DCU, "fetch", task_id, "-o", str(dest)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


async def test_dcu_fetch_writes_the_checked_archive(
    gateway: Gateway, settings: Settings, tmp_path: Path
) -> None:
    data = os.urandom(500_000)
    digest = await _stored(settings, data)
    task_id = await _completed(gateway)
    dest = tmp_path / "out" / "app.tar.gz"
    dest.parent.mkdir()

    done = await _dcu_fetch(gateway, task_id, dest)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{dest} sha256:{digest}"
    assert dest.read_bytes() == data


async def test_dcu_fetch_refuses_a_mismatch_and_names_a_refusal(
    gateway: Gateway, settings: Settings, tmp_path: Path
) -> None:
    # Given an object whose bytes are not the ones its task recorded
    store = open_store(settings.minio)
    source = tmp_path / "other"
    source.write_bytes(b"not the archive")
    await store.ensure_bucket()
    await store.put_file(OBJECT, source, {"dcu-sha256": "0" * 64})
    await store.close()
    task_id = await _completed(gateway)
    dest = tmp_path / "app.tar.gz"

    mismatch = await _dcu_fetch(gateway, task_id, dest)
    unknown = await _dcu_fetch(gateway, str(uuid.uuid4()), dest)

    assert mismatch.returncode == 1
    assert "dcu fetch: sha256 mismatch: got " in mismatch.stderr
    assert f"the task recorded {'0' * 64}" in mismatch.stderr
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("dcu fetch: the gateway answered 404: task ")
    assert list(tmp_path.glob("app.tar.gz*")) == []  # nothing left behind

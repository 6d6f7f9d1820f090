"""End to end: ``dcu serve`` (with its cleanup worker and timer) as a real process, a real
task's archive and object, and ``POST /api/dcu/cleanup``.

The archive is made "old" with ``os.utime`` and the object by a zero
``minio_retention_days``, so nothing waits for a retention to pass. The schedules are
set to New Year's midnight so the timer cannot clean anything behind the test's back.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from actors import reuse
from actors.object_store import S3ObjectStore
from events import naming
from events.formats import ArchiveFormat
from events.reference import parse_reference
from kernel.settings import MinioSettings
from tests.e2e.conftest import service_config
from tests.e2e.helpers import EventRecorder
from tests.polling import wait_until
from tests.servers.dcu_process import DcuProcess
from tests.servers.s3 import S3Server

pytestmark = pytest.mark.e2e

NEVER_DURING_A_TEST = "0 0 1 1 *"


@pytest.fixture(scope="module")
def service(nats_server, docker_engine, s3_server, tmp_path_factory) -> Iterator[DcuProcess]:
    tag = uuid.uuid4().hex[:8]
    config = service_config(
        nats=nats_server,
        engine=docker_engine,
        s3=s3_server,
        tag=tag,
        storage={
            "gzip_retention_days": 1,
            "minio_retention_days": 0,
            "cleanup_gzip_cron": NEVER_DURING_A_TEST,
            "cleanup_minio_cron": NEVER_DURING_A_TEST,
        },
    )
    process = DcuProcess(tmp_path_factory.mktemp("dcu-cleanup"), config, ["serve"], name="serve")
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def task(service: DcuProcess, pushed_images) -> dict[str, Any]:
    """A completed task for the small fixture image: its archive and object exist."""
    status, body = service.post(
        "/start", {"username": "jenkins", "docker_image_name": pushed_images["small"].reference}
    )
    assert status == 200, body
    data = service.wait_terminal(body["data"]["task_id"])
    assert data["state"] == "completed", data
    return data


def stat_object(s3: S3Server, bucket: str, name: str) -> Any:
    async def main() -> Any:
        store = S3ObjectStore(
            MinioSettings(
                endpoint=s3.endpoint,
                access_key=SecretStr(s3.access_key),
                secret_key=SecretStr(s3.secret_key),
                bucket=bucket,
            )
        )
        try:
            return await store.stat(name)
        finally:
            await store.close()

    return asyncio.run(main())


def cleanup_events(
    recorder: EventRecorder, kind: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    mine = [e for e in recorder.events if e.get("kind") == kind]
    return (
        [e for e in mine if e["type"] == "requested"],
        [e for e in mine if e["type"] == "completed"],
    )


def test_serve_runs_the_cleanup_timer(service: DcuProcess) -> None:
    service.wait_for_log("cleanup timer", timeout=10)
    assert f"gzip at '{NEVER_DURING_A_TEST}' UTC" in service.log.read_text()


def test_gzip_cleanup_removes_an_expired_archive(service: DcuProcess, task) -> None:
    # Given the task's archive, aged past the one-day retention
    archive = service.workdir / task["gzip_file_name"]
    size = archive.stat().st_size
    two_days_ago = time.time() - 2 * 86400
    os.utime(archive, (two_days_ago, two_days_ago))
    prefix = service.config["nats"]["subject_prefix"]

    # When an operator asks for a gzip cleanup
    with EventRecorder(service.config["nats"]["url"], f"{prefix}.cleanup.>") as recorder:
        status, body = service.post("/cleanup", {"kind": "gzip", "requested_by": "ops"})
        time.sleep(0.3)  # let the events reach the recorder

    # Then the run completed and reports what it freed
    assert status == 200, body
    assert body["code"] == 0 and body["status"] == 200
    done = body["data"]
    assert done["kind"] == "gzip" and done["type"] == "completed"
    payload = done["payload"]
    assert payload["deleted"] == 1
    assert payload["bytes_freed"] == size
    assert payload["errors"] == []
    # And the archive and its task directory are gone
    assert not archive.exists()
    assert not archive.parent.exists()
    # And the bus carries the request (reason admin) and the completion naming it
    requested, completed = cleanup_events(recorder, "gzip")
    assert len(requested) == 1 and len(completed) == 1
    assert requested[0]["payload"] == {"reason": "admin", "requested_by": "ops"}
    assert completed[0] == done
    assert payload["request_id"] == requested[0]["event_id"]
    # And the task's record is untouched: still completed, still naming its archive
    status, after = service.get(f"/status/{task['task_id']}")
    assert status == 200
    assert after["data"] == task


def test_objects_cleanup_removes_an_expired_object(
    service: DcuProcess, task, s3_server: S3Server
) -> None:
    bucket = service.config["minio"]["bucket"]
    name = task["minio_object_name"]
    stored = stat_object(s3_server, bucket, name)
    assert stored is not None
    # and the reuse pointer its upload left
    key = reuse.key_for(
        task["manifest_digest"],
        parse_reference(task["docker_image_name"]),
        ArchiveFormat(task["format"]),
    )
    pointer_name = naming.reuse_pointer_name(MinioSettings().prefix, key)
    pointer = stat_object(s3_server, bucket, pointer_name)
    assert pointer is not None

    # With a zero retention, an object uploaded before now is expired
    status, body = service.post("/cleanup", {"kind": "objects"})

    assert status == 200, body
    payload = body["data"]["payload"]
    assert (payload["deleted"], payload["bytes_freed"], payload["kept"]) == (
        2,
        stored.size + pointer.size,
        0,
    )
    assert payload["errors"] == []
    assert stat_object(s3_server, bucket, name) is None
    assert stat_object(s3_server, bucket, pointer_name) is None
    status, after = service.get(f"/status/{task['task_id']}")
    assert after["data"] == task


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param({"kind": "minio"}, "expected one of: gzip, objects", id="unknown-kind"),
        pytest.param({}, "missing field: kind (one of: gzip, objects)", id="no-kind"),
        pytest.param({"kind": "gzip", "timeout": 601}, "between 0 and 600", id="timeout-max"),
        pytest.param({"kind": "gzip", "timeout": "1"}, "number of seconds", id="timeout-type"),
        pytest.param(["gzip"], "must be a JSON object", id="not-an-object"),
    ],
)
def test_bad_requests_are_refused(service: DcuProcess, body: Any, message: str) -> None:
    status, answer = service.post("/cleanup", body)
    assert status == 400
    assert answer["code"] == 40000 and message in answer["message"], answer


def test_a_run_not_finished_in_time_answers_202_with_the_request_id(
    service: DcuProcess,
) -> None:
    prefix = service.config["nats"]["subject_prefix"]
    with EventRecorder(service.config["nats"]["url"], f"{prefix}.cleanup.>") as recorder:
        status, body = service.post("/cleanup", {"kind": "gzip", "timeout": 0})
        assert status == 202, body
        assert body["code"] == 0 and body["status"] == 202
        request_id = body["data"]["request_id"]
        assert body["data"]["subject"] == f"{prefix}.cleanup.gzip.completed"
        # the run still happens: its completion arrives on that subject
        wait_until(
            lambda: any(
                e["payload"]["request_id"] == request_id
                for e in cleanup_events(recorder, "gzip")[1]
            ),
            timeout=15,
            what=f"the completion of {request_id}",
            interval=0.1,
            describe=lambda: f"events: {recorder.events}",
        )

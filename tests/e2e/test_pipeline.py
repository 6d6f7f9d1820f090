"""End to end: ``dcu serve`` against the real engine, registry, NATS and S3.

Every archive is proven by loading it into the real engine and comparing image IDs.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import service_config
from tests.e2e.helpers import (
    HAPPY_PATH,
    STAGE_EVENTS,
    STATUS_FIELDS,
    TIME_RE,
    EventRecorder,
    fetch_object,
    load_and_get_id,
    parse_time,
    service_transitions,
    sha256_of,
    tar_members,
)
from tests.servers.dcu_process import DcuProcess
from tests.servers.postgres import create_database, drop_database

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def dcu_service(request, nats_server, docker_engine, s3_server, tmp_path_factory, postgres_dsn):
    """``dcu serve`` on SQLite (the default) and on a fresh PostgreSQL database."""
    database = create_database() if request.param == "postgres" else None
    config = service_config(
        nats=nats_server,
        engine=docker_engine,
        s3=s3_server,
        tag=uuid.uuid4().hex[:8],
        database={"url": database} if database else {},
    )
    service = DcuProcess(
        tmp_path_factory.mktemp(f"serve-{request.param}"), config, ["serve"], name="serve"
    ).start()
    try:
        yield service
    finally:
        service.stop()
        if database:
            drop_database(database)


HAPPY_TRANSITIONS = [(before, after, True) for before, after in HAPPY_PATH]


def _reference(pushed_images, which: str) -> tuple[str, str]:
    if which == "small-by-digest":
        image = pushed_images["small"]
        return image.digest_reference, image.image_id
    image = pushed_images[which]
    return image.reference, image.image_id


@pytest.mark.parametrize("which", ["small", "nested", "small-by-digest", "large"])
def test_image_round_trip(
    which, dcu_service: DcuProcess, pushed_images, docker_engine, s3_server, tmp_path: Path
) -> None:
    # Given an image in the registry (and not in the engine)
    reference, source_id = _reference(pushed_images, which)
    prefix = dcu_service.config["nats"]["subject_prefix"]
    with EventRecorder(dcu_service.config["nats"]["url"], f"{prefix}.>") as recorder:
        # When a caller starts a task for it
        status, body = dcu_service.post(
            "/start", {"username": "jenkins", "docker_image_name": reference}
        )
        assert status == 200, body
        assert body["code"] == 0 and body["status"] == 200 and body["message"] == "任务已启动"
        task_id = body["data"]["task_id"]
        assert body["data"]["state"] == "idle"
        data = dcu_service.wait_terminal(task_id)
        time.sleep(0.5)  # let the last events reach the recorder

    # Then the task completed with every field the contract names
    assert data["state"] == "completed", data
    assert STATUS_FIELDS <= set(data)
    assert data["state_display"] == "已完成"
    assert data["progress"] == 100
    assert data["username"] == "jenkins"
    assert data["docker_image_name"] == reference
    assert data["error_message"] is None
    assert TIME_RE.match(data["start_time"]) and TIME_RE.match(data["end_time"])
    elapsed = (parse_time(data["end_time"]) - parse_time(data["start_time"])).total_seconds()
    assert abs(data["duration"] / 1000 - elapsed) <= 1.5
    assert data["duration"] > 0
    gzip_file = data["gzip_file_name"]
    assert gzip_file.startswith(f"./data/gzip/{task_id}/") and gzip_file.endswith(".tar.gz")
    assert data["minio_object_name"] == f"dcu/{task_id}/{Path(gzip_file).name}"
    assert data["image_id"] == source_id

    # The local archive exists, the work tar is gone
    local = dcu_service.workdir / gzip_file
    assert local.is_file()
    assert not (dcu_service.workdir / "data" / "work" / task_id).exists()

    # The object in S3 is the same archive, with the image ID and sha256 as metadata
    downloaded = tmp_path / "archive.tar.gz"
    bucket = dcu_service.config["minio"]["bucket"]
    metadata = fetch_object(s3_server, bucket, data["minio_object_name"], downloaded)
    digest = sha256_of(downloaded)
    assert digest == sha256_of(local) == data["archive_sha256"]
    assert metadata["x-amz-meta-dcu-sha256"] == digest
    assert metadata["x-amz-meta-dcu-image-id"] == source_id
    assert "manifest.json" in tar_members(downloaded)

    # docker load of the archive gives back the very same image
    forget = [source_id]
    assert load_and_get_id(docker_engine, downloaded, forget) == source_id

    # The events on the bus tell the same story, in order
    seen = [e["type"] for e in recorder.for_task(task_id) if e.get("type") != "progress"]
    assert seen == STAGE_EVENTS
    progress = [e for e in recorder.for_task(task_id) if e.get("type") == "progress"]
    assert {p["payload"]["stage"] for p in progress} <= {"download", "compress", "upload"}
    assert all(
        s.startswith(f"{prefix}.task.{task_id}.") for s in recorder.subjects if f".{task_id}." in s
    )

    # And the transition log holds every transition once, in order
    assert service_transitions(dcu_service, task_id) == HAPPY_TRANSITIONS


def test_missing_image_fails_with_the_engines_reason(dcu_service: DcuProcess, registry) -> None:
    reference = f"{registry.address}/does-not-exist:1.0"
    status, body = dcu_service.post("/start", {"username": "u", "docker_image_name": reference})
    assert status == 200, body
    task_id = body["data"]["task_id"]
    data = dcu_service.wait_terminal(task_id, timeout=120)
    assert data["state"] == "failed"
    assert data["progress"] == -1
    assert data["state_display"] == "失败"
    assert data["end_time"] is not None
    message = data["error_message"].lower()
    assert "download failed" in message
    assert "does-not-exist" in message
    assert "not found" in message or "manifest unknown" in message
    log = service_transitions(dcu_service, task_id)
    assert log == [
        (None, "idle", True),
        ("idle", "downloading", True),
        ("downloading", "failed", True),
    ]
    assert not (dcu_service.workdir / "data" / "work" / task_id).exists()


def test_query_lists_and_filters_tasks(dcu_service: DcuProcess, pushed_images) -> None:
    reference = pushed_images["small"].reference
    ids = []
    for user in ("alice", "bob", "alice"):
        status, body = dcu_service.post(
            "/start", {"username": user, "docker_image_name": reference}
        )
        assert status == 200
        ids.append(body["data"]["task_id"])
    for task_id in ids:
        assert dcu_service.wait_terminal(task_id)["state"] == "completed"
    status, body = dcu_service.get("/query?username=alice&docker_image_name=dcu-small&page_size=1")
    assert status == 200
    assert body["data"]["total"] >= 2
    assert len(body["data"]["items"]) == 1
    assert body["data"]["items"][0]["username"] == "alice"
    assert STATUS_FIELDS <= set(body["data"]["items"][0])
    status, body = dcu_service.get("/query?state=completed&username=bob")
    assert status == 200 and body["data"]["total"] >= 1
    assert {item["state"] for item in body["data"]["items"]} == {"completed"}

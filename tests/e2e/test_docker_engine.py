"""``download.engine: docker``, the engine path kept beside the registry engine: the
engine pulls, ``docker save`` streams to the work volume, ISA-L gzips the whole tar."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import service_config
from tests.e2e.helpers import fetch_object, load_and_get_id
from tests.servers.dcu_process import DcuProcess

pytestmark = pytest.mark.e2e

LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def engine_service(
    nats_server, docker_engine, s3_server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DcuProcess]:
    config = service_config(
        nats=nats_server,
        engine=docker_engine,
        s3=s3_server,
        tag=uuid.uuid4().hex[:8],
        download={"engine": "docker"},
        workers={"max_image_bytes": LIMIT},
    )
    service = DcuProcess(tmp_path_factory.mktemp("engine"), config, ["serve"], name="serve")
    service.start()
    try:
        yield service
    finally:
        service.stop()


def _run(service: DcuProcess, reference: str, **extra: str) -> dict:
    status, body = service.post(
        "/start", {"username": "u", "docker_image_name": reference, **extra}
    )
    assert status == 200, body
    return service.wait_terminal(body["data"]["task_id"], timeout=120)


@pytest.mark.parametrize("by_digest", [False, True], ids=["tag", "digest"])
def test_the_engine_path_round_trips(
    by_digest: bool, engine_service, pushed_images, docker_engine, s3_server, tmp_path: Path
) -> None:
    image = pushed_images["small"]
    data = _run(engine_service, image.digest_reference if by_digest else image.reference)
    assert data["state"] == "completed", data
    assert data["engine"] == "docker"
    _, body = engine_service.get(f"/events/{data['task_id']}?include_progress=false")
    events = {e["type"]: e["payload"] for e in body["data"]["events"]}
    assert events["downloaded"]["layout"] == "tar"
    assert events["compressed"]["method"] == "gzip"
    archive = tmp_path / "archive.tar.gz"
    bucket = engine_service.config["minio"]["bucket"]
    fetch_object(s3_server, bucket, data["minio_object_name"], archive)
    assert load_and_get_id(docker_engine, archive, [image.image_id]) == image.image_id


def test_the_engine_path_writes_a_plain_docker_archive(
    engine_service, pushed_images, docker_engine, s3_server, tmp_path: Path
) -> None:
    image = pushed_images["small"]
    data = _run(engine_service, image.reference, format="docker-archive")
    assert data["state"] == "completed", data
    assert data["format"] == "docker-archive"
    assert data["minio_object_name"].endswith(".tar")
    _, body = engine_service.get(f"/events/{data['task_id']}?include_progress=false")
    compressed = {e["type"]: e["payload"] for e in body["data"]["events"]}["compressed"]
    # the engine's tar as it is: as many bytes out as in
    assert compressed["method"] == "tar"
    assert compressed["bytes_out"] == compressed["bytes_in"] == data["archive_bytes"]
    archive = tmp_path / "archive.tar"
    bucket = engine_service.config["minio"]["bucket"]
    fetch_object(s3_server, bucket, data["minio_object_name"], archive)
    assert load_and_get_id(docker_engine, archive, [image.image_id]) == image.image_id


def test_the_engine_path_enforces_the_size_limit(engine_service, pushed_images) -> None:
    image = pushed_images["nested"]
    assert image.size_bytes > LIMIT
    data = _run(engine_service, image.reference)
    assert data["state"] == "failed"
    assert data["error_message"] == (
        f"download failed: image {image.reference} is {image.size_bytes} bytes, "
        f"over the limit of {LIMIT} bytes"
    )

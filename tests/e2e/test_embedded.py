"""The README's quick start: ``dcu serve`` with embedded NATS and local object storage."""

from __future__ import annotations

import subprocess

import pytest

from tests.e2e.helpers import load_and_get_id, sha256_of
from tests.servers.dcu_process import DcuProcess

pytestmark = pytest.mark.e2e


def test_embedded_defaults_complete_a_task(docker_engine, pushed_images, tmp_path) -> None:
    # Given no NATS URL and no S3 endpoint: the embedded server and ./data/objects
    config = {
        "server": {"host": "127.0.0.1"},
        "nats": {"url": ""},
        "minio": {"endpoint": ""},
        "docker": {"host": docker_engine.host},
    }
    service = DcuProcess(tmp_path, config, ["serve"], name="embedded").start()
    try:
        image = pushed_images["nested"]
        status, body = service.post(
            "/start", {"username": "u", "docker_image_name": image.reference}
        )
        assert status == 200
        data = service.wait_terminal(body["data"]["task_id"])
        assert data["state"] == "completed", data
        stored = tmp_path / "data" / "objects" / "dcu-artifacts" / data["minio_object_name"]
        assert stored.is_file()
        assert sha256_of(stored) == data["archive_sha256"]
        assert "embedded NATS" in service.log.read_text()
        assert "not in S3" in service.log.read_text()
        assert load_and_get_id(docker_engine, stored, [image.image_id]) == image.image_id
    finally:
        assert service.terminate() == 0
    # The embedded nats-server went away with the service
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "data" / "nats") not in processes

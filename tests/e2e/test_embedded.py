"""The README's quick start: ``dcu serve`` with embedded NATS and local object storage."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e.helpers import load_and_get_id, sha256_of
from tests.servers.base import ManagedProcess, free_port
from tests.servers.dcu_process import DcuProcess

REPO = Path(__file__).resolve().parents[2]

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


def test_scripts_serve_completes_a_task_without_any_docker_daemon(
    docker_engine, pushed_images, tmp_path
) -> None:
    # Given the README's run command, on a machine whose Docker socket leads nowhere: only
    # a registry to pull from, and every path of the embedded defaults under tmp_path
    data = tmp_path / "data"
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "database": {"path": str(data / "dcu.db")},
        "storage": {"gzip_path": str(data / "gzip"), "work_path": str(data / "work")},
        "minio": {"endpoint": "", "local_path": str(data / "objects")},
        "nats": {"url": "", "data_dir": str(data / "nats")},
        "docker": {"host": f"unix://{tmp_path}/no-docker-here.sock"},
    }
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    serve = ManagedProcess(
        [str(REPO / "scripts" / "serve")],
        log=tmp_path / "serve.log",
        env={"DCU_CONFIG": str(config_file)},
    )
    service = DcuProcess(tmp_path, config, [], name="serve", port=port, process=serve)
    try:
        service.wait_healthy(timeout=300)  # the script may install DCU first
        image = pushed_images["nested"]
        # When a task is started
        status, body = service.post(
            "/start", {"username": "u", "docker_image_name": image.reference}
        )
        assert status == 200, body
        result = service.wait_terminal(body["data"]["task_id"])
        # Then it completes from the registry alone, and its archive loads as the image
        assert result["state"] == "completed", result
        assert result["engine"] == "registry"
        stored = data / "objects" / "dcu-artifacts" / result["minio_object_name"]
        assert load_and_get_id(docker_engine, stored, [image.image_id]) == image.image_id
    finally:
        assert service.terminate() == 0

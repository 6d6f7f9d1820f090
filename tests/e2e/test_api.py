"""The HTTP contract of a real ``dcu serve`` where it needs the running pipeline: a task's
status right after its start. The envelope, validation and pagination tables run in
process, in ``tests/gateway/``.
"""

from __future__ import annotations

import pytest

from tests.servers.dcu_process import DcuProcess
from tests.servers.registry import Registry

pytestmark = pytest.mark.e2e


def test_status_right_after_start_is_never_404(dcu_service: DcuProcess, registry) -> None:
    reference = f"{registry.address}/nothing-here:1"
    for _ in range(10):
        status, body = dcu_service.post("/start", {"username": "u", "docker_image_name": reference})
        assert status == 200
        status, body = dcu_service.get(f"/status/{body['data']['task_id']}")
        assert status == 200, body
        assert body["data"]["state"] in {"idle", "downloading", "failed"}


def test_status_shows_the_requested_platform_normalised(
    dcu_service: DcuProcess, registry: Registry
) -> None:
    # Given a start request naming a platform by an alias, in capitals
    reference = f"{registry.address}/nothing-here:1"
    status, body = dcu_service.post(
        "/start", {"username": "u", "docker_image_name": reference, "platform": "LINUX/aarch64"}
    )
    assert status == 200, body

    # When its status is read (the task may already have failed: nothing-here is absent)
    status, body = dcu_service.get(f"/status/{body['data']['task_id']}")

    # Then it shows the platform as the download stage will use it
    assert status == 200, body
    assert body["data"]["platform"] == "linux/arm64"

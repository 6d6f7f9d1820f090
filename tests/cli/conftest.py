"""A real ``dcu serve`` with auth on, and images in the real registry, for the
``dcu submit`` tests: the command runs as a pipeline runs it, as its own process."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import service_config
from tests.servers.dcu_process import DcuProcess
from tests.servers.nats import NatsServer
from tests.servers.oci import layer_tar, push_image, write_layer_blob
from tests.servers.registry import Registry
from tests.servers.s3 import S3Server

DCU = str(Path(sys.executable).with_name("dcu"))
TOKEN_NAME = "ci-pipeline"
TOKEN = "submit-test-token-" + uuid.uuid4().hex
SLOW_LAYER_BYTES = 96_000_000
"""An uncompressed layer this large keeps the compress stage busy for seconds."""


@dataclass(frozen=True)
class SubmitImages:
    good: str
    missing: str
    slow: str


@pytest.fixture(scope="module")
def submit_service(
    nats_server: NatsServer, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DcuProcess]:
    tag = uuid.uuid4().hex[:8]
    workdir = tmp_path_factory.mktemp("dcu-submit")
    config = service_config(
        nats=nats_server,
        engine=None,
        s3=s3_server,
        tag=tag,
        auth={"enabled": True, "tokens": {TOKEN_NAME: TOKEN}},
        workers={"max_retries": 1, "max_backoff_ms": 500},
    )
    service = DcuProcess(workdir, config, ["serve"], name="serve").start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def submit_images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> SubmitImages:
    """A small image, a reference the registry lacks, and a slow one (one large
    uncompressed layer, which the service has to gzip)."""
    repo = f"cli/{uuid.uuid4().hex[:8]}"
    good = push_image(
        registry.url,
        f"{repo}/good",
        "1.0",
        [layer_tar({"app/hello.txt": b"hello from dcu submit\n", "app/data.bin": 200_000})],
    )
    scratch = tmp_path_factory.mktemp("slow-layer")
    slow_layer = write_layer_blob(
        scratch / "layer.tar", {"slow/data.bin": SLOW_LAYER_BYTES}, "none"
    )
    slow = push_image(registry.url, f"{repo}/slow", "1.0", [slow_layer], media="oci")
    (scratch / "layer.tar").unlink()
    return SubmitImages(
        good=good.reference,
        missing=f"{registry.address}/{repo}/missing:1.0",
        slow=slow.reference,
    )


def gateway_url(service: DcuProcess) -> str:
    return f"http://127.0.0.1:{service.port}"

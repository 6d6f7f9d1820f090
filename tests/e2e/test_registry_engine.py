"""The registry engine through a real ``dcu serve``: platforms, layer formats, the blob
cache, digest reuse, refusals. Images are built in Python and pushed over the registry
API (``tests.servers.oci``); every completed archive is loaded into the real engine and
its image ID and tag compared with the source.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import fetch_object, load_and_get_id
from tests.servers.dcu_process import DcuProcess
from tests.servers.docker_engine import DockerEngine
from tests.servers.oci import PushedOciImage, layer_tar, push_image, push_index, put_raw_manifest
from tests.servers.registry import Registry
from tests.servers.s3 import S3Server

pytestmark = pytest.mark.e2e


def _layer(name: str, size: int) -> bytes:
    return layer_tar({f"{name}/data.bin": size, f"{name}/README": f"layer {name}\n".encode()})


def _run(service: DcuProcess, reference: str, **extra: Any) -> dict[str, Any]:
    status, body = service.post(
        "/start", {"username": "jenkins", "docker_image_name": reference, **extra}
    )
    assert status == 200, body
    return service.wait_terminal(body["data"]["task_id"], timeout=120)


def _events(service: DcuProcess, task_id: str) -> dict[str, dict[str, Any]]:
    status, body = service.get(f"/events/{task_id}?include_progress=false")
    assert status == 200, body
    return {event["type"]: event["payload"] for event in body["data"]["events"]}


def _loads_as(
    service: DcuProcess,
    data: dict[str, Any],
    image: PushedOciImage,
    engine: DockerEngine,
    s3: S3Server,
    tmp_path: Path,
    tag: str | None = None,
) -> dict[str, str]:
    """Download the task's object, ``docker load`` it, check the ID (and the tag)."""
    archive = tmp_path / f"{data['task_id']}.tar.gz"
    metadata = fetch_object(
        s3, service.config["minio"]["bucket"], data["minio_object_name"], archive
    )
    forget = [image.image_id] + ([tag] if tag else [])
    assert load_and_get_id(engine, archive, forget) == image.image_id
    if tag:
        tagged = engine.docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
        assert tagged == image.image_id
    engine.docker("rmi", "-f", image.image_id, check=False)
    return metadata


@pytest.fixture
def repo() -> str:
    return f"engine/{uuid.uuid4().hex[:8]}"


def test_each_platform_of_an_index_is_packaged_and_an_unknown_one_is_refused(
    dcu_service: DcuProcess, registry: Registry, docker_engine, s3_server, tmp_path, repo
) -> None:
    # Given an OCI index with an amd64 and an arm64 image, pushed straight to the registry
    amd64 = push_image(registry.url, repo, None, [_layer("amd", 300_000)], media="oci")
    arm64 = push_image(
        registry.url, repo, None, [_layer("arm", 200_000)], media="oci",
        platform=("linux", "arm64", "v8"),
    )  # fmt: skip
    push_index(
        registry.url,
        repo,
        "multi",
        [(amd64, ("linux", "amd64")), (arm64, ("linux", "arm64", "v8"))],
    )
    reference = f"{registry.address}/{repo}:multi"

    # When each platform is asked for
    for image, platform in ((amd64, "linux/amd64"), (arm64, "linux/arm64")):
        data = _run(dcu_service, reference, platform=platform)
        # Then each archive holds that platform's image, under the requested tag
        assert data["state"] == "completed", data
        assert data["platform"] == platform
        assert data["manifest_digest"] == image.manifest_digest
        assert data["image_id"] == image.image_id
        metadata = _loads_as(
            dcu_service, data, image, docker_engine, s3_server, tmp_path, reference
        )
        assert metadata["x-amz-meta-dcu-platform"] == platform
        assert metadata["x-amz-meta-dcu-manifest-digest"] == image.manifest_digest

    # And a platform the index lacks fails, naming the ones it has
    data = _run(dcu_service, reference, platform="linux/s390x")
    assert data["state"] == "failed"
    assert "no linux/s390x variant" in data["error_message"]
    assert "available platforms: linux/amd64, linux/arm64" in data["error_message"]


def test_zstd_and_uncompressed_layers_are_converted(
    dcu_service: DcuProcess, registry: Registry, docker_engine, s3_server, tmp_path, repo
) -> None:
    # Given an OCI image whose layers are gzip, zstd and plain tar
    image = push_image(
        registry.url, repo, "formats",
        [_layer("gz", 400_000), _layer("zst", 400_000), _layer("raw", 400_000)],
        compression=["gzip", "zstd", "none"], media="oci",
    )  # fmt: skip
    # When it is packaged
    data = _run(dcu_service, image.reference)
    # Then it loads to the same image, the gzip layer spliced verbatim, the others converted
    assert data["state"] == "completed", data
    _loads_as(dcu_service, data, image, docker_engine, s3_server, tmp_path, image.reference)
    compressed = _events(dcu_service, data["task_id"])["compressed"]
    assert compressed["method"] == "splice"
    assert compressed["spliced_bytes"] == image.layer_sizes[0]


def test_shared_base_layers_come_from_the_cache_and_a_packaged_digest_is_reused(
    dcu_service: DcuProcess, registry: Registry, docker_engine, s3_server, tmp_path, repo
) -> None:
    # Given a base image packaged once
    base_layers = [_layer("base0", 500_000), _layer("base1", 500_000)]
    base = push_image(registry.url, repo, "base", base_layers)
    first = _run(dcu_service, base.reference)
    assert first["state"] == "completed", first
    assert first["download_bytes_fetched"] == base.blob_bytes + len(base.config)
    assert first["reused"] is False

    # When an image sharing its two layers plus one of its own is packaged
    app = push_image(registry.url, repo, "app", [*base_layers, _layer("app", 300_000)])
    assert app.layer_digests[:2] == base.layer_digests
    second = _run(dcu_service, app.reference)
    # Then only the new layer (and the new config) was fetched
    assert second["state"] == "completed", second
    assert second["download_bytes_fetched"] == app.layer_sizes[2] + len(app.config)
    assert second["download_bytes_cached"] == sum(base.layer_sizes)
    _loads_as(dcu_service, second, app, docker_engine, s3_server, tmp_path, app.reference)

    # And packaging the base again reuses the first object: nothing fetched or written
    third = _run(dcu_service, base.reference)
    assert third["state"] == "completed", third
    assert third["reused"] is True
    assert third["download_bytes_fetched"] == 0
    events = _events(dcu_service, third["task_id"])
    assert events["downloaded"]["reused_object"] == first["minio_object_name"]
    assert events["compressed"]["method"] == "reuse"
    assert events["compressed"]["bytes_in"] == 0
    assert events["uploaded"]["reused_from"] == first["minio_object_name"]
    assert third["minio_object_name"] != first["minio_object_name"]
    assert third["archive_sha256"] == first["archive_sha256"]
    seconds = sum(events[kind]["seconds"] for kind in ("downloaded", "compressed", "uploaded"))
    print(f"reused task: {seconds:.3f} s of stage work")
    _loads_as(dcu_service, third, base, docker_engine, s3_server, tmp_path, base.reference)


def test_another_tag_of_a_packaged_digest_is_not_reused(
    dcu_service: DcuProcess, registry: Registry, repo
) -> None:
    # The tag is written into the archive: the same manifest under another tag is another
    # archive, so it is packaged (from the blob cache) rather than copied.
    image = push_image(registry.url, repo, "one", [_layer("t", 100_000)])
    assert _run(dcu_service, image.reference)["state"] == "completed"
    push_image(registry.url, repo, "two", [_layer("t", 100_000)])
    data = _run(dcu_service, f"{registry.address}/{repo}:two")
    assert data["state"] == "completed", data
    assert data["reused"] is False
    assert data["download_bytes_cached"] == image.blob_bytes + len(image.config)


@pytest.mark.parametrize(
    ("layer_type", "fragment"),
    [
        # (distribution 2.8 refuses to store Docker's foreign type; the OCI one it keeps)
        pytest.param(
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "foreign/non-distributable",
            id="non-distributable",
        ),
        pytest.param("application/x-made-up", "unsupported type", id="unknown"),
    ],
)
def test_layers_that_cannot_be_packaged_are_refused(
    dcu_service: DcuProcess, registry: Registry, repo, layer_type: str, fragment: str
) -> None:
    # Given a manifest naming a layer DCU cannot package
    image = push_image(registry.url, repo, "ok", [_layer("f", 10_000)])
    document = json.loads(image.manifest)
    document["layers"][0]["mediaType"] = layer_type
    if "nondistributable" in layer_type:
        document["layers"][0]["urls"] = ["https://example.invalid/layer.tar.gz"]
    stored = put_raw_manifest(
        registry.url, repo, "odd", json.dumps(document).encode(), image.manifest_media_type
    )
    assert stored.status == 201, stored
    # When it is requested, the task fails at once, saying why
    data = _run(dcu_service, f"{registry.address}/{repo}:odd")
    assert data["state"] == "failed"
    assert fragment in data["error_message"]

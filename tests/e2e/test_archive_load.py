"""The spliced multi-member archive is proven by the real engine: ``docker load`` accepts it
and reports the image ID the config bytes hash to."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
import zstandard

from actors.archive import ArchiveImage, ArchiveLayer, inspect_layer, write_archive
from tests.servers.docker_engine import DockerEngine

pytestmark = pytest.mark.e2e

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
TAR = "application/vnd.docker.image.rootfs.diff.tar"


def layer_tar(directory: str, files: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(directory)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for i in range(files):
            content = f"{directory} file {i}\n".encode() * 4000 + os.urandom(2000)
            info = tarfile.TarInfo(f"{directory}/file{i}")
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def diff_id(tar: bytes) -> str:
    return f"sha256:{hashlib.sha256(tar).hexdigest()}"


def layer(directory: Path, name: str, data: bytes, media_type: str) -> ArchiveLayer:
    blob = directory / name
    blob.write_bytes(data)
    return ArchiveLayer(blob=blob, media_type=media_type, info=inspect_layer(blob, media_type))


def config_for(diff_ids: list[str]) -> bytes:
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {"Cmd": ["/bin/true"]},
        }
    ).encode()


def loaded_image_id(engine: DockerEngine, archive: Path) -> str:
    out = engine.docker("load", "-i", str(archive)).stdout
    for line in out.splitlines():
        if line.startswith("Loaded image ID: "):
            return line.removeprefix("Loaded image ID: ").strip()
        if line.startswith("Loaded image: "):
            name = line.removeprefix("Loaded image: ").strip()
            return engine.docker("image", "inspect", "--format", "{{.Id}}", name).stdout.strip()
    raise AssertionError(f"unexpected docker load output: {out!r}")


def test_docker_loads_spliced_zstd_and_plain_layers(
    docker_engine: DockerEngine, tmp_path: Path
) -> None:
    # Given an image with a spliceable gzip layer, a zstd layer and a plain tar layer
    tars = [layer_tar("gz", 3), layer_tar("zst", 2), layer_tar("plain", 2)]
    layers = [
        layer(tmp_path, "gz", gzip.compress(tars[0], mtime=0), GZIP),
        layer(tmp_path, "zst", zstandard.ZstdCompressor().compress(tars[1]), ZSTD),
        layer(tmp_path, "plain", tars[2], TAR),
    ]
    assert layers[0].info.spliceable
    config = config_for([diff_id(t) for t in tars])
    tag = f"dcu-archive-test/{uuid.uuid4().hex[:8]}:1"
    expected_id = f"sha256:{hashlib.sha256(config).hexdigest()}"
    archive = tmp_path / "image.tar.gz"

    # When
    result = write_archive(archive, [ArchiveImage(config, layers, [tag])])

    # Then gzip itself and docker load accept it, with the config's ID and the tag
    assert result.spliced_bytes == layers[0].blob.stat().st_size
    if gzip_binary := shutil.which("gzip"):
        subprocess.run([gzip_binary, "-t", str(archive)], check=True)
    try:
        assert loaded_image_id(docker_engine, archive) == expected_id
        inspected = docker_engine.docker("image", "inspect", tag).stdout
        (image,) = json.loads(inspected)
        assert image["Id"] == expected_id
        assert tag in image["RepoTags"]
        assert image["RootFS"]["Layers"] == [diff_id(t) for t in tars]
    finally:
        docker_engine.docker("image", "rm", "--force", tag, check=False)
        docker_engine.docker("image", "rm", "--force", expected_id, check=False)


def test_docker_loads_untagged_image_with_repeated_layer_and_padded_gzip(
    docker_engine: DockerEngine, tmp_path: Path
) -> None:
    # Given a config listing one layer twice and a gzip blob with trailing zero padding
    tars = [layer_tar("base", 2), layer_tar("padded", 2)]
    layers = [
        layer(tmp_path, "base", gzip.compress(tars[0], mtime=0), GZIP),
        layer(tmp_path, "padded", gzip.compress(tars[1], mtime=0) + bytes(4096), GZIP),
    ]
    assert not layers[1].info.spliceable
    diff_ids = [diff_id(tars[0]), diff_id(tars[1]), diff_id(tars[0])]
    config = config_for(diff_ids)
    expected_id = f"sha256:{hashlib.sha256(config).hexdigest()}"
    archive = tmp_path / "image.tar.gz"

    # When
    write_archive(archive, [ArchiveImage(config, layers, [])])

    # Then
    try:
        assert loaded_image_id(docker_engine, archive) == expected_id
        inspected = docker_engine.docker("image", "inspect", expected_id).stdout
        assert json.loads(inspected)[0]["RootFS"]["Layers"] == diff_ids
    finally:
        docker_engine.docker("image", "rm", "--force", expected_id, check=False)

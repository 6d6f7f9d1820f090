"""The archive formats and multi-image archives of ``actors.archive``, read back with
Python's tarfile (the loaders read them in ``tests/loaders``)."""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from actors.archive import (
    CONTAINERD_NAME,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    REF_NAME,
    ArchiveImage,
    ArchiveLayer,
    LayerFormatError,
    inspect_layer,
    write_archive,
)
from events.formats import ArchiveFormat
from tests.unit.test_archive import (
    DOCKER_GZIP,
    GZIP,
    TAR,
    ZSTD,
    config_for,
    diff_id,
    gzip_single,
    layer_tar,
    load_json,
    no_part_files,
    read_member,
    zstd_frame,
)


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def blob_layer(directory: Path, data: bytes, media_type: str) -> ArchiveLayer:
    """A layer blob stored under its digest, as the registry engine's task directory holds
    them."""
    digest = sha256(data)
    blob = directory / digest.partition(":")[2]
    blob.write_bytes(data)
    return ArchiveLayer(blob, media_type, inspect_layer(blob, media_type), digest, len(data))


def manifest_for(config: bytes, layers: list[ArchiveLayer]) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
                for layer in layers
            ],
        }
    ).encode()


def image_of(layers: list[ArchiveLayer], name: str) -> ArchiveImage:
    config = config_for(*(layer.info.diff_id for layer in layers))
    return ArchiveImage(
        config=config,
        layers=layers,
        repo_tags=[f"example.org/{name}:1"],
        ref_name=f"example.org/{name}:1",
        manifest=manifest_for(config, layers),
        manifest_media_type=OCI_MANIFEST,
    )


@pytest.fixture
def blobs(tmp_path: Path) -> Path:
    directory = tmp_path / "blobs"
    directory.mkdir()
    return directory


@pytest.fixture
def three(blobs: Path) -> tuple[list[ArchiveImage], ArchiveLayer]:
    """Three images on one base layer, each with a layer of its own (gzip, zstd, tar)."""
    base = blob_layer(blobs, gzip_single(layer_tar("base", files=6)), GZIP)
    own = [
        blob_layer(blobs, gzip_single(layer_tar("app-a")), GZIP),
        blob_layer(blobs, zstd_frame(layer_tar("app-b")), ZSTD),
        blob_layer(blobs, layer_tar("app-c"), TAR),
    ]
    images = [image_of([base, layer], name) for layer, name in zip(own, "abc", strict=True)]
    return images, base


def test_docker_archive_is_the_gzip_archive_uncompressed(
    tmp_path: Path, three: tuple[list[ArchiveImage], ArchiveLayer]
) -> None:
    images, _ = three
    plain = write_archive(tmp_path / "b.tar", images, fmt=ArchiveFormat.DOCKER)
    packed = write_archive(tmp_path / "b.tar.gz", images, fmt=ArchiveFormat.DOCKER_GZIP)

    assert (
        gzip.decompress((tmp_path / "b.tar.gz").read_bytes()) == (tmp_path / "b.tar").read_bytes()
    )
    assert plain.bytes_out == plain.bytes_in == packed.bytes_in
    assert plain.sha256 == hashlib.sha256((tmp_path / "b.tar").read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt", [ArchiveFormat.DOCKER, ArchiveFormat.DOCKER_GZIP])
def test_a_docker_bundle_writes_a_shared_layer_once_and_lists_every_image(
    tmp_path: Path, three: tuple[list[ArchiveImage], ArchiveLayer], fmt: ArchiveFormat
) -> None:
    images, base = three
    dest = tmp_path / f"bundle{fmt.suffix}"

    result = write_archive(dest, images, fmt=fmt)

    with tarfile.open(dest) as tar:
        manifest = load_json(tar, "manifest.json")
        layer_entries = [n for n in tar.getnames() if n.endswith("/layer.tar")]
        repositories = load_json(tar, "repositories")
        base_tar = read_member(tar, manifest[0]["Layers"][0])
    assert [entry["RepoTags"] for entry in manifest] == [[f"example.org/{n}:1"] for n in "abc"]
    assert len(layer_entries) == 4  # the base once, and one layer per image
    assert {entry["Layers"][0] for entry in manifest} == {manifest[0]["Layers"][0]}
    assert sha256(base_tar) == base.info.diff_id
    assert set(repositories) == {f"example.org/{n}" for n in "abc"}
    expected = base.info.tar_size if fmt is ArchiveFormat.DOCKER else base.size
    assert result.shared_bytes == 2 * expected


def test_the_same_image_twice_is_one_manifest_entry_with_both_tags(
    tmp_path: Path, three: tuple[list[ArchiveImage], ArchiveLayer]
) -> None:
    image = three[0][0]
    again = ArchiveImage(image.config, image.layers, ["example.org/a:latest"])
    dest = tmp_path / "x.tar"

    write_archive(dest, [image, again], fmt=ArchiveFormat.DOCKER)

    with tarfile.open(dest) as tar:
        manifest = load_json(tar, "manifest.json")
    assert [entry["RepoTags"] for entry in manifest] == [
        ["example.org/a:1", "example.org/a:latest"]
    ]


def oci_blob(tar: tarfile.TarFile, digest: str) -> bytes:
    return read_member(tar, f"blobs/sha256/{digest.partition(':')[2]}")


def test_an_oci_archive_holds_the_registry_blobs_verbatim(
    tmp_path: Path, three: tuple[list[ArchiveImage], ArchiveLayer]
) -> None:
    images, base = three
    dest = tmp_path / "bundle.oci.tar"

    result = write_archive(dest, images, fmt=ArchiveFormat.OCI)

    with tarfile.open(dest) as tar:
        names = tar.getnames()
        assert load_json(tar, "oci-layout") == {"imageLayoutVersion": "1.0.0"}
        index: dict[str, Any] = load_json(tar, "index.json")
        assert index["mediaType"] == OCI_INDEX
        for image, entry in zip(images, index["manifests"], strict=True):
            assert entry["annotations"] == {
                REF_NAME: image.ref_name,
                CONTAINERD_NAME: image.ref_name,
            }
            assert entry["digest"] == sha256(image.manifest)
            assert oci_blob(tar, entry["digest"]) == image.manifest
            assert oci_blob(tar, sha256(image.config)) == image.config
            for layer in image.layers:
                assert oci_blob(tar, layer.digest) == layer.blob.read_bytes()
    blob_names = [n for n in names if n.startswith("blobs/sha256/") and n != "blobs/sha256"]
    assert len(blob_names) == len(set(blob_names)) == 3 + 3 + 4  # manifests, configs, layers
    assert result.shared_bytes == 2 * base.size
    assert result.spliced_bytes == sum(
        layer.size for layer in {lay.digest: lay for i in images for lay in i.layers}.values()
    )


def test_an_oci_archive_needs_a_manifest_that_matches_the_blobs(
    tmp_path: Path, blobs: Path
) -> None:
    layers = [blob_layer(blobs, gzip_single(layer_tar(n)), GZIP) for n in ("one", "two")]
    image = image_of(layers, "x")
    wrong = ArchiveImage(
        image.config, image.layers, manifest=manifest_for(image.config, layers[:1])
    )
    bare = ArchiveImage(image.config, image.layers)
    dest = tmp_path / "x.oci.tar"

    with pytest.raises(LayerFormatError, match="lists layers"):
        write_archive(dest, [wrong], fmt=ArchiveFormat.OCI)
    with pytest.raises(LayerFormatError, match="needs the image's manifest"):
        write_archive(dest, [bare], fmt=ArchiveFormat.OCI)
    assert not dest.exists()
    assert no_part_files(tmp_path)


def test_a_blob_that_changed_size_fails_the_oci_archive(tmp_path: Path, blobs: Path) -> None:
    layer = blob_layer(blobs, gzip_single(layer_tar("one")), GZIP)
    image = image_of([layer], "x")
    layer.blob.write_bytes(layer.blob.read_bytes() + b"more")

    with pytest.raises(LayerFormatError, match="changed since it was inspected"):
        write_archive(tmp_path / "x.oci.tar", [image], fmt=ArchiveFormat.OCI)
    assert no_part_files(tmp_path)


def test_an_archive_needs_an_image(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one image"):
        write_archive(tmp_path / "x.tar", [], fmt=ArchiveFormat.DOCKER)


def test_uncompressed_layers_are_checked_against_their_inspected_size(
    tmp_path: Path, blobs: Path
) -> None:
    tar = layer_tar("plain")
    layer = blob_layer(blobs, tar, TAR)
    image = ArchiveImage(config_for(diff_id(tar)), [layer], ["a:1"])
    layer.blob.write_bytes(tar[:-512])

    with pytest.raises(LayerFormatError, match="changed since it was inspected"):
        write_archive(tmp_path / "a.tar", [image], fmt=ArchiveFormat.DOCKER)
    assert no_part_files(tmp_path)


def test_a_docker_manifest_becomes_an_oci_one_with_the_same_blobs(
    tmp_path: Path, blobs: Path
) -> None:
    layer = blob_layer(blobs, gzip_single(layer_tar("one")), DOCKER_GZIP)
    image = image_of([layer], "x")
    docker = json.loads(image.manifest)
    docker["mediaType"] = DOCKER_MANIFEST
    docker["config"]["mediaType"] = "application/vnd.docker.container.image.v1+json"
    docker_image = ArchiveImage(
        image.config, image.layers, ref_name="example.org/x:1",
        manifest=json.dumps(docker).encode(), manifest_media_type=DOCKER_MANIFEST,
    )  # fmt: skip
    dest = tmp_path / "x.oci.tar"

    write_archive(dest, [docker_image], fmt=ArchiveFormat.OCI)

    with tarfile.open(dest) as tar:
        entry = load_json(tar, "index.json")["manifests"][0]
        manifest = json.loads(oci_blob(tar, entry["digest"]))
        assert oci_blob(tar, manifest["config"]["digest"]) == image.config
    assert entry["mediaType"] == manifest["mediaType"] == OCI_MANIFEST
    assert manifest["config"] == {**docker["config"], "mediaType": OCI_CONFIG}
    assert manifest["layers"] == [{"mediaType": GZIP, "digest": layer.digest, "size": layer.size}]

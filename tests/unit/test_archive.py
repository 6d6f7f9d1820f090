from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from actors.archive import (
    GZIP_LAYER_TYPES,
    LAYER_TYPES,
    TAR_LAYER_TYPES,
    ZSTD_LAYER_TYPES,
    ArchiveImage,
    ArchiveLayer,
    ArchiveResult,
    LayerFormatError,
    check_diff_id,
    inspect_layer,
    write_archive,
)
from kernel.errors import InvalidInput, PermanentFailure, StorageError

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
TAR = "application/vnd.oci.image.layer.v1.tar"


def layer_tar(seed: str, files: int = 3) -> bytes:
    """A small, deterministic layer tar with a directory and a few files."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo(f"{seed}")
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        tar.addfile(directory)
        for i in range(files):
            content = (f"{seed}-{i} ".encode() * (700 * (i + 1))) + os.urandom(300)
            info = tarfile.TarInfo(f"{seed}/file{i}.txt")
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def diff_id(tar: bytes) -> str:
    return f"sha256:{hashlib.sha256(tar).hexdigest()}"


def config_for(*diff_ids: str) -> bytes:
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
            "config": {},
        }
    ).encode()


def gzip_single(tar: bytes) -> bytes:
    return gzip.compress(tar, mtime=0)


def gzip_multi(tar: bytes) -> bytes:
    cut = len(tar) // 3
    return gzip.compress(tar[:cut], mtime=0) + gzip.compress(tar[cut:], mtime=0)


def gzip_named(tar: bytes) -> bytes:
    """A member whose header carries FNAME, as ``gzip file.tar`` writes."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="layer.tar", mode="wb", fileobj=buffer, mtime=7) as gz:
        gz.write(tar)
    return buffer.getvalue()


def gzip_trailing_zeros(tar: bytes) -> bytes:
    return gzip.compress(tar, mtime=0) + bytes(1024)


def gzip_trailing_garbage(tar: bytes) -> bytes:
    return gzip.compress(tar, mtime=0) + b"not gzip at all"


def zstd_frame(tar: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(tar)


def zstd_frames_checksum_skippable(tar: bytes) -> bytes:
    cut = len(tar) // 2
    compressor = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False)
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345"
    return compressor.compress(tar[:cut]) + skippable + compressor.compress(tar[cut:])


def zstd_streamed(tar: bytes) -> bytes:
    """No content size in the header, several blocks: what streaming encoders write."""
    buffer = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(buffer, closefd=False) as writer:
        writer.write(tar * 20)
    return buffer.getvalue()


Make = Callable[[bytes], bytes]


def write_blob(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


# --- media types ------------------------------------------------------------------------


def test_media_type_sets() -> None:
    assert GZIP_LAYER_TYPES == {DOCKER_GZIP, GZIP}
    assert ZSTD_LAYER_TYPES == {ZSTD}
    assert TAR_LAYER_TYPES == {TAR, "application/vnd.docker.image.rootfs.diff.tar"}
    assert LAYER_TYPES == GZIP_LAYER_TYPES | ZSTD_LAYER_TYPES | TAR_LAYER_TYPES
    assert issubclass(LayerFormatError, PermanentFailure)


# --- inspect_layer ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "media_type", "spliceable"),
    [
        pytest.param(gzip_single, GZIP, True, id="gzip-single-member"),
        pytest.param(gzip_single, DOCKER_GZIP, True, id="docker-gzip"),
        pytest.param(gzip_multi, GZIP, True, id="gzip-multi-member"),
        pytest.param(gzip_named, GZIP, True, id="gzip-fname-header"),
        pytest.param(gzip_trailing_zeros, GZIP, False, id="gzip-trailing-zeros"),
        pytest.param(gzip_trailing_garbage, GZIP, False, id="gzip-trailing-garbage"),
        pytest.param(zstd_frame, ZSTD, False, id="zstd"),
        pytest.param(zstd_frames_checksum_skippable, ZSTD, False, id="zstd-frames-skippable"),
        pytest.param(lambda tar: tar, TAR, False, id="plain-tar"),
    ],
)
def test_inspect_layer_reports_diff_id_size_and_spliceability(
    tmp_path: Path, make: Make, media_type: str, spliceable: bool
) -> None:
    tar = layer_tar("inspect")
    blob = write_blob(tmp_path, "blob", make(tar))
    seen: list[int] = []

    info = inspect_layer(blob, media_type, seen.append)

    assert info.diff_id == diff_id(tar)
    assert info.tar_size == len(tar)
    assert info.spliceable is spliceable
    assert seen == sorted(seen)
    assert seen[-1] == blob.stat().st_size


def test_inspect_layer_streams_large_blobs_in_chunks(tmp_path: Path) -> None:
    # Given a blob that inflates to far more than one inflate step (4 MiB)
    tar = bytes(30 * 1024 * 1024) + layer_tar("big")
    blob = write_blob(tmp_path, "blob", gzip_multi(tar))
    # When / Then
    info = inspect_layer(blob, GZIP)
    assert (info.diff_id, info.tar_size, info.spliceable) == (diff_id(tar), len(tar), True)


def test_inspect_layer_zstd_without_content_size(tmp_path: Path) -> None:
    tar = layer_tar("streamed")
    blob = write_blob(tmp_path, "blob", zstd_streamed(tar))
    info = inspect_layer(blob, ZSTD)
    assert (info.diff_id, info.tar_size) == (diff_id(tar * 20), 20 * len(tar))


def corrupt_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0x5A for b in data[middle : middle + 64]) + data[middle + 64 :]


@pytest.mark.parametrize(
    ("make", "media_type"),
    [
        pytest.param(lambda tar: corrupt_middle(gzip_single(tar)), GZIP, id="gzip-corrupt"),
        pytest.param(lambda tar: gzip_single(tar)[:-20], GZIP, id="gzip-truncated"),
        pytest.param(lambda tar: gzip_single(tar)[:-3], GZIP, id="gzip-truncated-trailer"),
        pytest.param(lambda tar: tar, GZIP, id="gzip-type-plain-tar"),
        pytest.param(lambda tar: b"", GZIP, id="gzip-empty"),
        pytest.param(lambda tar: gzip_single(tar) + b"\x1f\x8bxx", GZIP, id="gzip-bad-member"),
        pytest.param(lambda tar: zstd_frame(tar)[:-10], ZSTD, id="zstd-truncated"),
        pytest.param(lambda tar: zstd_frame(tar)[:6], ZSTD, id="zstd-truncated-header"),
        pytest.param(lambda tar: zstd_frame(tar) + b"garbage", ZSTD, id="zstd-trailing-garbage"),
        pytest.param(lambda tar: b"", ZSTD, id="zstd-empty"),
        pytest.param(lambda tar: gzip_single(tar), ZSTD, id="zstd-type-gzip-data"),
        pytest.param(lambda tar: tar, "application/vnd.oci.image.layer.v1.tar+bzip2", id="bzip2"),
        pytest.param(lambda tar: tar, "text/plain", id="unknown"),
    ],
)
def test_inspect_layer_rejects_bad_content(tmp_path: Path, make: Make, media_type: str) -> None:
    blob = write_blob(tmp_path, "blob", make(layer_tar("bad")))
    with pytest.raises(LayerFormatError):
        inspect_layer(blob, media_type)


def test_inspect_layer_missing_blob_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        inspect_layer(tmp_path / "absent", GZIP)


def test_check_diff_id_names_both_digests(tmp_path: Path) -> None:
    tar = layer_tar("check")
    info = inspect_layer(write_blob(tmp_path, "blob", gzip_single(tar)), GZIP)
    check_diff_id(info, diff_id(tar))
    wrong = "sha256:" + "0" * 64

    with pytest.raises(LayerFormatError) as raised:
        check_diff_id(info, wrong)

    assert wrong in str(raised.value)
    assert diff_id(tar) in str(raised.value)


# --- write_archive ----------------------------------------------------------------------


def archive_layer(directory: Path, name: str, data: bytes, media_type: str) -> ArchiveLayer:
    blob = write_blob(directory, name, data)
    return ArchiveLayer(blob=blob, media_type=media_type, info=inspect_layer(blob, media_type))


def no_part_files(directory: Path) -> bool:
    return not [p for p in directory.rglob("*") if p.name.endswith(".part")]


@dataclass
class Image:
    config: bytes
    layers: list[ArchiveLayer]
    diff_ids: list[str]


def load_json(tar: tarfile.TarFile, name: str) -> Any:
    member = tar.extractfile(name)
    assert member is not None
    return json.load(member)


def read_member(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.extractfile(name)
    assert member is not None
    return member.read()


@pytest.fixture
def image(tmp_path: Path) -> Image:
    """Five distinct layers in every form, the first listed twice by the config."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    tars = {name: layer_tar(name) for name in ("single", "multi", "padded", "zstd", "plain")}
    layers = [
        archive_layer(blobs, "single", gzip_single(tars["single"]), GZIP),
        archive_layer(blobs, "multi", gzip_multi(tars["multi"]), DOCKER_GZIP),
        archive_layer(blobs, "padded", gzip_trailing_zeros(tars["padded"]), GZIP),
        archive_layer(blobs, "zstd", zstd_frame(tars["zstd"]), ZSTD),
        archive_layer(blobs, "plain", tars["plain"], TAR),
    ]
    diff_ids = [diff_id(tars[n]) for n in ("single", "multi", "padded", "single", "zstd", "plain")]
    return Image(config_for(*diff_ids), layers, diff_ids)


def test_archive_is_a_docker_save_tar_with_spliced_gzip_layers(
    tmp_path: Path, image: Image
) -> None:
    # Given five layers (two spliceable) and a config listing one of them twice
    config, layers, diff_ids = image.config, image.layers, image.diff_ids
    dest = tmp_path / "out" / "image.tar.gz"
    progress: list[tuple[int, int | None]] = []

    # When
    result = write_archive(
        dest,
        [
            ArchiveImage(
                config,
                layers,
                ["localhost:5000/ns/app:v1", "localhost:5000/ns/app:latest", "other:2"],
            )
        ],
        progress=lambda done, total: progress.append((done, total)),
    )

    # Then the file is one gzip stream of members that decompresses to a tar
    archive = dest.read_bytes()
    plain = gzip.decompress(archive)
    assert isinstance(result, ArchiveResult)
    assert result.bytes_in == len(plain)
    assert result.bytes_out == len(archive)
    assert result.sha256 == hashlib.sha256(archive).hexdigest()
    assert result.throughput > 0
    assert progress[-1] == (len(plain), len(plain))
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    # ... the spliceable blobs are in it byte for byte, the others were recompressed
    spliceable = [layer for layer in layers if layer.info.spliceable]
    assert [layer.blob.name for layer in spliceable] == ["single", "multi"]
    assert result.spliced_bytes == sum(layer.blob.stat().st_size for layer in spliceable)
    for layer in spliceable:
        assert layer.blob.read_bytes() in archive
    assert no_part_files(tmp_path)

    with tarfile.open(dest, "r:gz") as tar:
        names = tar.getnames()
        manifest = load_json(tar, "manifest.json")
        repositories = load_json(tar, "repositories")
        (entry,) = manifest
        assert read_member(tar, entry["Config"]) == config
        layer_bytes = [read_member(tar, p) for p in entry["Layers"]]
        first_dir = entry["Layers"][0].split("/")[0]
        assert read_member(tar, f"{first_dir}/VERSION") == b"1.0"
        legacy = load_json(tar, f"{first_dir}/json")
        second_dir = entry["Layers"][1].split("/")[0]
        legacy_second = load_json(tar, f"{second_dir}/json")
        members = {m.name: m for m in tar.getmembers()}

    # ... manifest.json follows the config's diff_ids, the duplicate written once
    assert entry["Config"] == f"{hashlib.sha256(config).hexdigest()}.json"
    assert [diff_id(b) for b in layer_bytes] == diff_ids
    assert entry["Layers"][0] == entry["Layers"][3]
    assert len(set(entry["Layers"])) == 5
    assert sum(1 for n in names if n.endswith("/layer.tar")) == 5
    assert entry["RepoTags"] == [
        "localhost:5000/ns/app:v1",
        "localhost:5000/ns/app:latest",
        "other:2",
    ]
    last_dir = entry["Layers"][-1].split("/")[0]
    assert repositories == {
        "localhost:5000/ns/app": {"v1": last_dir, "latest": last_dir},
        "other": {"2": last_dir},
    }
    assert legacy == {"id": first_dir}
    assert legacy_second == {"id": second_dir, "parent": first_dir}
    assert members[first_dir].isdir()
    assert members[first_dir].mode == 0o755
    assert members["manifest.json"].mode == 0o644
    assert {m.mtime for m in members.values()} == {0}
    assert {"manifest.json", "repositories", entry["Config"]} <= set(names)


def test_archive_is_reproducible(tmp_path: Path, image: Image) -> None:
    config, layers = image.config, image.layers
    first = write_archive(tmp_path / "a.tar.gz", [ArchiveImage(config, layers, ["a:1"])])
    second = write_archive(tmp_path / "b.tar.gz", [ArchiveImage(config, layers, ["a:1"])])
    assert first.sha256 == second.sha256


def test_identical_chains_give_identical_layer_directories(tmp_path: Path, image: Image) -> None:
    config, layers = image.config, image.layers
    base_config = config_for(layers[0].info.diff_id, layers[1].info.diff_id)
    write_archive(tmp_path / "a.tar.gz", [ArchiveImage(config, layers, [])])
    write_archive(tmp_path / "b.tar.gz", [ArchiveImage(base_config, layers[:2], [])])

    def layer_paths(path: Path) -> list[str]:
        with tarfile.open(path, "r:gz") as tar:
            paths: list[str] = load_json(tar, "manifest.json")[0]["Layers"]
            return paths

    assert layer_paths(tmp_path / "a.tar.gz")[:2] == layer_paths(tmp_path / "b.tar.gz")


def test_untagged_archive_has_null_repo_tags_and_no_repositories(
    tmp_path: Path, image: Image
) -> None:
    config, layers = image.config, image.layers
    dest = tmp_path / "image.tar.gz"
    write_archive(dest, [ArchiveImage(config, layers, [])], level=0, threads=1)
    with tarfile.open(dest, "r:gz") as tar:
        manifest = load_json(tar, "manifest.json")
        assert "repositories" not in tar.getnames()
    assert manifest[0]["RepoTags"] is None


@pytest.mark.parametrize("tag", ["repo", "host:5000/repo", "repo:", "repo@sha256:" + "a" * 64])
def test_repo_tag_without_a_tag_is_refused(tmp_path: Path, image: Image, tag: str) -> None:
    config, layers = image.config, image.layers
    with pytest.raises(InvalidInput):
        write_archive(tmp_path / "x.tar.gz", [ArchiveImage(config, layers, [tag])])
    assert list(tmp_path.glob("x.tar.gz*")) == []


def test_missing_blob_fails_without_leaving_files(tmp_path: Path, image: Image) -> None:
    # Given a layer whose blob vanished after inspection
    config, layers = image.config, image.layers
    layers[3].blob.unlink()
    dest = tmp_path / "image.tar.gz"
    # When / Then
    with pytest.raises(StorageError):
        write_archive(dest, [ArchiveImage(config, layers, ["a:1"])])
    assert not dest.exists()
    assert no_part_files(tmp_path)


def test_blob_changed_since_inspection_fails_without_leaving_files(
    tmp_path: Path, image: Image
) -> None:
    config, layers = image.config, image.layers
    plain = layers[4]
    plain.blob.write_bytes(plain.blob.read_bytes() + bytes(512))
    dest = tmp_path / "image.tar.gz"
    with pytest.raises(LayerFormatError, match="changed since"):
        write_archive(dest, [ArchiveImage(config, layers, [])])
    assert not dest.exists()
    assert no_part_files(tmp_path)


def test_corrupt_blob_while_recompressing_fails_without_leaving_files(
    tmp_path: Path, image: Image
) -> None:
    config, layers = image.config, image.layers
    padded = layers[2]
    padded.blob.write_bytes(corrupt_middle(padded.blob.read_bytes()))
    dest = tmp_path / "image.tar.gz"
    with pytest.raises(LayerFormatError):
        write_archive(dest, [ArchiveImage(config, layers, [])])
    assert no_part_files(tmp_path)


def test_disk_full_is_a_storage_error(
    tmp_path: Path, image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, layers = image.config, image.layers

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match="disk full"):
        write_archive(tmp_path / "image.tar.gz", [ArchiveImage(config, layers, [])])
    assert no_part_files(tmp_path)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b'{"rootfs": {}}', id="no-diff-ids"),
        pytest.param(config_for("sha256:" + "1" * 64), id="unknown-diff-id"),
    ],
)
def test_config_that_does_not_match_the_layers_is_refused(
    tmp_path: Path, image: Image, config: bytes
) -> None:
    layers = image.layers
    with pytest.raises(LayerFormatError):
        write_archive(tmp_path / "x.tar.gz", [ArchiveImage(config, layers, [])])
    assert list(tmp_path.glob("x.tar.gz*")) == []


def test_layer_missing_from_config_is_refused(tmp_path: Path, image: Image) -> None:
    layers, diff_ids = image.layers, image.diff_ids
    with pytest.raises(LayerFormatError, match="not in the image config"):
        write_archive(tmp_path / "x.tar.gz", [ArchiveImage(config_for(*diff_ids[:2]), layers, [])])


def test_level_outside_isal_range_is_refused(tmp_path: Path, image: Image) -> None:
    config, layers = image.config, image.layers
    with pytest.raises(ValueError, match="0-3"):
        write_archive(tmp_path / "x.tar.gz", [ArchiveImage(config, layers, [])], level=6)


def test_image_without_layers(tmp_path: Path) -> None:
    config = config_for()
    dest = tmp_path / "empty.tar.gz"
    result = write_archive(dest, [ArchiveImage(config, [], ["empty:1"])])
    with tarfile.open(dest, "r:gz") as tar:
        manifest = load_json(tar, "manifest.json")
    assert manifest == [
        {
            "Config": f"{hashlib.sha256(config).hexdigest()}.json",
            "RepoTags": ["empty:1"],
            "Layers": [],
        }
    ]
    assert result.spliced_bytes == 0


def test_layer_tar_header_over_8_gib_keeps_its_size() -> None:
    from actors.archive import _header

    size = 9 * 1024**3 + 5
    with tarfile.open(fileobj=io.BytesIO(_header("x/layer.tar", size)), mode="r:") as tar:
        member = tar.next()
    assert member is not None
    assert (member.name, member.size) == ("x/layer.tar", size)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 4096])
def test_member_and_frame_walkers_survive_any_chunk_boundary(step: int) -> None:
    from actors.archive import _GzipMembers, _ZstdFrames

    data = os.urandom(5000) + b"x" * 100_000
    blob = gzip.compress(data[:3000], mtime=0) + gzip.compress(data[3000:], mtime=0)
    members = _GzipMembers()
    out = b"".join(b"".join(members.feed(blob[i : i + step])) for i in range(0, len(blob), step))
    members.finish("blob")
    assert (out, members.members, members.trailing) == (data, 2, False)

    frames = _ZstdFrames()
    zstd = zstd_frames_checksum_skippable(data)
    for i in range(0, len(zstd), step):
        frames.feed(zstd[i : i + step], "blob")
    frames.finish("blob")
    assert frames.frames == 2

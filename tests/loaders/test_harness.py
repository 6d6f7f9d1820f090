"""The loader harness itself, against archives that do not come from DCU.

Archives here are written by hand in the ``docker save`` layout (layers and configs from
``tests.servers.oci``), gzipped with Python, converted to oci-archives by
``skopeo copy``, or saved by the real engine; what each loader should report is read
from the archive itself. The expected names record each tool's own spelling.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.servers.docker_engine import DockerEngine
from tests.servers.images import PushedImages
from tests.servers.loaders import (
    Containerd,
    CtrLoader,
    LoadedImage,
    Loader,
    LoaderCommandError,
    LoaderError,
    PodmanLoader,
    SkopeoLoader,
    skopeo_binary,
)
from tests.servers.oci import MTIME, image_config, layer_tar
from tests.servers.registry import Registry

NAME = "example.org/exp/img:1.0"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


# --- archives -------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceImage:
    """One image written into an archive: its config digest and its RepoTags."""

    config_digest: str
    tags: tuple[str, ...]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = MTIME
    tar.addfile(info, io.BytesIO(data))


def write_docker_archive(
    path: Path, images: Sequence[Sequence[str]], *, architecture: str = "amd64"
) -> list[SourceImage]:
    """A ``docker save`` tar of one one-layer image per entry of ``images`` (its
    RepoTags, possibly none); every image has content of its own."""
    written: list[SourceImage] = []
    entries: list[dict[str, Any]] = []
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for number, tags in enumerate(images):
            layer = layer_tar({f"image{number}/hello.txt": f"image {number}\n".encode()})
            diff_id = hashlib.sha256(layer).hexdigest()
            config = image_config([f"sha256:{diff_id}"], ("linux", architecture))
            config_hex = hashlib.sha256(config).hexdigest()
            _add(tar, f"{config_hex}.json", config)
            _add(tar, f"{diff_id}/layer.tar", layer)
            entries.append(
                {
                    "Config": f"{config_hex}.json",
                    "RepoTags": list(tags),
                    "Layers": [f"{diff_id}/layer.tar"],
                }
            )
            written.append(SourceImage(f"sha256:{config_hex}", tuple(tags)))
        _add(tar, "manifest.json", json.dumps(entries).encode())
    return written


def gzipped(path: Path) -> Path:
    target = path.with_name(f"{path.name}.gz")
    with path.open("rb") as source, gzip.open(target, "wb") as out:
        shutil.copyfileobj(source, out)
    return target


def skopeo_oci_archive(docker_archive: Path, target: Path, name: str) -> Path:
    """``skopeo copy docker-archive:X oci-archive:Y:name`` (skopeo re-serialises the
    config on the way, so the oci-archive's config digest differs from the source's)."""
    subprocess.run(
        [
            skopeo_binary(),
            "--insecure-policy",
            "copy",
            "--quiet",
            f"docker-archive:{docker_archive}",
            f"oci-archive:{target}:{name}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return target


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {
            m.name.removeprefix("./"): tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def oci_config_digest(archive: Path) -> str:
    """The config digest of the one image in an oci-archive, read with tarfile."""
    files = members(archive)
    index = json.loads(files["index.json"])
    (entry,) = index["manifests"]
    manifest = json.loads(files[f"blobs/sha256/{entry['digest'].partition(':')[2]}"])
    return str(manifest["config"]["digest"])


def with_annotations(archive: Path, target: Path, annotations: dict[str, str] | None) -> Path:
    """A copy of a one-image oci-archive whose index entry has exactly ``annotations``."""
    with tarfile.open(archive) as source, tarfile.open(target, "w") as out:
        for member in source.getmembers():
            data = source.extractfile(member) if member.isfile() else None
            if member.name.removeprefix("./") == "index.json":
                assert data is not None
                index = json.loads(data.read())
                (entry,) = index["manifests"]
                entry.pop("annotations", None)
                if annotations is not None:
                    entry["annotations"] = annotations
                _add(out, member.name, json.dumps(index).encode())
            else:
                out.addfile(member, data)
    return target


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Path, SourceImage]:
    """A docker-archive of one image named ``NAME``."""
    path = tmp_path / "image.tar"
    (image,) = write_docker_archive(path, [[NAME]])
    return path, image


@pytest.fixture
def oci_archive(archive: tuple[Path, SourceImage], tmp_path: Path) -> tuple[Path, str]:
    """The same image as an oci-archive written by skopeo, and its config digest."""
    path = skopeo_oci_archive(archive[0], tmp_path / "image.oci.tar", NAME)
    return path, oci_config_digest(path)


# --- docker-archive -------------------------------------------------------------------


def test_loads_a_docker_archive(loader: Loader, archive: tuple[Path, SourceImage]) -> None:
    path, image = archive

    loaded = loader.load(path)

    assert loaded == [LoadedImage(image.config_digest, (NAME,))]
    assert loader.images() == loaded


def test_remove_all_empties_the_store(loader: Loader, archive: tuple[Path, SourceImage]) -> None:
    loader.load(archive[0])
    assert loader.images() != []

    loader.remove_all()

    assert loader.images() == []


DOCKER_HUB_SHORT_NAME = {
    "docker": "busybox:1.0",
    "podman": "localhost/busybox:1.0",
    "ctr": "docker.io/library/busybox:1.0",
}


def test_docker_hub_short_name_as_each_tool_spells_it(loader: Loader, tmp_path: Path) -> None:
    path = tmp_path / "busybox.tar"
    (image,) = write_docker_archive(path, [["busybox:1.0"]])

    loaded = loader.load(path)

    assert loaded == [LoadedImage(image.config_digest, (DOCKER_HUB_SHORT_NAME[loader.name],))]


def test_several_images_tags_and_an_untagged_one(loader: Loader, tmp_path: Path) -> None:
    # Given an archive of a twice-tagged image, a once-tagged one and an untagged one
    path = tmp_path / "several.tar"
    first, second, untagged = write_docker_archive(
        path,
        [["example.org/exp/a:1.0", "example.org/exp/a:latest"], ["example.org/exp/b:2.0"], []],
    )

    # When it is loaded
    loaded = loader.load(path)

    # Then every tag is reported with its image; ctr skips the untagged image silently
    expected = [
        LoadedImage(first.config_digest, first.tags),
        LoadedImage(second.config_digest, second.tags),
    ]
    if loader.name != "ctr":
        expected.append(LoadedImage(untagged.config_digest, ()))
    assert loaded == expected
    assert loader.images() == sorted(expected, key=lambda i: i.image_id)


def test_an_image_for_another_platform(loader: Loader, tmp_path: Path) -> None:
    path = tmp_path / "arm64.tar"
    (image,) = write_docker_archive(path, [[NAME]], architecture="arm64")

    assert loader.load(path) == [LoadedImage(image.config_digest, (NAME,))]


def test_ctr_without_all_platforms_refuses_another_platform(
    containerd: Containerd, tmp_path: Path
) -> None:
    path = tmp_path / "arm64.tar"
    write_docker_archive(path, [[NAME]], architecture="arm64")
    loader = CtrLoader(containerd, namespace="dcu-tests-host-only", all_platforms=False)
    loader.remove_all()
    try:
        with pytest.raises(LoaderCommandError, match=r"^ctr: .*image might be filtered out"):
            loader.load(path)
    finally:
        loader.remove_all()


def test_docker_save_of_a_pushed_image(
    loader: Loader,
    docker_engine: DockerEngine,
    pushed_images: PushedImages,
    tmp_path: Path,
) -> None:
    # Given the real engine's ``docker save`` of the small fixture image
    small = pushed_images.small
    path = tmp_path / "small.tar"
    docker_engine.docker("pull", "--quiet", small.reference)
    try:
        docker_engine.docker("save", "--output", str(path), small.reference)
    finally:
        docker_engine.forget(small.reference)

    # When it is loaded, then it keeps its image ID and its (registry-qualified) name
    assert loader.load(path) == [LoadedImage(small.image_id, (small.reference,))]


# --- gzip -----------------------------------------------------------------------------


def test_docker_reads_a_gzip_archive(
    docker_loader: Loader, archive: tuple[Path, SourceImage]
) -> None:
    path, image = archive

    assert docker_loader.load(gzipped(path)) == [LoadedImage(image.config_digest, (NAME,))]


@pytest.mark.parametrize(
    ("loader_name", "stderr"),
    [
        pytest.param("podman", "docker-archive: loading tar component manifest.json", id="podman"),
        pytest.param("ctr", "archive/tar: invalid tar header", id="ctr"),
    ],
)
def test_podman_and_ctr_refuse_a_gzip_archive(
    request: pytest.FixtureRequest,
    loader_name: str,
    stderr: str,
    archive: tuple[Path, SourceImage],
) -> None:
    loader: Loader = request.getfixturevalue(f"{loader_name}_loader")

    with pytest.raises(LoaderCommandError) as refused:
        loader.load(gzipped(archive[0]))

    assert str(refused.value).startswith(f"{loader_name}: `")
    assert stderr in refused.value.stderr
    assert stderr in str(refused.value)
    assert loader.images() == []


def test_stdin_gunzip_workaround(loader: Loader, archive: tuple[Path, SourceImage]) -> None:
    path, image = archive

    loaded = loader.load(gzipped(path), stdin_gunzip=True)

    assert loaded == [LoadedImage(image.config_digest, (NAME,))]


def test_stdin_gunzip_of_a_plain_tar_is_a_clear_error(
    podman_loader: PodmanLoader, archive: tuple[Path, SourceImage]
) -> None:
    with pytest.raises(LoaderError, match=r"^podman: cannot gunzip .*image\.tar"):
        podman_loader.load(archive[0], stdin_gunzip=True)


# --- oci-archive ----------------------------------------------------------------------


def test_oci_archive(loader: Loader, oci_archive: tuple[Path, str]) -> None:
    path, config_digest = oci_archive
    if loader.name == "docker":
        # docker 20.10 finds no manifest.json and reads the tar as a legacy layout
        with pytest.raises(LoaderCommandError, match=r"^docker: .*/blobs/json: no such file"):
            loader.load(path)
        return

    assert loader.load(path) == [LoadedImage(config_digest, (NAME,))]


@pytest.mark.parametrize(
    ("annotations", "ctr_name", "podman_name"),
    [
        pytest.param({REF_NAME: NAME}, NAME, NAME, id="ref-name"),
        pytest.param(
            {REF_NAME: "1.0"},
            re.compile(r"import-\d{4}-\d{2}-\d{2}:1\.0"),  # ctr's default base name
            "localhost/1.0:latest",
            id="ref-name-tag-only",
        ),
        pytest.param(
            {CONTAINERD_NAME: "example.org/exp/cd:2.0"},
            "example.org/exp/cd:2.0",
            "example.org/exp/cd:2.0",
            id="containerd-name",
        ),
        pytest.param({REF_NAME: NAME, CONTAINERD_NAME: NAME}, NAME, NAME, id="both-equal"),
        pytest.param(
            {REF_NAME: "example.org/exp/ref:3.0", CONTAINERD_NAME: "example.org/exp/cd:3.0"},
            "example.org/exp/cd:3.0",
            "example.org/exp/cd:3.0",
            id="both-differ",
        ),
        pytest.param(
            {REF_NAME: "busybox:1.0", CONTAINERD_NAME: "busybox:1.0"},
            "busybox:1.0",
            "localhost/busybox:1.0",
            id="short-name-both",
        ),
        pytest.param(
            {REF_NAME: "busybox:1.0"}, "busybox:1.0", "localhost/busybox:1.0", id="short-ref-name"
        ),
        pytest.param(
            {CONTAINERD_NAME: "busybox:1.0"},
            "busybox:1.0",
            "localhost/busybox:1.0",
            id="short-containerd-name",
        ),
        pytest.param(None, None, None, id="none"),
    ],
)
@pytest.mark.parametrize("loader_name", ["ctr", "podman"])
def test_oci_archive_names(
    request: pytest.FixtureRequest,
    loader_name: str,
    annotations: dict[str, str] | None,
    ctr_name: str | re.Pattern[str] | None,
    podman_name: str | None,
    oci_archive: tuple[Path, str],
    tmp_path: Path,
) -> None:
    # Given skopeo's oci-archive with the index entry's annotations edited by hand
    loader: Loader = request.getfixturevalue(f"{loader_name}_loader")
    source, config_digest = oci_archive
    path = with_annotations(source, tmp_path / "edited.oci.tar", annotations)

    # When it is loaded
    loaded = loader.load(path)

    # Then the name is the one the tool derives; ctr skips an image without a name and
    # podman keeps it untagged
    expected = ctr_name if loader_name == "ctr" else podman_name
    if expected is None:
        assert loaded == ([] if loader_name == "ctr" else [LoadedImage(config_digest, ())])
        return
    [image] = loaded
    assert image.image_id == config_digest
    [name] = image.names
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(name), name
    else:
        assert name == expected


# --- skopeo ---------------------------------------------------------------------------


def test_skopeo_reads_a_docker_archive(
    skopeo_loader: SkopeoLoader, archive: tuple[Path, SourceImage]
) -> None:
    path, image = archive

    assert skopeo_loader.load(path, transport="docker-archive") == [
        LoadedImage(image.config_digest, ())
    ]
    assert skopeo_loader.load(path, transport="docker-archive", ref=NAME) == [
        LoadedImage(image.config_digest, (NAME,))
    ]


def test_skopeo_oci_layout_converts_a_docker_config(
    skopeo_loader: SkopeoLoader, archive: tuple[Path, SourceImage], oci_archive: tuple[Path, str]
) -> None:
    path, image = archive

    [converted] = skopeo_loader.load(path, transport="docker-archive", layout="oci")

    assert converted.image_id != image.config_digest
    assert converted.image_id == oci_archive[1]  # what skopeo's own oci-archive holds


def test_skopeo_picks_an_image_of_several_by_ref(
    skopeo_loader: SkopeoLoader, tmp_path: Path
) -> None:
    path = tmp_path / "several.tar"
    _, second = write_docker_archive(path, [["example.org/exp/a:1.0"], ["example.org/exp/b:2.0"]])

    loaded = skopeo_loader.load(path, transport="docker-archive", ref="example.org/exp/b:2.0")

    assert loaded == [LoadedImage(second.config_digest, ("example.org/exp/b:2.0",))]


def test_skopeo_reads_an_oci_archive(
    skopeo_loader: SkopeoLoader, oci_archive: tuple[Path, str]
) -> None:
    path, config_digest = oci_archive

    assert skopeo_loader.load(path, transport="oci-archive", ref=NAME) == [
        LoadedImage(config_digest, (NAME,))
    ]
    assert skopeo_loader.load(path, transport="oci-archive") == [LoadedImage(config_digest, ())]


def test_skopeo_refuses_a_gzip_docker_archive(
    skopeo_loader: SkopeoLoader, archive: tuple[Path, SourceImage]
) -> None:
    with pytest.raises(LoaderCommandError, match=r"^skopeo: `"):
        skopeo_loader.load(gzipped(archive[0]), transport="docker-archive")


def test_skopeo_rejects_an_unknown_transport(
    skopeo_loader: SkopeoLoader, archive: tuple[Path, SourceImage]
) -> None:
    with pytest.raises(ValueError, match="transport"):
        skopeo_loader.load(archive[0], transport="docker-daemon")


@pytest.mark.parametrize("transport", ["docker-archive", "oci-archive"])
def test_skopeo_pushes_to_the_registry(
    transport: str,
    registry: Registry,
    archive: tuple[Path, SourceImage],
    oci_archive: tuple[Path, str],
    tmp_path: Path,
) -> None:
    path, config_digest = (
        (archive[0], archive[1].config_digest) if transport == "docker-archive" else oci_archive
    )
    skopeo = SkopeoLoader(registry.address, workdir=tmp_path)
    repo = f"loaders/{transport}"

    pushed = skopeo.push(path, transport=transport, destination=f"{repo}:1.0")

    assert pushed == LoadedImage(config_digest, (f"{registry.address}/{repo}:1.0",))
    assert registry.manifest(repo, "1.0")["config"]["digest"] == config_digest

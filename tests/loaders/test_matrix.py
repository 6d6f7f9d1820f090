"""The loader matrix of docs/compatibility.md, cell by cell, with DCU's own archives.

The table in the document is the test's input: each ``(loader, format)`` cell says
``yes``, ``gunzip`` or ``no``, and runs here as a test. A real ``dcu serve`` packages a
bundle of three images sharing a base layer in each format (one image per media type
and layer compression, one of them a Docker Hub name served by a mirror); each loader
loads the object fetched from S3 into an empty store, and every image ID and name read
back from the store must be the source's.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from actors.archive import CONTAINERD_NAME
from events.formats import ArchiveFormat
from events.reference import parse_reference
from tests.e2e.conftest import service_config
from tests.e2e.helpers import fetch_object
from tests.servers.dcu_process import DcuProcess
from tests.servers.docker_engine import DockerEngine
from tests.servers.loaders import (
    LoadedImage,
    Loader,
    LoaderCommandError,
    PodmanLoader,
    SkopeoLoader,
)
from tests.servers.nats import NatsServer
from tests.servers.oci import PushedOciImage, layer_tar, push_image, write_layer_blob
from tests.servers.registry import Registry
from tests.servers.s3 import S3Server

pytestmark = pytest.mark.e2e

DOC = Path(__file__).resolve().parents[2] / "docs" / "compatibility.md"
LOADERS = {
    "docker load": "docker",
    "podman load": "podman",
    "skopeo copy": "skopeo",
    "ctr images import": "ctr",
}
CELLS = ("yes", "gunzip", "pull", "no")


def read_matrix(text: str) -> dict[tuple[str, ArchiveFormat], str]:
    """The document's table between its ``<!-- matrix`` and ``<!-- end of matrix``
    markers: (loader key, format) -> cell. Raises ValueError for a table the tests
    cannot run (an unknown loader, format or cell value, a missing column)."""
    block = text.split("<!-- matrix", 1)[1].split("<!-- end of matrix", 1)[0]
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in block.splitlines()
        if line.startswith("|")
    ]
    header, body = rows[0], [row for row in rows[2:]]
    formats = [ArchiveFormat(name) for name in header[1:-1]]
    if set(formats) != set(ArchiveFormat):
        raise ValueError(f"the matrix has columns {header[1:-1]}, not every format")
    matrix: dict[tuple[str, ArchiveFormat], str] = {}
    for row in body:
        loader = LOADERS[row[0]]
        for fmt, cell in zip(formats, row[1:-1], strict=True):
            if cell not in CELLS:
                raise ValueError(f"cell {row[0]} / {fmt}: {cell!r} is not one of {CELLS}")
            matrix[(loader, fmt)] = cell
    if {loader for loader, _ in matrix} != set(LOADERS.values()):
        raise ValueError("the matrix does not list every loader")
    return matrix


MATRIX = read_matrix(DOC.read_text())


def test_the_matrix_covers_every_loader_and_format() -> None:
    assert len(MATRIX) == len(LOADERS) * len(ArchiveFormat)
    # and the cells the issue measured stay as measured
    assert MATRIX[("docker", ArchiveFormat.DOCKER_GZIP)] == "yes"
    assert {MATRIX[(loader, ArchiveFormat.DOCKER)] for loader in LOADERS.values()} == {"yes"}


@dataclass(frozen=True)
class Bundle:
    images: dict[str, str]  # canonical name -> image ID
    archives: dict[ArchiveFormat, Path]
    references: list[str]  # as requested


def _push_images(registry: Registry, scratch: Path) -> list[tuple[str, PushedOciImage]]:
    """Three images on one base layer (its blob shared, so the registry stores it once):
    Docker media types with gzip; OCI with a zstd layer; OCI with an uncompressed layer,
    pushed as ``library/busybox`` for a Docker Hub name through the mirror."""
    run = uuid.uuid4().hex[:8]
    base = write_layer_blob(
        scratch / "base.tar.gz", {"base/os-release": b"ID=dcu-test\n", "base/lib.bin": 400_000}
    )

    def own(name: str) -> bytes:
        return layer_tar({f"{name}/app.bin": 150_000, f"{name}/VERSION": f"{name}\n".encode()})

    first = push_image(registry.url, f"matrix/app-{run}", "1.0", [base, own("a")])
    second = push_image(
        registry.url, f"matrix/tool-{run}", "2.0", [base, own("b")],
        compression=["gzip", "zstd"], media="oci",
    )  # fmt: skip
    hub = push_image(
        registry.url, "library/busybox", f"m-{run}", [base, own("c")],
        compression=["gzip", "none"], media="oci",
    )  # fmt: skip
    return [
        (first.reference, first),
        (second.reference, second),
        (f"busybox:m-{run}", hub),
    ]


@dataclass(frozen=True)
class Service:
    process: DcuProcess
    s3: S3Server
    pushed: list[tuple[str, PushedOciImage]]  # (reference as requested, image)
    scratch: Path

    def package(
        self, path: str, body: dict[str, Any], fmt: ArchiveFormat, name: str
    ) -> tuple[dict[str, Any], Path]:
        """Start a task (``/start`` or ``/bundle``) in ``fmt``, wait until it completes,
        fetch its object; the task's status and the archive."""
        status, started = self.process.post(
            path, {"username": "matrix", **body, "format": fmt.value}
        )
        assert status == 200, started
        data: dict[str, Any] = self.process.wait_terminal(started["data"]["task_id"], timeout=120)
        assert data["state"] == "completed", data
        assert data["format"] == fmt.value
        archive = self.scratch / f"{name}{fmt.suffix}"
        metadata = fetch_object(
            self.s3, self.process.config["minio"]["bucket"], data["minio_object_name"], archive
        )
        assert metadata["x-amz-meta-dcu-format"] == fmt.value
        return data, archive


@pytest.fixture(scope="module")
def service(
    nats_server: NatsServer,
    docker_engine: DockerEngine,
    s3_server: S3Server,
    registry: Registry,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    """A real ``dcu serve`` (Docker Hub names served by a mirror: the test registry) and
    the three images pushed."""
    scratch = tmp_path_factory.mktemp("matrix")
    pushed = _push_images(registry, scratch)
    config = service_config(
        nats=nats_server,
        engine=docker_engine,
        s3=s3_server,
        tag=uuid.uuid4().hex[:8],
        download={"mirrors": {"docker.io": [registry.address]}},
    )
    process = DcuProcess(scratch / "serve", config, ["serve"], name="serve").start()
    try:
        yield Service(process, s3_server, pushed, scratch)
    finally:
        process.stop()
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def bundle(service: Service) -> Bundle:
    """The bundle of the three images packaged in every format, fetched from S3."""
    archives: dict[ArchiveFormat, Path] = {}
    references = [reference for reference, _ in service.pushed]
    for fmt in ArchiveFormat:
        data, archive = service.package(
            "/bundle", {"name": "release", "images": references}, fmt, "release"
        )
        assert [image["image_id"] for image in data["images"]] == [
            image.image_id for _, image in service.pushed
        ]
        assert data["minio_object_name"].endswith(f"/release{fmt.suffix}")
        archives[fmt] = archive
    return Bundle(
        images={parse_reference(ref).canonical: image.image_id for ref, image in service.pushed},
        archives=archives,
        references=references,
    )


def canonical_names(images: list[LoadedImage]) -> dict[str, str]:
    """Name -> image ID, every name in its fully qualified form (docker shows a Docker Hub
    image by its familiar name; the others by the qualified one)."""
    return {
        parse_reference(name).canonical: image.image_id for image in images for name in image.names
    }


def _gunzipped(archive: Path, dest: Path) -> Path:
    with gzip.open(archive, "rb") as source, dest.open("wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
    return dest


def _skopeo_all(
    skopeo: SkopeoLoader, archive: Path, fmt: ArchiveFormat, names: list[str]
) -> dict[str, str]:
    """Each image copied out of the archive by its name (the name selects it: copying by
    it proves the name survived)."""
    transport = "oci-archive" if fmt is ArchiveFormat.OCI else "docker-archive"
    found: dict[str, str] = {}
    for name in names:
        (image,) = skopeo.load(archive, transport=transport, ref=name)
        found[name] = image.image_id
    return found


def _store_loader(request: pytest.FixtureRequest, name: str) -> Loader:
    loader: Loader = request.getfixturevalue(f"{name}_loader")
    return loader


@pytest.mark.parametrize(
    ("loader_name", "fmt", "cell"),
    [(loader, fmt, cell) for (loader, fmt), cell in sorted(MATRIX.items())],
    ids=[f"{loader}-{fmt}-{cell}" for (loader, fmt), cell in sorted(MATRIX.items())],
)
def test_cell(
    request: pytest.FixtureRequest,
    bundle: Bundle,
    tmp_path: Path,
    loader_name: str,
    fmt: ArchiveFormat,
    cell: str,
) -> None:
    archive = bundle.archives[fmt]
    if loader_name == "skopeo":
        skopeo = SkopeoLoader(workdir=tmp_path)
        names = list(bundle.images)
        if cell == "no":
            with pytest.raises(LoaderCommandError):
                _skopeo_all(skopeo, archive, fmt, names)
            return
        if cell == "gunzip":
            with pytest.raises(LoaderCommandError):
                _skopeo_all(skopeo, archive, fmt, names)
            archive = _gunzipped(archive, tmp_path / "release.tar")
        assert _skopeo_all(skopeo, archive, fmt, names) == bundle.images
        return
    loader = _store_loader(request, loader_name)
    if cell == "pull":
        # ``load`` takes an archive of one image only; each image is pulled by its name
        assert isinstance(loader, PodmanLoader)
        with pytest.raises(LoaderCommandError, match="more than one image"):
            loader.load(archive)
        for name in bundle.images:
            loader.pull(archive, name)
        assert canonical_names(loader.images()) == bundle.images
        return
    if cell == "no":
        with pytest.raises(LoaderCommandError):
            loader.load(archive)
        assert loader.images() == []
        return
    if cell == "gunzip":
        with pytest.raises(LoaderCommandError):
            loader.load(archive)
        assert loader.images() == []
    loader.load(archive, stdin_gunzip=cell == "gunzip")
    # Then the store holds every image under its ID and name, nothing else
    assert canonical_names(loader.images()) == bundle.images


def test_every_format_names_its_file_by_its_suffix(bundle: Bundle) -> None:
    sizes = {fmt: path.stat().st_size for fmt, path in bundle.archives.items()}
    assert all(
        re.fullmatch(rf"release{re.escape(f.suffix)}", p.name) for f, p in bundle.archives.items()
    )
    # the uncompressed docker archive is the largest; its gzip the smallest docker one
    assert sizes[ArchiveFormat.DOCKER] > sizes[ArchiveFormat.DOCKER_GZIP]
    assert sizes[ArchiveFormat.DOCKER] > sizes[ArchiveFormat.OCI]


def test_a_bundle_stores_a_shared_layer_once(
    service: Service, bundle: Bundle, docker_loader: Loader
) -> None:
    # Given the three images, which share one base layer, packaged one by one
    fmt = ArchiveFormat.DOCKER_GZIP
    singles = [
        service.package("/start", {"docker_image_name": ref}, fmt, f"single-{index}")[1]
        for index, ref in enumerate(bundle.references)
    ]
    base_size = service.pushed[0][1].layer_sizes[0]
    # Then the bundle of all three is smaller than the three archives together by at
    # least the base layer twice over (it holds it once, they hold it three times)
    together = sum(path.stat().st_size for path in singles)
    saved = together - bundle.archives[fmt].stat().st_size
    assert saved >= 2 * base_size, (together, saved, base_size)
    # and the task reports what sharing saved
    status, answer = service.process.get("/query?docker_image_name=release")
    assert status == 200, answer
    task_ids = [item["task_id"] for item in answer["data"]["items"]]
    reports = [service.process.get(f"/status/{task_id}")[1]["data"] for task_id in task_ids]
    (report,) = [r for r in reports if r["format"] == fmt.value]
    assert report["shared_bytes"] == 2 * base_size
    assert [image["docker_image_name"] for image in report["images"]] == bundle.references
    # and it loads all three images under their names
    docker_loader.load(bundle.archives[fmt])
    assert canonical_names(docker_loader.images()) == bundle.images


def _index_names(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        index = json.load(member)
    return [entry["annotations"][CONTAINERD_NAME] for entry in index["manifests"]]


@pytest.mark.parametrize("fmt", [ArchiveFormat.DOCKER, ArchiveFormat.OCI])
@pytest.mark.parametrize("with_tag", [False, True], ids=["digest", "tag-and-digest"])
@pytest.mark.parametrize("which", [0, 1], ids=["docker-manifest", "oci-manifest"])
def test_a_digest_reference_loads_as_documented(
    request: pytest.FixtureRequest,
    service: Service,
    fmt: ArchiveFormat,
    with_tag: bool,
    which: int,
) -> None:
    # Given an image asked for by its digest, with or without a tag
    _, image = service.pushed[which]
    repository = image.digest_reference.partition("@")[0]
    reference = (
        f"{repository}:pinned@{image.manifest_digest}" if with_tag else image.digest_reference
    )
    _, archive = service.package(
        "/start", {"docker_image_name": reference}, fmt, f"pinned-{which}-{with_tag}"
    )
    pinned = image.digest_reference
    if fmt is ArchiveFormat.OCI and not with_tag:
        (pinned,) = _index_names(archive)
        # the registry's digest when its manifest is OCI; a Docker manifest is renamed
        # to OCI media types in the archive, which gives it a digest of its own
        assert (pinned == image.digest_reference) is (image.media == "oci")
        assert pinned.startswith(f"{repository}@sha256:")
    tagged = [(f"{repository}:pinned",)]
    # Then each loader that reads the format loads it by its ID, named as documented:
    # a docker archive holds no digest, so the image is untagged unless a tag was named
    # (and ctr imports no untagged image); an OCI archive names it by a digest
    expected = {
        (ArchiveFormat.DOCKER, False): {"docker": [()], "podman": [()], "ctr": []},
        (ArchiveFormat.DOCKER, True): {"docker": tagged, "podman": tagged, "ctr": tagged},
        (ArchiveFormat.OCI, False): {"podman": [(pinned,)], "ctr": [(pinned,)]},
        (ArchiveFormat.OCI, True): {"podman": tagged, "ctr": tagged},
    }[(fmt, with_tag)]
    for name, names in expected.items():
        loader = _store_loader(request, name)
        loader.load(archive)
        found = loader.images()
        assert [tuple(parse_reference(n).canonical for n in i.names) for i in found] == [
            tuple(parse_reference(n).canonical for n in group) for group in names
        ], name
        assert {i.image_id for i in found} <= {image.image_id}


def test_docker_load_reads_no_zstd_archive(
    bundle: Bundle, docker_loader: Loader, tmp_path: Path
) -> None:
    """Why there is no ``docker-archive+zstd``: the engine here cannot load it."""
    plain = bundle.archives[ArchiveFormat.DOCKER]
    packed = tmp_path / "release.tar.zst"
    with plain.open("rb") as source, packed.open("wb") as out:
        zstandard.ZstdCompressor(level=3).copy_stream(source, out)

    with pytest.raises(LoaderCommandError, match="invalid tar header"):
        docker_loader.load(packed)
    assert docker_loader.images() == []


def test_a_bundle_with_a_missing_image_fails_naming_it(service: Service) -> None:
    missing = f"{service.pushed[0][1].registry}/matrix/absent-{uuid.uuid4().hex[:8]}:1"
    images = [service.pushed[0][0], missing]
    status, started = service.process.post(
        "/bundle", {"username": "matrix", "name": "broken", "images": images}
    )
    assert status == 200, started

    data = service.process.wait_terminal(started["data"]["task_id"], timeout=120)

    assert data["state"] == "failed", data
    assert missing in data["error_message"], data["error_message"]
    assert data["minio_object_name"] is None

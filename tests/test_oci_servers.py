"""The Python-built images (``tests.servers.oci``) and the token-auth registry work.

Against the real distribution registry (``docker-registry`` 2.8) and, for the proof that
the images are valid, the real Docker engine pulling them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from tests.servers.docker_engine import DockerEngine
from tests.servers.images import write_mixed
from tests.servers.oci import (
    DOCKER_FOREIGN_LAYER,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MTIME,
    OCI_INDEX,
    OCI_MANIFEST,
    LayerBlob,
    LayerFiles,
    RegistryError,
    auth_headers,
    fetch_blob,
    fetch_manifest,
    layer_blob,
    layer_tar,
    push_blob,
    push_image,
    push_index,
    put_raw_manifest,
    write_layer_blob,
    write_layer_tar,
)
from tests.servers.registry import Registry
from tests.servers.token_registry import (
    ALLOW_FOREIGN_URLS,
    ConfiguredRegistry,
    TokenAuthRegistry,
)

FILES: LayerFiles = {
    "etc/app/config.json": b'{"name": "oci-test"}\n',
    "usr/bin/app": 70_000,
    "README": b"hello\n",
}


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def unique_repo(prefix: str = "oci") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:10]}"


def decompress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.decompress(data)
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    return data


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenAuthRegistry]:
    server = TokenAuthRegistry(tmp_path_factory.mktemp("token-registry"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def foreign_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConfiguredRegistry]:
    server = ConfiguredRegistry(
        tmp_path_factory.mktemp("foreign-registry"), extra_config=ALLOW_FOREIGN_URLS
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- layer tars and blobs (no server) -------------------------------------------------


def test_layer_tar_is_sorted_with_parents_and_fixed_metadata(tmp_path: Path) -> None:
    data = layer_tar(FILES)

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == [
            "README",
            "etc",
            "etc/app",
            "etc/app/config.json",
            "usr",
            "usr/bin",
            "usr/bin/app",
        ]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {
            (MTIME, 0, 0, "", "")
        }
        assert {m.name: m.mode for m in members if m.isdir()} == dict.fromkeys(
            ["etc", "etc/app", "usr", "usr/bin"], 0o755
        )
        generated = tar.extractfile("usr/bin/app")
        assert generated is not None
        content = generated.read()
    # int content is exactly what images.write_mixed writes for the same name
    write_mixed(tmp_path / "app", 70_000, name="usr/bin/app")
    assert content == (tmp_path / "app").read_bytes()
    assert layer_tar(dict(reversed(list(FILES.items())))) == data
    assert len(data) % tarfile.RECORDSIZE == 0


def test_streamed_layer_tar_equals_the_in_memory_one(tmp_path: Path) -> None:
    real_file = tmp_path / "real.bin"
    real_file.write_bytes(b"0123456789" * 1000)
    files: LayerFiles = {**FILES, "opt/real.bin": real_file}

    diff_id = write_layer_tar(tmp_path / "layer.tar", files)

    assert (tmp_path / "layer.tar").read_bytes() == layer_tar(files)
    assert diff_id == sha256(layer_tar(files))


@pytest.mark.parametrize("path", ["/abs", "../up", "a/../../b"])
def test_layer_paths_must_stay_inside_the_layer(path: str) -> None:
    with pytest.raises(ValueError, match="relative"):
        layer_tar({path: b"x"})


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_layer_blob_digests_and_round_trip(tmp_path: Path, compression: str) -> None:
    tar = layer_tar(FILES)

    in_memory = layer_blob(tar, compression)
    streamed = write_layer_blob(tmp_path / "blob", FILES, compression)

    assert in_memory.data is not None
    assert decompress(in_memory.data, compression) == tar
    assert in_memory.diff_id == streamed.diff_id == sha256(tar)
    assert in_memory.digest == streamed.digest == sha256(in_memory.data)
    assert (tmp_path / "blob").read_bytes() == in_memory.data
    assert in_memory.size == streamed.size == len(in_memory.data)


def test_docker_media_types_have_no_zstd(registry: Registry) -> None:
    with pytest.raises(ValueError, match="zstd"):
        push_image(registry.url, unique_repo(), "1", [layer_tar(FILES)], compression="zstd")


# --- pushing to the registry ----------------------------------------------------------


@pytest.mark.parametrize(
    ("media", "compression", "manifest_type", "layer_type"),
    [
        pytest.param(
            "docker",
            "gzip",
            DOCKER_MANIFEST,
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            id="docker-gzip",
        ),
        pytest.param(
            "oci",
            "gzip",
            OCI_MANIFEST,
            "application/vnd.oci.image.layer.v1.tar+gzip",
            id="oci-gzip",
        ),
        pytest.param(
            "oci",
            "zstd",
            OCI_MANIFEST,
            "application/vnd.oci.image.layer.v1.tar+zstd",
            id="oci-zstd",
        ),
        pytest.param(
            "oci", "none", OCI_MANIFEST, "application/vnd.oci.image.layer.v1.tar", id="oci-none"
        ),
    ],
)
def test_push_image_round_trips_through_the_registry(
    registry: Registry, media: str, compression: str, manifest_type: str, layer_type: str
) -> None:
    # Given two layers, one of them bigger than a single in-memory chunk
    repo = unique_repo()
    layers = [layer_tar(FILES), layer_tar({"data/big.bin": 3_000_000})]

    # When they are pushed as an image
    image = push_image(
        registry.url,
        repo,
        "v1.0",
        layers,
        compression=compression,
        media=media,  # type: ignore[arg-type]
        platform=("linux", "arm64", "v8"),
    )

    # Then the registry serves the manifest under the tag with the computed digest
    answer = fetch_manifest(registry.url, repo, "v1.0")
    assert answer.status == 200
    assert answer.headers["content-type"] == manifest_type
    assert answer.headers["docker-content-digest"] == image.manifest_digest
    assert answer.body == image.manifest
    manifest = answer.json()
    assert [layer["mediaType"] for layer in manifest["layers"]] == [layer_type] * 2
    assert image.reference == f"{registry.address}/{repo}:v1.0"
    # and the config is the image ID's preimage, listing the uncompressed digests
    config = fetch_blob(registry.url, repo, manifest["config"]["digest"])
    assert config == image.config
    assert image.image_id == sha256(config) == manifest["config"]["digest"]
    document = json.loads(config)
    assert (document["os"], document["architecture"], document["variant"]) == (
        "linux",
        "arm64",
        "v8",
    )
    assert document["rootfs"] == {"type": "layers", "diff_ids": [sha256(t) for t in layers]}
    # and every layer blob decompresses to its tar
    for tar, digest, size in zip(layers, image.layer_digests, image.layer_sizes, strict=True):
        blob = fetch_blob(registry.url, repo, digest)
        assert len(blob) == size
        assert decompress(blob, compression) == tar


def test_push_image_from_tar_files_and_prepared_blobs(registry: Registry, tmp_path: Path) -> None:
    repo = unique_repo()
    tar_file = tmp_path / "layer0.tar"
    write_layer_tar(tar_file, {"a/file.bin": 2_000_000})
    prepared = write_layer_blob(tmp_path / "layer1.zst", {"b/file.bin": 1_000_000}, "zstd")

    image = push_image(
        registry.url, repo, None, [tar_file, prepared], compression="gzip", media="oci"
    )

    assert image.tag is None
    assert image.reference == f"{registry.address}/{repo}@{image.manifest_digest}"
    assert fetch_manifest(registry.url, repo, image.manifest_digest).status == 200
    assert image.layer_media_types == (
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
    )
    assert image.diff_ids[0] == sha256(tar_file.read_bytes())


def test_push_blob_streams_a_file_in_patch_chunks(registry: Registry, tmp_path: Path) -> None:
    repo = unique_repo()
    path = tmp_path / "blob.bin"
    write_mixed(path, 3 * (1 << 20) + 123)
    expected = sha256(path.read_bytes())

    digest = push_blob(registry.url, repo, path, chunk_size=1 << 20)

    assert digest == expected
    assert fetch_blob(registry.url, repo, digest) == path.read_bytes()
    # pushing it again is a no-op (HEAD says it exists)
    assert push_blob(registry.url, repo, path, digest=digest) == digest


def test_push_blob_refuses_a_wrong_digest(registry: Registry) -> None:
    with pytest.raises(RegistryError) as refused:
        push_blob(registry.url, unique_repo(), b"content", digest=sha256(b"other"))

    assert refused.value.status == 400
    assert b"DIGEST_INVALID" in refused.value.body


@pytest.mark.parametrize(
    ("media", "index_type"),
    [
        pytest.param("oci", OCI_INDEX, id="oci-index"),
        pytest.param("docker", DOCKER_MANIFEST_LIST, id="docker-manifest-list"),
    ],
)
def test_push_index_over_pushed_platform_images(
    registry: Registry, media: str, index_type: str
) -> None:
    repo = unique_repo()
    amd64 = push_image(registry.url, repo, None, [layer_tar({"arch": b"amd64\n"})], media=media)  # type: ignore[arg-type]
    arm64 = push_image(
        registry.url,
        repo,
        None,
        [layer_tar({"arch": b"arm64\n"})],
        media=media,  # type: ignore[arg-type]
        platform=("linux", "arm64", "v8"),
    )

    digest = push_index(
        registry.url,
        repo,
        "multi",
        [(amd64, ("linux", "amd64")), (arm64, ("linux", "arm64", "v8"))],
        media=media,  # type: ignore[arg-type]
    )

    answer = fetch_manifest(registry.url, repo, "multi")
    assert answer.status == 200
    assert answer.headers["content-type"] == index_type
    assert answer.headers["docker-content-digest"] == digest
    entries = answer.json()["manifests"]
    assert [(e["digest"], e["platform"]) for e in entries] == [
        (amd64.manifest_digest, {"os": "linux", "architecture": "amd64"}),
        (arm64.manifest_digest, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
    ]


# --- what distribution 2.8 accepts and refuses ----------------------------------------


def _with_foreign_layer(manifest: bytes, urls: list[str] | None) -> bytes:
    document = json.loads(manifest)
    foreign = {"mediaType": DOCKER_FOREIGN_LAYER, "digest": "sha256:" + "1" * 64, "size": 1234}
    if urls is not None:
        foreign["urls"] = urls
    document["layers"].insert(0, foreign)
    return json.dumps(document).encode()


def test_default_registry_refuses_foreign_layers(registry: Registry) -> None:
    # Given an image, and a manifest that adds a foreign layer with a URL
    repo = unique_repo()
    image = push_image(registry.url, repo, "base", [layer_tar(FILES)])
    body = _with_foreign_layer(image.manifest, ["https://example.invalid/layer.tar.gz"])

    # When it is pushed to a registry without validation.manifests.urls.allow
    answer = put_raw_manifest(registry.url, repo, "foreign", body, DOCKER_MANIFEST)

    # Then distribution refuses it: "If allow is unset, pushing a manifest containing
    # URLs fails" (with a 500 and MANIFEST_BLOB_UNKNOWN for the foreign digest)
    assert answer.status == 500
    assert b"MANIFEST_BLOB_UNKNOWN" in answer.body


def test_registry_allowing_urls_accepts_foreign_layers(
    foreign_registry: ConfiguredRegistry,
) -> None:
    repo = unique_repo()
    image = push_image(foreign_registry.url, repo, "base", [layer_tar(FILES)])
    with_url = _with_foreign_layer(image.manifest, ["https://example.invalid/layer.tar.gz"])
    without_url = _with_foreign_layer(image.manifest, None)

    accepted = put_raw_manifest(foreign_registry.url, repo, "foreign", with_url, DOCKER_MANIFEST)
    refused = put_raw_manifest(foreign_registry.url, repo, "no-url", without_url, DOCKER_MANIFEST)

    assert accepted.status == 201
    served = fetch_manifest(foreign_registry.url, repo, "foreign")
    assert served.json()["layers"][0]["urls"] == ["https://example.invalid/layer.tar.gz"]
    assert refused.status == 500  # a foreign layer needs urls


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        pytest.param("missing-layer", 400, b"MANIFEST_BLOB_UNKNOWN", id="missing-layer"),
        pytest.param("odd-layer-type", 201, b"", id="odd-layer-type-accepted"),
        pytest.param("oci-content-type", 400, b"MANIFEST_INVALID", id="docker-body-as-oci"),
        pytest.param("index-missing-entry", 400, b"MANIFEST_BLOB_UNKNOWN", id="index-dangling"),
    ],
)
def test_registry_validation_of_raw_manifests(
    registry: Registry, change: str, status: int, code: bytes
) -> None:
    repo = unique_repo()
    image = push_image(registry.url, repo, "base", [layer_tar(FILES)])
    document = json.loads(image.manifest)
    media_type = DOCKER_MANIFEST
    if change == "missing-layer":
        document["layers"][0]["digest"] = "sha256:" + "2" * 64
    elif change == "odd-layer-type":
        document["layers"][0]["mediaType"] = "application/x-not-a-layer"
    elif change == "oci-content-type":
        media_type = OCI_MANIFEST
    else:
        media_type = OCI_INDEX
        document = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": "sha256:" + "0" * 64,
                    "size": 10,
                    "platform": {"os": "linux", "architecture": "amd64"},
                }
            ],
        }

    answer = put_raw_manifest(registry.url, repo, "t", json.dumps(document).encode(), media_type)

    assert answer.status == status, answer.body
    assert code in answer.body


# --- the real engine pulls Python-built images ----------------------------------------


def test_docker_pulls_python_built_images_with_the_computed_id(
    docker_engine: DockerEngine, registry: Registry
) -> None:
    # Given a Docker-media image, an OCI one (mixed gzip and uncompressed layers) and an
    # OCI index over an amd64 and an arm64 image (the engine is linux/amd64); no layer is
    # shared, so each pull downloads its own (the image ID depends only on the config:
    # the same tars under other media types or compressions give the same ID)
    repo = unique_repo("pull")
    layers = [layer_tar(FILES), layer_tar({"data/blob.bin": 500_000})]
    docker_image = push_image(registry.url, repo, "docker", layers)
    oci_layers = [layer_tar({"oci/a.bin": 300_000}), layer_tar({"oci/b.txt": b"b\n"})]
    oci_image = push_image(
        registry.url, repo, "oci", oci_layers, compression=["gzip", "none"], media="oci"
    )
    arm64 = push_image(
        registry.url,
        repo,
        None,
        [layer_tar({"arch": b"arm64"})],
        media="oci",
        platform=("linux", "arm64", "v8"),
    )
    push_index(
        registry.url,
        repo,
        "multi",
        [(arm64, ("linux", "arm64", "v8")), (oci_image, ("linux", "amd64"))],
    )
    references = {
        docker_image.reference: docker_image.image_id,
        oci_image.reference: oci_image.image_id,
        f"{registry.address}/{repo}:multi": oci_image.image_id,
        docker_image.digest_reference: docker_image.image_id,
    }
    try:
        for reference, image_id in references.items():
            # When the engine pulls it
            docker_engine.docker("pull", "--quiet", reference)
            # Then the image ID is the config digest computed in Python
            pulled = docker_engine.docker("image", "inspect", "--format", "{{.Id}}", reference)
            assert pulled.stdout.strip() == image_id, reference
    finally:
        docker_engine.forget(*references)


# --- the token-auth registry ----------------------------------------------------------


def test_token_registry_push_and_pull_with_credentials(token_registry: TokenAuthRegistry) -> None:
    # Given the token dance done with the account's credentials
    repo = unique_repo("private")
    token_registry.tokens.clear()
    push_headers = token_registry.auth_headers(repo, ("pull", "push"))
    assert push_headers["Authorization"].startswith("Bearer ")

    # When an image is pushed and its manifest pulled with Bearer tokens
    image = push_image(token_registry.url, repo, "1", [layer_tar(FILES)], headers=push_headers)
    answer = fetch_manifest(token_registry.url, repo, "1", token_registry.auth_headers(repo))

    # Then both work, and the token server saw Basic credentials and the scopes asked
    assert answer.status == 200
    assert answer.headers["docker-content-digest"] == image.manifest_digest
    recorded = token_registry.tokens.recorded()
    assert [(r.username, r.scopes, r.status) for r in recorded] == [
        ("dcu", (f"repository:{repo}:pull,push",), 200),
        ("dcu", (f"repository:{repo}:pull",), 200),
    ]
    assert all(r.authorization and r.authorization.startswith("Basic ") for r in recorded)
    assert recorded[0].service == token_registry.service
    assert recorded[0].access == (
        {"type": "repository", "name": repo, "actions": ["pull", "push"]},
    )
    assert repo in token_registry.catalog()


def test_token_registry_refuses_anonymous_and_wrong_credentials(
    token_registry: TokenAuthRegistry,
) -> None:
    repo = unique_repo("private")
    push_image(
        token_registry.url,
        repo,
        "1",
        [layer_tar(FILES)],
        headers=token_registry.auth_headers(repo, ("pull", "push")),
    )
    token_registry.tokens.clear()

    no_token = fetch_manifest(token_registry.url, repo, "1")
    anonymous_headers = auth_headers(token_registry.url, repo)
    anonymous = fetch_manifest(token_registry.url, repo, "1", anonymous_headers)
    with pytest.raises(RegistryError) as wrong_password:
        auth_headers(token_registry.url, repo, username="dcu", password="wrong")

    # The registry challenges a request without a token, with the realm and scope
    assert no_token.status == 401
    challenge = no_token.headers["www-authenticate"]
    assert challenge.startswith(f'Bearer realm="{token_registry.tokens.realm}"')
    assert f'scope="repository:{repo}:pull"' in challenge
    # Docker Hub style: anonymous gets a token, with empty access, which the registry refuses
    assert anonymous.status == 401
    assert 'error="insufficient_scope"' in anonymous.headers["www-authenticate"]
    assert wrong_password.value.status == 401
    recorded = token_registry.tokens.recorded()
    assert [(r.username, r.authorization is None, r.status, r.access) for r in recorded] == [
        (None, True, 200, ()),
        ("dcu", False, 401, ()),
    ]


def test_token_registry_public_repositories_and_injected_failures(
    token_registry: TokenAuthRegistry,
) -> None:
    repo = unique_repo("public")
    push_image(
        token_registry.url,
        repo,
        "1",
        [layer_tar(FILES)],
        headers=token_registry.auth_headers(repo, ("pull", "push")),
    )
    tokens = token_registry.tokens
    tokens.public_repositories = frozenset({repo})
    try:
        pull = fetch_manifest(token_registry.url, repo, "1", auth_headers(token_registry.url, repo))
        push_headers = auth_headers(token_registry.url, repo, ("pull", "push"))
        tokens.fail_next = 1
        with pytest.raises(RegistryError) as unavailable:
            token_registry.auth_headers(repo)
        recovered = token_registry.auth_headers(repo)
    finally:
        tokens.public_repositories = frozenset()
        tokens.fail_next = 0

    assert pull.status == 200
    with pytest.raises(RegistryError) as refused:
        push_image(token_registry.url, repo, "2", [layer_tar({"x": b"y"})], headers=push_headers)
    assert refused.value.status == 401
    assert unavailable.value.status == 503
    assert recovered["Authorization"].startswith("Bearer ")


def test_docker_engine_logs_in_and_pulls_from_the_token_registry(
    docker_engine: DockerEngine, token_registry: TokenAuthRegistry
) -> None:
    # Given an image in the private registry
    repo = unique_repo("engine")
    image = push_image(
        token_registry.url,
        repo,
        "1",
        [layer_tar(FILES)],
        headers=token_registry.auth_headers(repo, ("pull", "push")),
    )
    anonymous = docker_engine.docker("pull", "--quiet", image.reference, check=False)
    assert anonymous.returncode != 0  # no credentials: refused
    token_registry.tokens.clear()
    try:
        # When the real client logs in and pulls
        docker_engine.docker(
            "login",
            "--username",
            token_registry.username,
            "--password",
            token_registry.password,
            token_registry.address,
        )
        docker_engine.docker("pull", "--quiet", image.reference)
        pulled = docker_engine.docker("image", "inspect", "--format", "{{.Id}}", image.reference)

        # Then the token server issued its tokens and the image ID is the computed one
        assert pulled.stdout.strip() == image.image_id
        pulls = [
            r
            for r in token_registry.tokens.recorded()
            if f"repository:{repo}:pull" in r.scopes and r.status == 200
        ]
        assert pulls and all(r.username == token_registry.username for r in pulls)
    finally:
        docker_engine.docker("logout", token_registry.address, check=False)
        docker_engine.forget(image.reference)


def test_layer_blob_dataclass_needs_data_or_path(registry: Registry) -> None:
    orphan = LayerBlob("gzip", sha256(b"a"), sha256(b"b"), 1)

    with pytest.raises(ValueError, match="data or a path"):
        push_blob(registry.url, unique_repo(), orphan)

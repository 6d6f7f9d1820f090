"""The project's Dockerfile, built and run by a real Docker engine, completes tasks.

What runs as Docker runs it: a private engine (Debian's dockerd 20.10 with containerd and
runc, no bridge, no iptables, like the session's ``docker_engine``, but on ``overlay2``
where the session's uses ``vfs``, which made the build ten times slower) builds the
repository's ``Dockerfile`` unchanged with the classic builder
(``docker build --network host``: its ``RUN`` steps run, ``pip`` installs from the
package index), and ``docker run`` starts containers of the image with the image's own
entrypoint, command, user (10001), working directory, environment and HEALTHCHECK. The
archives the containers make are proven by ``docker load`` into the session's engine.

What stands in for something else, and why:

* ``FROM python:3.11-slim`` cannot be pulled here. The engine holds a stand-in under that
  name: Debian bookworm from ``debootstrap --variant=minbase`` with Python 3.11, venv and
  CA certificates, made by ``docker import`` (tests/servers/base_image.py). The real image
  is also Debian bookworm with CPython 3.11, but its Python is built from source under
  ``/usr/local``; the stand-in's is Debian's under ``/usr``.
* The Compose network: containers use ``--network host`` (the engine has no bridge), so
  the roles reach the test's NATS, PostgreSQL, S3 (moto instead of MinIO) and registry on
  127.0.0.1. The service names in the Compose file's URLs (``nats:4222``,
  ``postgres:5432``, ``minio:9000``) are replaced by those addresses; the gateway listens
  on 127.0.0.1 at a free port instead of being published as ``127.0.0.1:8090:8090``.
* ``docker compose up`` itself is not run (no bridge network for a Compose project, and
  no MinIO, NATS or PostgreSQL image to pull): each DCU service of ``docker-compose
  config``'s output becomes one ``docker run`` per replica with that service's
  ``command``, ``environment``, volumes (the ``work`` volume, the engine's socket),
  ``group_add``, healthcheck setting and stop grace period. ``restart`` is left out so
  that a crash fails the test; the healthcheck runs every second instead of every 30 s.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.helpers import fetch_object, load_and_get_id, sha256_of, tar_members
from tests.polling import wait_until
from tests.servers.base import free_port
from tests.servers.base_image import (
    BASE_IMAGE,
    Container,
    ImageConfig,
    ImageEngine,
    RunSpec,
    build_image,
    containers,
    import_base_image,
    run_container,
    stand_in_rootfs,
    wait_healthy,
)
from tests.servers.dcu_process import http_json
from tests.servers.docker_engine import DockerEngine
from tests.servers.images import PushedImages
from tests.servers.nats import NatsServer
from tests.servers.s3 import S3Server
from tests.test_deployment import (
    DOCKER_SOCKET,
    ROLES,
    _compose_command,
    _healthcheck_disabled,
    _mounts,
    _project,
    _replicas,
    _run_config,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
TOKEN = f"dcu-image-test-{secrets.token_hex(16)}"
USERNAME = "jenkins"
# The Compose file's URLs name services on the Compose network; here they are the test's.
NETWORK_KEYS = ("DCU_NATS_URL", "DCU_DATABASE_URL", "DCU_MINIO_ENDPOINT")


@dataclass
class BuiltImage:
    name: str
    config: ImageConfig
    base_id: str
    layers: list[str]
    base_layers: list[str]
    timings: dict[str, float]


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageEngine]:
    """The engine that builds and runs the image (overlay2; the session's is vfs)."""
    engine = ImageEngine(tmp_path_factory.mktemp("image-dockerd"))
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def compose_services(
    image_engine: ImageEngine, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """``docker-compose config`` of the repository's file, with this test's variables."""
    project = _project(tmp_path_factory.mktemp("compose-run"))
    variables = {
        "MINIO_ROOT_USER": s3_server.access_key,
        "MINIO_ROOT_PASSWORD": s3_server.secret_key,
        "POSTGRES_PASSWORD": "unused-the-test-database-trusts-loopback",
        "DOCKER_GID": str(image_engine.socket_path.stat().st_gid),
        "DCU_AUTH_TOKENS": json.dumps({USERNAME: TOKEN}),
    }
    result = _run_config(_compose_command(), project, variables)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert isinstance(services, dict)
    return services


@pytest.fixture(scope="module")
def image(
    image_engine: ImageEngine,
    compose_services: dict[str, dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> BuiltImage:
    """The Dockerfile built on the stand-in base, tagged as the Compose file names it."""
    (name,) = {compose_services[role]["image"] for role in ROLES}
    timings: dict[str, float] = {}
    rootfs = stand_in_rootfs()
    timings["debootstrap (cold)" if rootfs.built else "stand-in tarball (cached)"] = rootfs.seconds

    started = time.monotonic()
    base_id = import_base_image(image_engine, rootfs.path)
    timings["docker import"] = time.monotonic() - started

    started = time.monotonic()
    log = tmp_path_factory.mktemp("build") / "docker-build.log"
    config = build_image(image_engine, ROOT, name, log)
    timings["docker build"] = time.monotonic() - started
    print(
        f"image {name} on {image_engine.storage_driver}: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    )

    def layers(reference: str) -> list[str]:
        out = image_engine.docker(
            "image", "inspect", "--format", "{{json .RootFS.Layers}}", reference
        )
        found = json.loads(out.stdout)
        assert isinstance(found, list)
        return [str(layer) for layer in found]

    return BuiltImage(name, config, base_id, layers(name), layers(BASE_IMAGE), timings)


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def volumes(image_engine: ImageEngine, tag: str) -> Iterator[dict[str, str]]:
    """Compose's named volumes, one engine volume per name for this test, removed after."""
    made: dict[str, str] = {}

    class Volumes(dict[str, str]):
        def __missing__(self, key: str) -> str:
            name = f"dcu-{key}-{tag}"
            image_engine.docker("volume", "create", name)
            made[key] = self[key] = name
            return name

    try:
        yield Volumes()
    finally:
        for name in made.values():
            image_engine.docker("volume", "rm", "--force", name, check=False)


# --- helpers ---------------------------------------------------------------------------------


def request(
    port: int, method: str, path: str, body: Any = None, token: str | None = None
) -> tuple[int, Any]:
    return http_json(method, f"http://127.0.0.1:{port}/api/dcu{path}", body, token=token)


def isolation_env(nats: NatsServer, s3: S3Server, tag: str) -> dict[str, str]:
    """The session's NATS and S3 are shared: streams, subjects and bucket of this test."""
    return {
        "DCU_NATS_URL": nats.url,
        "DCU_NATS_STREAM": f"IMG_{tag}",
        "DCU_NATS_SUBJECT_PREFIX": f"img{tag}",
        "DCU_MINIO_ENDPOINT": s3.endpoint,
        "DCU_MINIO_BUCKET": f"dcu-img-{tag}",
    }


def run_task(
    port: int, reference: str, describe: Callable[[], str], timeout: float = 240
) -> tuple[str, dict[str, Any]]:
    """POST /start with the token, then GET /status until the task is terminal."""
    status, body = request(port, "POST", "/start", {"docker_image_name": reference}, TOKEN)
    assert status == 200, body
    task_id = str(body["data"]["task_id"])

    def state() -> dict[str, Any]:
        code, found = request(port, "GET", f"/status/{task_id}")
        assert code == 200, found
        return dict(found["data"])

    data = wait_until(
        state,
        until=lambda d: d["state"] in {"completed", "failed"},
        timeout=timeout,
        what=f"task {task_id} to finish",
        interval=0.5,
        describe=describe,
    )
    return task_id, data


def assert_archive_is_the_image(
    data: dict[str, Any],
    *,
    bucket: str,
    s3: S3Server,
    engine: DockerEngine,
    source_id: str,
    dest: Path,
) -> None:
    """The object in S3 is the task's archive, and ``docker load`` of it is the source."""
    fetch_object(s3, bucket, data["minio_object_name"], dest)
    assert sha256_of(dest) == data["archive_sha256"]
    assert "manifest.json" in tar_members(dest)
    assert load_and_get_id(engine, dest, [source_id]) == source_id


def image_uid(config: ImageConfig) -> int:
    return int(config.user.split(":")[0])


def grace_seconds(value: Any, default: int = 10) -> int:
    """Compose's ``stop_grace_period`` (``45s``, ``1m30s``) in whole seconds."""
    if value is None:
        return default
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)([hms])", str(value))
    assert parts, f"unreadable stop_grace_period {value!r}"
    return sum(int(n) * units[u] for n, u in parts)


def describe_all(started: list[Container]) -> str:
    return "\n".join(f"=== {c.name}\n{c.logs(80)}" for c in started)


# --- the image -------------------------------------------------------------------------------


def test_the_dockerfile_builds_on_the_base_it_names(image: BuiltImage) -> None:
    # The FROM lines resolved to the engine's python:3.11-slim: the image starts with its layer
    assert image.base_layers and image.layers[: len(image.base_layers)] == image.base_layers
    assert len(image.layers) > len(image.base_layers)
    config = image.config
    # and the runtime stage's settings are in the image the engine made
    assert config.entrypoint == ["dcu"]
    assert config.cmd == ["serve"]
    assert config.user == "10001:10001"
    assert config.working_dir == "/app"
    assert config.env["PATH"].split(":")[0] == "/opt/venv/bin"
    assert "/usr/bin" in config.env["PATH"].split(":")  # the base's PATH survived
    assert config.env["DCU_AUTH_ENABLED"] == "true"
    assert config.healthcheck[:3] == ["CMD", "python", "-c"]


def test_the_default_command_completes_a_task(
    image: BuiltImage,
    image_engine: ImageEngine,
    docker_engine: DockerEngine,
    nats_server: NatsServer,
    s3_server: S3Server,
    pushed_images: PushedImages,
    volumes: dict[str, str],
    tag: str,
    tmp_path: Path,
) -> None:
    source = pushed_images["small"]
    port = free_port()
    env = {
        **isolation_env(nats_server, s3_server, tag),
        "DCU_MINIO_ACCESS_KEY": s3_server.access_key,
        "DCU_MINIO_SECRET_KEY": s3_server.secret_key,
        "DCU_AUTH_TOKENS": json.dumps({USERNAME: TOKEN}),
        # The host's network: listen on loopback only, at a port of the test's.
        "DCU_SERVER_HOST": "127.0.0.1",
        "DCU_SERVER_PORT": str(port),
    }
    with containers(image_engine) as started:
        # Given the image run with no command, as docs/deployment.md runs it
        spec = RunSpec(
            name=f"dcu-serve-{tag}", env=env, volumes=[f"{volumes['data']}:/var/lib/dcu"]
        )
        serve = run_container(image_engine, image.name, spec, tmp_path / "env")
        started.append(serve)
        inspected = serve.inspect()
        assert inspected["Path"] == "dcu" and inspected["Args"] == ["serve"]
        # When the engine's HEALTHCHECK (the image's own command) passes
        wait_healthy(serve)
        assert request(port, "GET", "/health")[0] == 200
        # Then `dcu serve` runs as the image's unprivileged user
        uid = image_uid(image.config)
        assert uid != 0 and serve.pid_uids() == (uid, uid)
        # and the image's auth setting holds: no token, no task
        status, body = request(port, "POST", "/start", {"docker_image_name": source.reference})
        assert status == 401, body

        task_id, data = run_task(port, source.reference, serve.logs)
        assert data["state"] == "completed", (data, serve.logs())
        assert data["username"] == USERNAME
        # the archive was written where the image's environment says, on the volume
        gzip_path = image.config.env["DCU_STORAGE_GZIP_PATH"]
        assert data["gzip_file_name"].startswith(f"{gzip_path}/{task_id}/")
        assert_archive_is_the_image(
            data,
            bucket=env["DCU_MINIO_BUCKET"],
            s3=s3_server,
            engine=docker_engine,
            source_id=source.image_id,
            dest=tmp_path / "archive.tar.gz",
        )
        assert serve.running(), serve.logs()


def test_the_compose_roles_complete_a_task(
    image: BuiltImage,
    compose_services: dict[str, dict[str, Any]],
    image_engine: ImageEngine,
    docker_engine: DockerEngine,
    nats_server: NatsServer,
    s3_server: S3Server,
    postgres_database: str,
    pushed_images: PushedImages,
    volumes: dict[str, str],
    tag: str,
    tmp_path: Path,
) -> None:
    source = pushed_images["small"]
    roles = {name: svc for name, svc in compose_services.items() if "build" in svc}
    assert set(roles) == set(ROLES)
    gateway_port = free_port()
    test_env = {**isolation_env(nats_server, s3_server, tag), "DCU_DATABASE_URL": postgres_database}

    specs: list[RunSpec] = []
    for role, service in roles.items():
        env = {
            key: "" if value is None else str(value)
            for key, value in service["environment"].items()
        }
        for key in NETWORK_KEYS:
            assert key in env, (role, key)  # only what the Compose file sets is replaced
        env.update(test_env)
        if role == "gateway":
            env.update({"DCU_SERVER_HOST": "127.0.0.1", "DCU_SERVER_PORT": str(gateway_port)})
        mounts = []
        for mount in _mounts(service):
            if mount.type == "volume":
                mounts.append(f"{volumes[mount.source]}:{mount.target}")
            elif mount.source == DOCKER_SOCKET:
                mounts.append(f"{image_engine.socket_path}:{mount.target}")
            else:
                pytest.fail(f"{role}: no stand-in for the mount {mount}")
        for replica in range(1, (_replicas(service) or 1) + 1):
            specs.append(
                RunSpec(
                    name=f"dcu-{role}-{replica}-{tag}",
                    command=[str(part) for part in service["command"]],
                    env=env,
                    volumes=mounts,
                    group_add=[str(group) for group in service.get("group_add", [])],
                    healthcheck=not _healthcheck_disabled(service),
                    stop_timeout=grace_seconds(service.get("stop_grace_period")),
                )
            )
    assert len(specs) == len(ROLES) + 1  # compress runs two replicas

    with containers(image_engine) as started:
        # Given every DCU service of the Compose file started from the image, as Compose would
        def start(spec: RunSpec) -> Container:
            container = run_container(image_engine, image.name, spec, tmp_path / "env")
            started.append(container)
            return container

        with ThreadPoolExecutor(max_workers=4) as pool:
            running = dict(zip([s.name for s in specs], pool.map(start, specs), strict=True))
        gateway = running[f"dcu-gateway-1-{tag}"]
        wait_healthy(gateway)
        for spec in specs:
            container = running[spec.name]
            assert container.inspect()["Args"] == list(spec.command), spec.name
            assert (container.health() == "") is (not spec.healthcheck), spec.name

        # When a caller starts a task at the gateway
        task_id, data = run_task(gateway_port, source.reference, lambda: describe_all(started))

        # Then the roles, each in its own container, carried it through
        assert data["state"] == "completed", (data, describe_all(started))
        assert data["username"] == USERNAME
        assert data["gzip_file_name"].startswith(f"/var/lib/dcu/gzip/{task_id}/")
        assert_archive_is_the_image(
            data,
            bucket=test_env["DCU_MINIO_BUCKET"],
            s3=s3_server,
            engine=docker_engine,
            source_id=source.image_id,
            dest=tmp_path / "archive.tar.gz",
        )
        uid = image_uid(image.config)
        for container in started:
            assert container.running(), f"{container.name} stopped:\n{container.logs()}"
            assert container.pid_uids() == (uid, uid), container.name
        # the download role (only it) got the engine's socket and its group, as Compose gives
        download = running[f"dcu-download-1-{tag}"]
        socket_gid = str(image_engine.socket_path.stat().st_gid)
        assert socket_gid in download.inspect()["HostConfig"]["GroupAdd"]


def test_a_cached_stand_in_is_reused() -> None:
    """The second call finds the tarball the first made (or found): no debootstrap."""
    first = stand_in_rootfs()
    again = stand_in_rootfs()
    assert not again.built and again.path == first.path and again.path.stat().st_size > 50 << 20

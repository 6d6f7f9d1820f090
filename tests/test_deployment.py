"""The deployment files: docker-compose.yml through a real Compose parser, the Dockerfile by scan.

``docker-compose config`` (Debian's ``docker-compose`` package, installed by scripts/test)
validates the file against the Compose schema, interpolates the variables and prints the
resolved model, which the tests then check. Nothing is built, pulled or started. The
parser missing is a failure, never a skip.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# The variables docker-compose.yml requires (``${VAR:?...}``); none has a default.
REQUIRED_ENV = {
    "MINIO_ROOT_USER": "dcu-test-user",
    "MINIO_ROOT_PASSWORD": "dcu-test-minio-secret",
    "POSTGRES_PASSWORD": "dcu-test-pg-secret",
    "DOCKER_GID": "4242",
    "DCU_AUTH_TOKENS": '{"jenkins": "dcu-test-api-token-0123456789"}',
}
ROLES: dict[str, list[str]] = {
    "gateway": ["gateway"],
    "persist": ["persist"],
    "download": ["worker", "download"],
    "compress": ["worker", "compress"],
    "upload": ["worker", "upload"],
    "cleanup": ["worker", "cleanup"],
    "timer": ["timer"],
}
INFRASTRUCTURE = {"nats", "minio", "postgres"}
# The roles that hand files to each other through storage.work_path / storage.gzip_path.
FILE_STAGES = ("download", "compress", "upload")
DOCKER_SOCKET = "/var/run/docker.sock"
GATEWAY_PORT = 8090
COMPOSE_TIMEOUT = 60


# --- running the Compose parser ------------------------------------------------------------


def _compose_command() -> list[str]:
    """Debian's ``docker-compose`` (v1 on bookworm, v2 on later releases), else the plugin."""
    binary = shutil.which("docker-compose")
    if binary is not None:
        return [binary]
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    pytest.fail(
        "no Compose implementation found: install Debian's docker-compose package "
        "(scripts/test does: apt-get install docker-compose)",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def compose() -> list[str]:
    return _compose_command()


def _project(directory: Path, compose_text: str | None = None) -> Path:
    """A copy of the deployment files in ``directory``, away from any developer's ``.env``."""
    directory.mkdir(parents=True, exist_ok=True)
    for source in (DOCKERFILE, DOCKERIGNORE):
        shutil.copy(source, directory / source.name)
    target = directory / "docker-compose.yml"
    target.write_text(COMPOSE_FILE.read_text() if compose_text is None else compose_text)
    return target


def _run_config(
    compose: list[str], compose_file: Path, env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    clean_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(compose_file.parent),
        "COMPOSE_PROJECT_NAME": "dcu",
        # `config` needs no engine; an unreachable one proves it.
        "DOCKER_HOST": f"unix://{compose_file.parent}/no-engine.sock",
        **env,
    }
    return subprocess.run(
        [*compose, "-f", str(compose_file), "config", *extra],
        cwd=compose_file.parent,
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=COMPOSE_TIMEOUT,
        check=False,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _project(tmp_path_factory.mktemp("compose"))


@pytest.fixture(scope="module")
def model(compose: list[str], project: Path) -> dict[str, Any]:
    result = _run_config(compose, project, REQUIRED_ENV)
    assert result.returncode == 0, f"{compose} config failed:\n{result.stderr}"
    resolved = yaml.safe_load(result.stdout)
    assert isinstance(resolved, dict)
    return resolved


@pytest.fixture(scope="module")
def services(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = model["services"]
    assert isinstance(found, dict)
    return found


# --- normalising v1 (short) and v2 (long) forms ----------------------------------------------


@dataclass(frozen=True)
class Mount:
    type: str  # "volume" (named) or "bind"
    source: str
    target: str


@dataclass(frozen=True)
class Port:
    host_ip: str
    published: str
    target: int


def _mounts(service: dict[str, Any]) -> list[Mount]:
    mounts = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target, *_ = entry.split(":")
            kind = "bind" if source.startswith(("/", ".")) else "volume"
            mounts.append(Mount(kind, source, target))
        else:
            mounts.append(Mount(entry["type"], str(entry.get("source", "")), entry["target"]))
    return mounts


def _ports(service: dict[str, Any]) -> list[Port]:
    ports = []
    for entry in service.get("ports", []):
        if isinstance(entry, str):
            parts = entry.split("/")[0].split(":")  # [[HOST_IP:]PUBLISHED:]TARGET
            published = parts[-2] if len(parts) >= 2 else ""
            ports.append(Port(":".join(parts[:-2]), published, int(parts[-1])))
        else:
            ports.append(
                Port(
                    str(entry.get("host_ip", "")),
                    str(entry.get("published", "")),
                    int(entry["target"]),
                )
            )
    return ports


def _healthcheck_disabled(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck") or {}
    return bool(check.get("disable")) or check.get("test") in (["NONE"], "NONE")


def _replicas(service: dict[str, Any]) -> int | None:
    replicas = (service.get("deploy") or {}).get("replicas", service.get("scale"))
    return None if replicas is None else int(replicas)


# --- the resolved compose model --------------------------------------------------------------


def test_config_quiet_accepts_the_file(compose: list[str], project: Path) -> None:
    result = _run_config(compose, project, REQUIRED_ENV, "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_every_role_runs_its_command_from_one_image(
    services: dict[str, dict[str, Any]], project: Path
) -> None:
    assert set(services) == set(ROLES) | INFRASTRUCTURE
    images = set()
    for role, command in ROLES.items():
        service = services[role]
        assert service["command"] == command, role
        build = service["build"]
        context = build["context"] if isinstance(build, dict) else build
        assert Path(context).resolve() == project.parent.resolve(), role
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile", role
        images.add(service["image"])
    assert images == {"dcu:latest"}
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name


def test_every_command_is_accepted_by_the_dcu_cli(services: dict[str, dict[str, Any]]) -> None:
    from dcu.cli import build_parser

    parser = build_parser()
    for role in ROLES:
        try:
            parser.parse_args(services[role]["command"])
        except SystemExit:
            pytest.fail(f"dcu rejects the {role} command {services[role]['command']}")


def test_roles_share_the_dcu_environment(services: dict[str, dict[str, Any]]) -> None:
    expected = {
        "DCU_NATS_URL": "nats://nats:4222",
        "DCU_DATABASE_URL": (
            f"postgres://dcu:{REQUIRED_ENV['POSTGRES_PASSWORD']}@postgres:5432/dcu"
        ),
        "DCU_MINIO_ENDPOINT": "minio:9000",
        "DCU_MINIO_ACCESS_KEY": REQUIRED_ENV["MINIO_ROOT_USER"],
        "DCU_MINIO_SECRET_KEY": REQUIRED_ENV["MINIO_ROOT_PASSWORD"],
        "DCU_AUTH_ENABLED": "true",
        "DCU_AUTH_TOKENS": REQUIRED_ENV["DCU_AUTH_TOKENS"],
    }
    environments = {role: services[role]["environment"] for role in ROLES}
    for role, environment in environments.items():
        assert environment.items() >= expected.items(), role
    # One shared set (the x-dcu-env anchor): download only adds the engine socket.
    common = dict(environments["gateway"])
    for role, environment in environments.items():
        extra = {k: v for k, v in environment.items() if k not in common}
        assert extra == (
            {"DCU_DOCKER_HOST": f"unix://{DOCKER_SOCKET}"} if role == "download" else {}
        )
        assert {k: environment[k] for k in common} == common, role


def test_only_download_mounts_the_docker_socket(services: dict[str, dict[str, Any]]) -> None:
    with_socket = {
        name
        for name, service in services.items()
        if any("docker.sock" in m.source or "docker.sock" in m.target for m in _mounts(service))
    }
    assert with_socket == {"download"}
    download = services["download"]
    assert Mount("bind", DOCKER_SOCKET, DOCKER_SOCKET) in _mounts(download)
    assert [str(g) for g in download["group_add"]] == [REQUIRED_ENV["DOCKER_GID"]]
    for name, service in services.items():
        assert not service.get("privileged"), name
        assert service.get("network_mode") != "host", name
        assert "group_add" not in service or name == "download", name


def test_the_work_volume_is_shared_by_the_file_stages(
    model: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    assert "work" in model["volumes"]
    targets = set()
    for role in (*FILE_STAGES, "cleanup"):
        work = [m for m in _mounts(services[role]) if m.source == "work"]
        assert len(work) == 1, role
        assert work[0].type == "volume", role
        targets.add(work[0].target)
    assert len(targets) == 1
    (target,) = targets
    for role in FILE_STAGES:
        environment = services[role]["environment"]
        for key in ("DCU_STORAGE_WORK_PATH", "DCU_STORAGE_GZIP_PATH"):
            assert environment[key].startswith(target + "/"), (role, key)
    # The image creates that directory for its non-root user, so a fresh named volume
    # mounted there inherits the ownership.
    assert f" {target}" in " ".join(_dockerfile_stages()[-1].get("RUN", []))


def test_gateway_is_published_on_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    published = {name: _ports(service) for name, service in services.items() if _ports(service)}
    assert published == {"gateway": [Port("127.0.0.1", str(GATEWAY_PORT), GATEWAY_PORT)]}
    for name, service in services.items():
        assert not service.get("expose"), name


def test_no_address_beyond_loopback_in_the_file() -> None:
    text = COMPOSE_FILE.read_text()
    addresses = re.findall(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])", text)
    assert addresses, "the gateway's 127.0.0.1 binding should be in the file"
    for address in addresses:
        assert ipaddress.ip_address(address).is_loopback, address
    assert "0.0.0.0" not in text
    assert "[::]" not in text


def test_required_variables_have_no_defaults() -> None:
    """Secrets and host facts are ``${VAR:?message}``: no default can slip in anywhere."""
    text = COMPOSE_FILE.read_text()
    uses = re.findall(r"\$\{(\w+)([^}]*)\}", text)
    required = {name for name, modifier in uses if modifier.startswith(":?")}
    assert required == set(REQUIRED_ENV)
    for name, modifier in uses:
        if name in REQUIRED_ENV:
            assert modifier.startswith(":?"), f"${{{name}{modifier}}}"


def test_compress_runs_two_replicas(services: dict[str, dict[str, Any]]) -> None:
    assert _replicas(services["compress"]) == 2
    assert "container_name" not in services["compress"]


def test_workers_have_no_http_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    # The image's HEALTHCHECK polls the HTTP API, which only the gateway serves.
    assert not _healthcheck_disabled(services["gateway"])
    for role in set(ROLES) - {"gateway"}:
        assert _healthcheck_disabled(services[role]), role


def test_infrastructure_services(
    model: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    nats = services["nats"]
    assert nats["image"] == "nats:2.10"
    assert nats["command"] == ["-js", "-sd", "/data"]
    assert _mounts(nats) == [Mount("volume", "nats", "/data")]

    minio = services["minio"]
    assert minio["image"].startswith("minio/minio")
    assert minio["command"] == ["server", "/data", "--console-address", ":9001"]
    assert minio["environment"] == {
        "MINIO_ROOT_USER": REQUIRED_ENV["MINIO_ROOT_USER"],
        "MINIO_ROOT_PASSWORD": REQUIRED_ENV["MINIO_ROOT_PASSWORD"],
    }
    assert _mounts(minio) == [Mount("volume", "minio", "/data")]

    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16"
    assert postgres["environment"]["POSTGRES_PASSWORD"] == REQUIRED_ENV["POSTGRES_PASSWORD"]
    assert _mounts(postgres) == [Mount("volume", "postgres", "/var/lib/postgresql/data")]
    for name in ("minio", "postgres"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name

    assert set(model["volumes"]) == {"nats", "minio", "postgres", "work"}
    conditions = {
        role: {dep: spec["condition"] for dep, spec in services[role]["depends_on"].items()}
        for role in ROLES
    }
    for role, needs in conditions.items():
        assert needs.get("nats") == "service_started", role
    for role in ("gateway", "persist"):
        assert conditions[role]["postgres"] == "service_healthy", role
    assert conditions["upload"]["minio"] == "service_healthy"


# --- broken files are rejected ---------------------------------------------------------------


@pytest.mark.parametrize("missing", sorted(REQUIRED_ENV))
def test_a_missing_required_variable_is_rejected(
    compose: list[str], tmp_path: Path, missing: str
) -> None:
    env = {k: v for k, v in REQUIRED_ENV.items() if k != missing}
    result = _run_config(compose, _project(tmp_path), env, "--quiet")
    assert result.returncode != 0
    assert missing in result.stderr


@pytest.mark.parametrize(
    ("label", "mutate"),
    [
        ("unknown top-level key", lambda text: text + "\nservices_extra:\n  foo: {}\n"),
        (
            "misspelt service key",
            lambda text: text.replace("  timer:\n", "  timer:\n    restrat: always\n", 1),
        ),
    ],
)
def test_a_broken_file_is_rejected(
    compose: list[str], tmp_path: Path, label: str, mutate: Callable[[str], str]
) -> None:
    broken = mutate(COMPOSE_FILE.read_text())
    assert broken != COMPOSE_FILE.read_text(), label
    result = _run_config(compose, _project(tmp_path, broken), REQUIRED_ENV, "--quiet")
    assert result.returncode != 0, label
    assert ("services_extra" if "top-level" in label else "restrat") in result.stderr, label


# --- the Dockerfile --------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, arguments = pending.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def _dockerfile_stages() -> list[dict[str, list[str]]]:
    stages: list[dict[str, list[str]]] = []
    for keyword, arguments in _dockerfile_instructions():
        if keyword == "FROM":
            stages.append({})
        assert stages, f"{keyword} before the first FROM"
        stages[-1].setdefault(keyword, []).append(arguments)
    return stages


def test_dockerfile_is_multi_stage_on_python_slim() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        assert stage["FROM"][0].split()[0] == "python:3.11-slim"
    installs = [run for stage in stages for run in stage.get("RUN", []) if "pip install" in run]
    assert installs
    for run in installs:
        assert "[test]" not in run and " -e " not in run, run
        assert "/opt/venv/bin/pip" in run, run
    assert any("--from=build /opt/venv" in copy for copy in stages[-1]["COPY"])


def test_dockerfile_ends_as_non_root_with_the_dcu_entrypoint() -> None:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    final = instructions[last_from:]
    users = [arguments for keyword, arguments in final if keyword == "USER"]
    assert users, "the runtime stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, user
    tail = [keyword for keyword, _ in final]
    assert tail[-3:] == ["USER", "ENTRYPOINT", "CMD"]
    assert json.loads(final[-2][1]) == ["dcu"]
    assert json.loads(final[-1][1]) == ["serve"]


def test_dockerfile_listens_and_checks_health() -> None:
    final = _dockerfile_stages()[-1]
    assert final["EXPOSE"] == [str(GATEWAY_PORT)]
    env = " ".join(final["ENV"])
    assert "DCU_SERVER_HOST=0.0.0.0" in env
    assert "DCU_AUTH_ENABLED=true" in env  # listening beyond loopback needs tokens
    assert f"DCU_SERVER_PORT={GATEWAY_PORT}" in env
    (healthcheck,) = final["HEALTHCHECK"]
    assert "/api/dcu/health" in healthcheck
    assert "urllib.request" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert command[:2] == ["python", "-c"]
    compile(command[2], "<healthcheck>", "exec")


def _dockerfile_env() -> dict[str, str]:
    """The runtime stage's ``ENV KEY=VALUE ...`` pairs."""
    pairs = " ".join(_dockerfile_stages()[-1]["ENV"]).split()
    return dict(pair.split("=", 1) for pair in pairs)


def test_the_gateway_container_starts_only_with_tokens(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kernel.settings import listen_refusal, load_settings

    # Given the image's environment, then the gateway service's, over the image's config
    for key in os.environ:
        if key.startswith("DCU_"):
            monkeypatch.delenv(key)
    environment = {**_dockerfile_env(), **services["gateway"]["environment"]}
    for key, value in environment.items():
        if key.startswith("DCU_"):
            monkeypatch.setenv(key, str(value))
    config = ROOT / "configs" / "config.yaml"
    # When the settings are loaded, the gateway listens beyond loopback with auth on
    settings = load_settings(config)
    assert settings.server.host == "0.0.0.0"
    assert settings.auth.enabled
    assert set(settings.auth.tokens) == {"jenkins"}
    assert listen_refusal(settings) is None
    # and without tokens `dcu gateway` would refuse to start
    monkeypatch.delenv("DCU_AUTH_TOKENS")
    refusal = listen_refusal(load_settings(config))
    assert refusal is not None and "auth.tokens is empty" in refusal


def test_dockerignore_keeps_secrets_out_and_the_package_in() -> None:
    ignored = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".env", ".venv", "data"} <= ignored
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    needed = ["pyproject.toml", "README.md", "configs", "configs/config.yaml", *packages]
    for path in needed:
        assert path not in ignored and f"{path}/" not in ignored, path
        assert (ROOT / path).exists(), path

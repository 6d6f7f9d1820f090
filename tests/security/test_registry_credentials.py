"""Registry credentials: the Docker config file parser, precedence, and masking."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest
from aiodocker.exceptions import DockerError

from actors.docker_engine import DockerEngine, _translate, redact
from actors.registry_auth import RegistryAuth
from events.reference import parse_reference
from kernel.docker_config import (
    DockerConfigError,
    RegistryCredentials,
    parse_docker_config,
    read_docker_config,
    registry_key,
)
from kernel.errors import EngineError, ImageNotFound
from kernel.settings import DockerSettings
from tests.security.conftest import docker_auth, gateway_config
from tests.servers.dcu_process import DCU
from tests.servers.nats import NatsServer

SECRET = "pa:ss-w0rd-9c1e"  # a colon inside the password, as docker login allows


def write_config(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document))
    return path


def plain(found: dict[str, RegistryCredentials]) -> dict[str, tuple[str, str]]:
    return {k: (v.username, v.password.get_secret_value()) for k, v in found.items()}


def test_the_auths_section_is_read(tmp_path: Path) -> None:
    # Given a config as docker login writes it, with every form of key and entry
    config = write_config(
        tmp_path / "config.json",
        {
            "auths": {
                "registry.example:5000": {"auth": docker_auth("ci", SECRET)},
                "https://Index.Docker.io/v1/": {"auth": docker_auth("hub", "hub-secret")},
                "http://Mirror.Example/v2/": {"username": "mirror", "password": "m-secret"},
                "helper.example": {},  # a credential helper's placeholder
                "token.example": {"identitytoken": "opaque"},
                "unpadded.example": {"auth": docker_auth("u", "p1").rstrip("=")},
            },
            "credsStore": "desktop",
            "HttpHeaders": {"User-Agent": "x"},
        },
    )
    # When it is read
    found = read_docker_config(config)
    # Then every usable entry is there under its normalised registry key
    assert plain(found) == {
        "registry.example:5000": ("ci", SECRET),
        "docker.io": ("hub", "hub-secret"),
        "mirror.example": ("mirror", "m-secret"),
        "unpadded.example": ("u", "p1"),
    }
    assert SECRET not in repr(found)


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        pytest.param("{not json", "is not valid JSON", id="not-json"),
        pytest.param([1], "is not a JSON object", id="array"),
        pytest.param({"auths": []}, "auths is not an object", id="auths-array"),
        pytest.param(
            {"auths": {"r.example": "x"}}, "auths['r.example'] is not an object", id="entry"
        ),
        pytest.param(
            {"auths": {"r.example": {"auth": "%%" + SECRET}}},
            "auths['r.example'].auth is not base64 of user:password",
            id="bad-base64",
        ),
        pytest.param(
            {"auths": {"r.example": {"auth": base64.b64encode(b"no-colon-9c1e").decode()}}},
            "auths['r.example'].auth is not base64 of user:password",
            id="no-user",
        ),
        pytest.param(
            {"auths": {"r.example": {"username": "ci"}}},
            "needs a username and a password",
            id="no-password",
        ),
    ],
)
def test_malformed_configs_are_refused_without_their_values(
    document: object, fragment: str
) -> None:
    text = document if isinstance(document, str) else json.dumps(document)
    with pytest.raises(DockerConfigError) as caught:
        parse_docker_config(text, "/etc/dcu/docker.json")
    message = str(caught.value)
    assert message.startswith("/etc/dcu/docker.json")
    assert fragment in message
    assert SECRET not in message
    assert "ss-w0rd" not in message


def test_the_settings_win_over_the_file_which_is_reread_when_it_changes(tmp_path: Path) -> None:
    # Given credentials for one registry in both places, another only in the file
    config = write_config(
        tmp_path / "config.json",
        {
            "auths": {
                "registry.example:5000": {"auth": docker_auth("file", "file-secret")},
                "other.example": {"auth": docker_auth("other", "other-secret")},
            }
        },
    )
    settings = DockerSettings.model_validate(
        {
            "config_file": str(config),
            "registries": {
                "Registry.Example:5000": {"username": "conf", "password": "conf-secret"}
            },
        }
    )
    auth = RegistryAuth(settings)
    # Then the settings' entry wins, and the file fills in the rest
    assert plain(auth.load()) == {
        "registry.example:5000": ("conf", "conf-secret"),
        "other.example": ("other", "other-secret"),
    }
    # and a rotated file is picked up without a restart
    write_config(config, {"auths": {"other.example": {"auth": docker_auth("other", "rotated!")}}})
    os.utime(config, ns=(1, 1))  # a different mtime even within the clock's resolution
    assert plain(auth.load())["other.example"] == ("other", "rotated!")
    # while a file that disappears is an error naming it
    config.unlink()
    with pytest.raises(DockerConfigError, match=r"cannot read docker\.config_file"):
        auth.load()


def test_the_engine_sends_the_credentials_of_the_references_registry(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config.json",
        {"auths": {"https://index.docker.io/v1/": {"auth": docker_auth("hub", "s3cret")}}},
    )
    engine = DockerEngine(DockerSettings(host="unix:///nonexistent.sock", config_file=str(config)))
    assert engine._auth_for(parse_reference("nginx:latest")) == {
        "username": "hub",
        "password": "s3cret",
        "serveraddress": "docker.io",
    }
    assert engine._auth_for(parse_reference("quay.io/a/b")) is None
    config.write_text("{broken")
    os.utime(config, ns=(2, 2))
    with pytest.raises(EngineError, match="is not valid JSON"):
        engine._auth_for(parse_reference("nginx"))


def test_engine_messages_mask_the_credentials() -> None:
    secrets = ["ci-user", "hunter2-secret"]
    echoed = DockerError(
        500, "Get https://r.example/v2/: unauthorized: ci-user:hunter2-secret rejected"
    )
    error = _translate(echoed, "pull r.example/app", secrets)
    assert isinstance(error, EngineError)
    assert (
        str(error)
        == "pull r.example/app: Get https://r.example/v2/: unauthorized: ***:*** rejected"
    )
    missing = _translate(DockerError(404, "manifest for ci-user/app unknown"), "pull", secrets)
    assert isinstance(missing, ImageNotFound)
    assert "ci-user" not in str(missing)
    assert redact("a ab abc", ["a", "ab"]) == "a ab abc"  # too short to mask safely


@pytest.mark.parametrize(
    "key",
    ["docker.io", "index.docker.io", "https://index.docker.io/v1/", "registry-1.docker.io"],
)
def test_docker_hub_aliases(key: str) -> None:
    assert registry_key(key) == "docker.io"


def test_a_download_worker_with_a_broken_config_file_exits_2(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    config_file = write_config(
        tmp_path / "docker.json", {"auths": {"r.example": {"auth": "!!" + SECRET}}}
    )
    config = gateway_config(nats_server, docker={"config_file": str(config_file)})
    dcu_config = tmp_path / "dcu.json"  # JSON is YAML
    dcu_config.write_text(json.dumps(config))
    result = subprocess.run(
        [DCU, "--config", str(dcu_config), "worker", "download"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    message = f"dcu: bad configuration: docker.config_file: {config_file}: auths['r.example'].auth"
    assert message in result.stderr
    assert SECRET not in result.stderr + result.stdout

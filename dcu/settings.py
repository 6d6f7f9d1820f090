"""Settings: one typed object built once, from ``configs/config.yaml`` then the environment.

Every key can be overridden by ``DCU_<SECTION>_<KEY>`` (``DCU_MINIO_ENDPOINT=...``,
``DCU_STORAGE_GZIP_PATH=...``); complex values (``DCU_AUTH_TOKENS``) take JSON. Secrets are
``SecretStr`` so they never appear in a repr, a log line or an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

DEFAULT_CONFIG = Path("configs/config.yaml")


class ServerSettings(BaseModel):
    # Loopback by default: exposing DCU is a decision (see README, "Deployment").
    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)
    mode: Literal["debug", "release"] = "debug"
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    max_page_size: int = Field(default=100, ge=1)


class DatabaseSettings(BaseModel):
    path: str = "./data/dcu.db"
    # A Tortoise URL (``postgres://user@host:5432/db``) wins over ``path`` when set.
    url: str = ""

    def tortoise_url(self) -> str:
        if self.url:
            return self.url
        return f"sqlite://{self.path}"


class StorageSettings(BaseModel):
    gzip_path: str = "./data/gzip"
    work_path: str = "./data/work"
    cleanup_gzip_cron: str = "0 0 * * *"
    cleanup_minio_cron: str = "0 0 * * 0"
    gzip_retention_days: float = Field(default=1, ge=0)
    minio_retention_days: float = Field(default=7, ge=0)
    # isal levels 0-3; 1 is gzip -1's ratio at several times its speed.
    compress_level: int = Field(default=1, ge=0, le=3)
    compress_threads: int = Field(default=2, ge=1)


class MinioSettings(BaseModel):
    endpoint: str = ""  # empty: objects go to ``local_path`` (logged loudly)
    access_key: SecretStr = SecretStr("")
    secret_key: SecretStr = SecretStr("")
    bucket: str = Field(default="dcu-artifacts", min_length=3, max_length=63)
    use_ssl: bool = False
    region: str = ""
    prefix: str = "dcu/"
    local_path: str = "./data/objects"
    part_size: int = Field(default=16 * 1024 * 1024, ge=5 * 1024 * 1024)
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=120.0, gt=0)


class NatsSettings(BaseModel):
    url: str = ""  # empty: start an embedded nats-server under ``data_dir``
    data_dir: str = "./data/nats"
    stream: str = "DCU"
    subject_prefix: str = "dcu"
    stream_max_age: float = Field(default=30 * 24 * 3600, ge=0)  # seconds; 0 = unlimited
    stream_max_bytes: int = Field(default=1024**3, ge=-1)  # -1 = unlimited
    ack_wait: float = Field(default=30.0, gt=0)
    max_deliver: int = Field(default=20, ge=1)
    user: str = ""
    password: SecretStr = SecretStr("")
    token: SecretStr = SecretStr("")
    creds_file: str = ""
    tls_ca_file: str = ""

    @field_validator("subject_prefix")
    @classmethod
    def _single_token(cls, value: str) -> str:
        if not value or any(ch in value for ch in ".*> \t"):
            raise ValueError("subject_prefix must be one NATS token (no dots or wildcards)")
        return value


class RegistryCredentials(BaseModel):
    username: str
    password: SecretStr


DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"


class DockerSettings(BaseModel):
    # empty: $DOCKER_HOST, else the engine's default unix socket (resolved at load time)
    host: str = ""
    registries: dict[str, RegistryCredentials] = Field(default_factory=dict)
    pull_timeout: float = Field(default=1800, gt=0)


class WorkerSettings(BaseModel):
    download_concurrency: int = Field(default=1, ge=1)
    compress_concurrency: int = Field(default=1, ge=1)
    upload_concurrency: int = Field(default=2, ge=1)
    max_retries: int = Field(default=3, ge=0)
    min_backoff_ms: int = Field(default=2000, ge=0)
    max_backoff_ms: int = Field(default=60000, ge=0)
    progress_interval: float = Field(default=1.0, gt=0)
    shutdown_grace: float = Field(default=30.0, ge=0)
    max_image_bytes: int = Field(default=0, ge=0)  # 0: no limit
    # A running task with no event or progress for this long has lost its workers and
    # is failed by the persistence watchdog; 0 turns the watchdog off.
    stuck_after: float = Field(default=3600.0, ge=0)
    watchdog_interval: float = Field(default=30.0, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DCU_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="ignore",
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    minio: MinioSettings = Field(default_factory=MinioSettings)
    nats: NatsSettings = Field(default_factory=NatsSettings)
    docker: DockerSettings = Field(default_factory=DockerSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = _config_file.get("path")
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


_config_file: dict[str, Path] = {}


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read ``path`` (if it exists), then ``DCU_*`` environment variables, then overrides.

    Raises pydantic's ValidationError naming each bad key.
    """
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    _config_file.clear()
    if path is not None:
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        _config_file["path"] = path
    try:
        settings = Settings(**overrides)
    finally:
        _config_file.clear()
    if not settings.docker.host:
        settings.docker.host = os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
    return settings

"""Settings: one typed object built once, from ``configs/config.yaml`` then the environment.

Every key can be overridden by ``DCU_<SECTION>_<KEY>`` (``DCU_MINIO_ENDPOINT=...``,
``DCU_STORAGE_GZIP_PATH=...``); complex values (``DCU_AUTH_TOKENS``) take JSON. Secrets are
``SecretStr`` so they never appear in a repr, a log line or an error.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from events.cleanup import check_cron
from events.formats import DEFAULT_FORMAT, ArchiveFormat
from events.limits import BUNDLE_IMAGES_MAX, USERNAME_MAX
from events.messages import DEFAULT_LANGUAGE, Language
from events.platform import DEFAULT_PLATFORM, InvalidPlatform, parse_platform
from kernel.docker_config import DockerConfigError, RegistryCredentials, read_docker_config
from kernel.errors import ConfigError

DEFAULT_CONFIG = Path("configs/config.yaml")


class ServerSettings(BaseModel):
    # Loopback by default: exposing DCU is a decision (see README, "Deployment").
    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)
    mode: Literal["debug", "release"] = "debug"
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    max_page_size: int = Field(default=100, ge=1)
    # ``dcu serve``/``dcu gateway`` refuse a non-loopback host while auth is off, unless
    # this says the exposure is deliberate (a trusted network, a proxy that authenticates).
    allow_unauthenticated: bool = False
    # Tasks one user may have idle or running at once; POST /start answers 429 past it.
    max_active_tasks_per_user: int = Field(default=0, ge=0)  # 0: no limit
    # Images one ``POST /bundle`` may name.
    max_bundle_images: int = Field(default=20, ge=1, le=BUNDLE_IMAGES_MAX)
    # The language of state_display and the envelope's fixed messages when a request's
    # Accept-Language names none of ours (events.messages): the seed's Chinese by default.
    language: Language = DEFAULT_LANGUAGE


TOKEN_MIN_LENGTH = 16
HASHED_PREFIX = "sha256:"
_HASHED = re.compile(r"sha256:[0-9a-fA-F]{64}")
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: an HTTP header value


def token_digest(value: str) -> bytes:
    """The sha256 digest a configured token stands for: ``sha256:<hex>`` as given, a plain
    token hashed. The gateway compares digests, so both forms work the same."""
    if value.startswith(HASHED_PREFIX):
        return bytes.fromhex(value[len(HASHED_PREFIX) :])
    return hashlib.sha256(value.encode()).digest()


class AuthSettings(BaseModel):
    """Bearer tokens for the gateway: ``tokens`` maps a user or system name to its token
    (or ``sha256:<hex>`` of it). The name becomes the username of the tasks it starts."""

    enabled: bool = False
    tokens: dict[str, SecretStr] = Field(default_factory=dict)
    # Also require a token for GET endpoints (all but /health, which health checks poll).
    protect_reads: bool = False

    @field_validator("tokens")
    @classmethod
    def _valid_tokens(cls, tokens: dict[str, SecretStr]) -> dict[str, SecretStr]:
        # Messages name the entry, never its value.
        owners: dict[bytes, str] = {}
        for name, secret in tokens.items():
            if name != name.strip() or not name or len(name) > USERNAME_MAX:
                raise ValueError(
                    f"token name {name[:USERNAME_MAX]!r} must be 1-{USERNAME_MAX} "
                    "characters without surrounding spaces"
                )
            if not name.isprintable():
                raise ValueError(f"token name {name!r} contains control characters")
            value = secret.get_secret_value()
            if value.startswith(HASHED_PREFIX):
                if not _HASHED.fullmatch(value):
                    raise ValueError(
                        f"token of {name!r}: a hashed token is sha256: and 64 hex digits"
                    )
            elif len(value) < TOKEN_MIN_LENGTH or not _TOKEN_CHARS.fullmatch(value):
                raise ValueError(
                    f"token of {name!r} must be at least {TOKEN_MIN_LENGTH} printable ASCII "
                    "characters without spaces (e.g. `openssl rand -hex 32`)"
                )
            digest = token_digest(value)
            if digest in owners:
                raise ValueError(f"tokens of {owners[digest]!r} and {name!r} are the same")
            owners[digest] = name
        return tokens


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
    # A task's archive format when its request names none (``events.formats``).
    archive_format: ArchiveFormat = DEFAULT_FORMAT

    @field_validator("cleanup_gzip_cron", "cleanup_minio_cron")
    @classmethod
    def _cron(cls, value: str, info: ValidationInfo) -> str:
        """A five-field crontab expression (or an ``@daily`` alias) that fires; checked
        once here for every role, not only by the timer."""
        key = f"storage.{info.field_name}"
        try:
            return check_cron(value, key)
        except ValueError as exc:  # the key is in the error's location already
            raise ValueError(str(exc).removeprefix(f"{key}: ")) from None


class MinioSettings(BaseModel):
    endpoint: str = ""  # empty: objects go to ``local_path`` (logged loudly)
    access_key: SecretStr = SecretStr("")
    secret_key: SecretStr = SecretStr("")
    bucket: str = Field(default="dcu-artifacts", min_length=3, max_length=63)
    use_ssl: bool = False
    region: str = ""
    prefix: str = "dcu/"
    local_path: str = "./data/objects"
    # An upload holds at most ``parallel_parts + 2`` parts in memory (48 MiB by default).
    part_size: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)
    # Parts in flight per upload; an upload holds about twice this many parts in memory.
    parallel_parts: int = Field(default=4, ge=1, le=16)
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=120.0, gt=0)
    # PEM bundle of the CA(s) that signed the S3 server's certificate, instead of the
    # system's trust store; only with ``use_ssl``.
    ca_file: str = ""
    # Seconds a download link (GET /download/{task_id} on S3) stays valid; S3 allows 7 days.
    download_url_expiry: float = Field(default=3600, gt=0, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _ca_needs_tls(self) -> MinioSettings:
        if self.ca_file and not self.use_ssl:
            raise ValueError("minio.ca_file is set but minio.use_ssl is false")
        return self


class NatsSettings(BaseModel):
    url: str = ""  # empty: start an embedded nats-server under ``data_dir``
    data_dir: str = "./data/nats"
    # Names the three streams (``<stream>_AUDIT``, ``_PROGRESS``, ``_WORK``) and is the
    # name of the single stream of versions before them (``dcu migrate-streams``).
    stream: str = Field(default="DCU", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    subject_prefix: str = "dcu"
    # The audit log: no age limit, and when full it refuses new facts (discard new) rather
    # than forgetting old ones; -1 (the default): bounded only by the server's JetStream
    # store, which refuses new messages the same way when full. See docs/events.md.
    audit_max_bytes: int = Field(default=-1, ge=-1)
    audit_max_age: float = Field(default=0, ge=0)  # seconds; 0 = keep forever
    progress_max_age: float = Field(default=24 * 3600, gt=0)  # only the latest per task
    work_max_age: float = Field(default=30 * 24 * 3600, ge=0)  # dead letters; 0 = forever
    replicas: int = Field(default=1, ge=1, le=5)
    ack_wait: float = Field(default=30.0, gt=0)
    max_deliver: int = Field(default=20, ge=1)
    user: str = ""
    password: SecretStr = SecretStr("")
    token: SecretStr = SecretStr("")
    creds_file: str = ""
    tls_ca_file: str = ""

    @property
    def audit_stream(self) -> str:
        return f"{self.stream}_AUDIT"

    @property
    def progress_stream(self) -> str:
        return f"{self.stream}_PROGRESS"

    @property
    def work_stream(self) -> str:
        return f"{self.stream}_WORK"

    @field_validator("subject_prefix")
    @classmethod
    def _single_token(cls, value: str) -> str:
        if not value or any(ch in value for ch in ".*> \t"):
            raise ValueError("subject_prefix must be one NATS token (no dots or wildcards)")
        return value


DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"


_REGISTRY_HOST = re.compile(r"(?:[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")


class DockerSettings(BaseModel):
    # empty: $DOCKER_HOST, else the engine's default unix socket (resolved at load time)
    host: str = ""
    # Per-registry credentials ``{host: {username, password}}``; they win over config_file.
    registries: dict[str, RegistryCredentials] = Field(default_factory=dict)
    # A Docker client config (``~/.docker/config.json``) whose ``auths`` give credentials.
    config_file: str = ""
    # Registries (``host[:port]``, ``docker.io`` for Docker Hub names) images may come
    # from; empty allows any. Checked by the gateway and again by the download stage.
    allowed_registries: list[str] = Field(default_factory=list)
    pull_timeout: float = Field(default=1800, gt=0)

    @field_validator("config_file")
    @classmethod
    def _readable_config(cls, value: str) -> str:
        """A named file must be there and well-formed: a typo fails at start, not on the
        first pull. Every role checks it (settings do not know the role); a role that
        does not pull can leave the key unset."""
        if value:
            try:
                read_docker_config(Path(value))
            except DockerConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("allowed_registries")
    @classmethod
    def _registry_hosts(cls, hosts: list[str]) -> list[str]:
        return _registry_host_list(hosts, "allowed registry")


def _registry_host_list(hosts: list[str], what: str) -> list[str]:
    normalised = []
    for host in hosts:
        value = host.strip().lower()
        if not _REGISTRY_HOST.fullmatch(value):
            raise ValueError(f"{what} {host!r} is not a host[:port] (no scheme, no path)")
        normalised.append(value)
    return normalised


class DownloadSettings(BaseModel):
    """How the download stage gets an image (see docs/performance.md, docs/security.md)."""

    # ``registry``: straight from the registry's blobs, no daemon; ``docker``: the engine
    # pulls and exports (``docker.host``).
    engine: Literal["registry", "docker"] = "registry"
    # The platform of a multi-platform image when the start request names none.
    platform: str = DEFAULT_PLATFORM
    # Registry host -> mirrors tried first, in order (``{"docker.io": ["mirror:5000"]}``);
    # a mirror that fails or lacks the image falls through to the next, then the source.
    mirrors: dict[str, list[str]] = Field(default_factory=dict)
    # Hosts spoken to over plain HTTP. Loopback registries always are (as the engine
    # treats 127.0.0.0/8 as insecure); every other registry needs HTTPS unless listed.
    insecure_registries: list[str] = Field(default_factory=list)
    # Token realms (``host[:port]``) that may receive registry credentials besides the
    # registry's own host (and ``auth.docker.io`` for Docker Hub); see docs/security.md.
    token_realms: list[str] = Field(default_factory=list)
    # Blobs fetched at once per task.
    parallel_blobs: int = Field(default=4, ge=1, le=32)
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=60.0, gt=0)
    # Attempts per registry request (a broken blob transfer resumes with Range).
    request_attempts: int = Field(default=4, ge=1)
    # Content-addressed blob cache shared by all tasks; empty: ``<storage.work_path>/blobs``.
    # Keep it on the work volume: tasks hard-link its blobs (a copy otherwise).
    # LRU-evicted past ``cache_max_bytes``.
    cache_path: str = ""
    cache_max_bytes: int = Field(default=20 * 1024**3, ge=0)  # 0: keep nothing after a task
    # A task whose manifest digest, platform and tag were already packaged copies the
    # existing object (server-side) instead of downloading and compressing again.
    reuse: bool = True

    @field_validator("platform")
    @classmethod
    def _platform(cls, value: str) -> str:
        try:
            return str(parse_platform(value))
        except InvalidPlatform as exc:
            raise ValueError(str(exc)) from None

    @field_validator("insecure_registries")
    @classmethod
    def _insecure_hosts(cls, hosts: list[str]) -> list[str]:
        return _registry_host_list(hosts, "insecure registry")

    @field_validator("token_realms")
    @classmethod
    def _realm_hosts(cls, hosts: list[str]) -> list[str]:
        return _registry_host_list(hosts, "token realm")

    @field_validator("mirrors")
    @classmethod
    def _mirror_hosts(cls, mirrors: dict[str, list[str]]) -> dict[str, list[str]]:
        return {
            _registry_host_list([source], "mirrored registry")[0]: _registry_host_list(
                hosts, "mirror"
            )
            for source, hosts in mirrors.items()
        }


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


class PersistenceSettings(BaseModel):
    """How the persistence subscriber treats events of a type it does not know (a newer
    producer during a rolling upgrade): left pending, offered again every
    ``unknown_retry_delay`` seconds so a newer replica can take it, then recorded as
    refused once the message is ``unknown_type_grace`` seconds old (0: at once)."""

    unknown_retry_delay: float = Field(default=5.0, gt=0)
    unknown_type_grace: float = Field(default=300.0, ge=0)


class ArchiveSettings(BaseModel):
    """The audit archiver (``actors.archiver``): the audit stream copied to the object
    store as chained JSON Lines segments every ``interval`` seconds."""

    enabled: bool = True  # ``dcu serve`` runs the archiver
    interval: float = Field(default=3600.0, gt=0)
    segment_max_events: int = Field(default=10_000, ge=1)
    max_segment_bytes: int = Field(default=256 * 1024**2, ge=1024)  # read limit on replay


class LogSettings(BaseModel):
    # ``text``: one human-readable line per record; ``json``: one JSON object per line with
    # ``task_id``, ``stage`` and ``event_id`` where the record concerns a task (kernel.logs).
    format: Literal["text", "json"] = "text"


# The gateway clients' variables (``dcu submit``, ``dcu fetch``; docs/ci.md): a URL and a
# token, not the ``server`` section as JSON, so the service's settings never read them.
CLIENT_VARIABLES = frozenset({"DCU_SERVER", "DCU_TOKEN"})


class ServiceEnvironment(EnvSettingsSource):
    """``DCU_*`` variables, without the clients' own (``CLIENT_VARIABLES``): a pipeline that
    sets ``DCU_SERVER=https://dcu.example`` for ``dcu submit`` can run ``dcu serve`` too."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self.env_vars = {
            name: value
            for name, value in self.env_vars.items()
            if name.upper() not in CLIENT_VARIABLES
        }


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DCU_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="ignore",
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    minio: MinioSettings = Field(default_factory=MinioSettings)
    nats: NatsSettings = Field(default_factory=NatsSettings)
    docker: DockerSettings = Field(default_factory=DockerSettings)
    download: DownloadSettings = Field(default_factory=DownloadSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    persistence: PersistenceSettings = Field(default_factory=PersistenceSettings)
    archive: ArchiveSettings = Field(default_factory=ArchiveSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environment = ServiceEnvironment(settings_cls)
        sources: list[PydanticBaseSettingsSource] = [init_settings, environment]
        yaml_file = _config_file.get("path")
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


_config_file: dict[str, Path] = {}


def describe_error(exc: Exception) -> str:
    """A configuration error as text, one line per bad key, never echoing a value (pydantic's
    own text repeats the input, which may be a password or a token)."""
    if isinstance(exc, ValidationError):
        problems = [
            f"{'.'.join(str(part) for part in error['loc']) or '(root)'}: "
            + error["msg"].removeprefix("Value error, ")
            for error in exc.errors(include_input=False, include_url=False)
        ]
        return "; ".join(problems)
    return str(exc)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only listens on this machine."""
    name = host.strip().lower().removeprefix("[").removesuffix("]")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another host name: assume it is reachable from elsewhere


def listen_refusal(settings: Settings) -> str | None:
    """Why an HTTP role must not start with these settings, or None when it may.

    Refused: auth enabled without any token (every POST would be refused), and a
    non-loopback ``server.host`` with auth off unless ``server.allow_unauthenticated``.
    """
    auth = settings.auth
    host = settings.server.host
    if auth.enabled and not auth.tokens:
        return (
            "auth.enabled is true but auth.tokens is empty: give at least one "
            '{"name": "token"} (DCU_AUTH_TOKENS takes JSON)'
        )
    if not auth.enabled and not settings.server.allow_unauthenticated and not is_loopback(host):
        return (
            f"refusing to listen on {host or 'every interface'!r} without authentication: "
            "set auth.enabled with auth.tokens (DCU_AUTH_ENABLED=true, DCU_AUTH_TOKENS=...), "
            "listen on a loopback address, or set server.allow_unauthenticated: true "
            "if an authenticating proxy or a trusted network guards it"
        )
    return None


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read ``path`` (if it exists), then ``DCU_*`` environment variables, then overrides.

    Raises ConfigError naming each bad key (never echoing a value) or the unreadable file.
    """
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    _config_file.clear()
    if path is not None:
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        _config_file["path"] = path
    try:
        settings = Settings(**overrides)
    except (ValidationError, SettingsError, yaml.YAMLError, OSError) as exc:
        raise ConfigError(describe_error(exc)) from None
    finally:
        _config_file.clear()
    if not settings.docker.host:
        settings.docker.host = os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
    if not settings.download.cache_path:
        settings.download.cache_path = str(Path(settings.storage.work_path) / "blobs")
    return settings
